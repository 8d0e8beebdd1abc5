"""mergescale: merge large language models at scale.

Streaming merges of Hugging Face checkpoints (mergekit-compatible configs), pre-training checkpoint
averaging (PMA) and merging studies with normalised held-in / held-out evaluation.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "merge", "merge_to_memory", "plan_memory", "pma"]

# The public API, imported on first use so `import mergescale` (and the CLI's start) stays light.
_LAZY = {
    "merge": ("mergescale.api", "merge"),
    "merge_to_memory": ("mergescale.api", "merge_to_memory"),
    "plan_memory": ("mergescale.api", "plan_memory"),
    "pma": ("mergescale.pma", "average_checkpoints"),
    "evaluate": ("mergescale.evaluate", "evaluate"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergescale' has no attribute {name!r}")

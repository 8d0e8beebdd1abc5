"""mergescale: merge large language models at scale.

Streaming merges of Hugging Face checkpoints (mergekit-compatible configs), pre-training checkpoint
averaging (PMA) and merging studies with normalised held-in / held-out evaluation.
"""

from __future__ import annotations

import os

# The engine runs torch ops from three threads (read, compute, write). With OpenMP's default busy-waiting, those
# threads and any other load on the machine make each op's thread team spin against the others: a TIES merge
# measured 37 s instead of 20 s on a loaded 2-core machine. Passive waiting costs nothing measurable when idle.
# Only a default: it has no effect once torch has started its thread pool, and a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "merge", "merge_to_memory", "pma"]

# The public API, imported on first use so `import mergescale` (and the CLI's start) stays light.
_LAZY = {
    "merge": ("mergescale.api", "merge"),
    "merge_to_memory": ("mergescale.api", "merge_to_memory"),
    "pma": ("mergescale.pma", "average_checkpoints"),
    "evaluate": ("mergescale.evaluate", "evaluate"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergescale' has no attribute {name!r}")

"""mergescale: merge large language models at scale.

Streaming merges of Hugging Face checkpoints (mergekit-compatible configs), pre-training checkpoint
averaging (PMA) and merging studies with normalised held-in / held-out evaluation.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

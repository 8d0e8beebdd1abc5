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

__all__ = ["__version__"]

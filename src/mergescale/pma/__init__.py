"""Pre-training model averaging (PMA): average the checkpoints of a run, offline or during training.

- :func:`average_checkpoints` / :func:`sweep_checkpoints`: offline, streaming through the merge engine.
- :class:`PMAAverager` (plain PyTorch loops) and :class:`PMACallback` (a ``transformers.TrainerCallback``):
  online running averages.
- :func:`recover`: loss-spike detection and recovery by averaging the checkpoints before the spike.

Background and formulas: ``docs/pma.md``; the paper is "Model Merging in Pre-training of Large Language
Models" (Li et al., 2025, https://arxiv.org/abs/2505.12082).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergescale.pma.average import PMAResult, PMASettings, average_checkpoints, sweep_checkpoints
    from mergescale.pma.online import PMAAverager, PMACallback
    from mergescale.pma.recovery import RecoveryResult, recover

__all__ = [
    "PMAAverager",
    "PMACallback",
    "PMAResult",
    "PMASettings",
    "RecoveryResult",
    "average_checkpoints",
    "recover",
    "sweep_checkpoints",
]

# Imported on first use: the callback pulls in transformers' Trainer, which the CLI should not pay for.
_LAZY = {
    "PMAResult": "mergescale.pma.average",
    "PMASettings": "mergescale.pma.average",
    "average_checkpoints": "mergescale.pma.average",
    "sweep_checkpoints": "mergescale.pma.average",
    "PMAAverager": "mergescale.pma.online",
    "PMACallback": "mergescale.pma.online",
    "RecoveryResult": "mergescale.pma.recovery",
    "recover": "mergescale.pma.recovery",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergescale.pma' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

"""Pre-training model averaging (PMA): average the checkpoints of a run, offline or during training.

- :func:`average_checkpoints` / :func:`sweep_checkpoints`: offline, streaming through the merge engine.
- :class:`PMAAverager` (plain PyTorch loops) and :class:`PMACallback` (a ``transformers.TrainerCallback``):
  online running averages.
- :func:`recover`: loss-spike detection and recovery by averaging the checkpoints before the spike.
- The paper's experiments on any run: :func:`plan_along_run` / :func:`iter_along_run` (every window along the
  run, one read per checkpoint tensor), :func:`iter_ablation` (N × V × strategy at chosen end steps),
  :class:`ModelScorer`, :func:`curve_points`, :func:`ablation_points` (evaluated :class:`CurvePoint` s),
  :func:`pma_init` and :func:`spike_recovery` (continued training from an average).

Background and formulas: ``docs/pma.md``; the paper is "Model Merging in Pre-training of Large Language
Models" (Li et al., 2025, https://arxiv.org/abs/2505.12082).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergescale.pma.ablation import AblationStep, ablation_settings, iter_ablation
    from mergescale.pma.along_run import AlongRunPlan, along_run_averages, iter_along_run, plan_along_run
    from mergescale.pma.average import PMAResult, PMASettings, average_checkpoints, sweep_checkpoints
    from mergescale.pma.continued import (
        ContinueSettings,
        PMAInitResult,
        SpikeRecoveryResult,
        SpikeSettings,
        TrainCurve,
        pma_init,
        spike_recovery,
        train_arm,
    )
    from mergescale.pma.curves import (
        CurvePoint,
        ModelScorer,
        Scores,
        ablation_points,
        curve_points,
        recovered_share,
    )
    from mergescale.pma.online import PMAAverager, PMACallback
    from mergescale.pma.recovery import RecoveryResult, recover

__all__ = [
    "ablation_points",
    "ablation_settings",
    "AblationStep",
    "along_run_averages",
    "AlongRunPlan",
    "average_checkpoints",
    "ContinueSettings",
    "curve_points",
    "CurvePoint",
    "iter_ablation",
    "iter_along_run",
    "ModelScorer",
    "plan_along_run",
    "pma_init",
    "PMAAverager",
    "PMACallback",
    "PMAInitResult",
    "PMAResult",
    "PMASettings",
    "recover",
    "recovered_share",
    "RecoveryResult",
    "Scores",
    "spike_recovery",
    "SpikeRecoveryResult",
    "SpikeSettings",
    "sweep_checkpoints",
    "train_arm",
    "TrainCurve",
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
    "AblationStep": "mergescale.pma.ablation",
    "ablation_settings": "mergescale.pma.ablation",
    "iter_ablation": "mergescale.pma.ablation",
    "AlongRunPlan": "mergescale.pma.along_run",
    "along_run_averages": "mergescale.pma.along_run",
    "iter_along_run": "mergescale.pma.along_run",
    "plan_along_run": "mergescale.pma.along_run",
    "ContinueSettings": "mergescale.pma.continued",
    "PMAInitResult": "mergescale.pma.continued",
    "SpikeRecoveryResult": "mergescale.pma.continued",
    "SpikeSettings": "mergescale.pma.continued",
    "TrainCurve": "mergescale.pma.continued",
    "pma_init": "mergescale.pma.continued",
    "spike_recovery": "mergescale.pma.continued",
    "train_arm": "mergescale.pma.continued",
    "CurvePoint": "mergescale.pma.curves",
    "ModelScorer": "mergescale.pma.curves",
    "Scores": "mergescale.pma.curves",
    "ablation_points": "mergescale.pma.curves",
    "curve_points": "mergescale.pma.curves",
    "recovered_share": "mergescale.pma.curves",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergescale.pma' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

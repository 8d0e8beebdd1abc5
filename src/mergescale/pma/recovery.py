"""``mergescale pma recover``: find loss spikes, and for the first one the run never recovered from, average
the K checkpoints before it (the paper's recovery) and name the alternative, rolling back to the newest of them.

Li et al. (2025, https://arxiv.org/abs/2505.12082) resume a collapsed run from the average of the checkpoints
saved before the collapse; they do not compare against a plain rollback, so we report both, and with held-out
text the loss of both, and let the user choose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergescale.device import check_device
from mergescale.dtypes import parse_dtype
from mergescale.errors import InputModelError
from mergescale.io.atomic import check_output_folder
from mergescale.io.checkpoint import resolve_model_path
from mergescale.io.discover import CheckpointRef, LossPoint, RunInfo, discover_run, read_loss_log
from mergescale.io.folders import CONFIG_JSON, find_tokenizer_folder, read_model_config
from mergescale.pma.average import (
    PMAResult,
    PMASettings,
    _Planned,
    _stream,
    check_apart_from_checkpoints,
    choose,
)
from mergescale.pma.spikes import Spike, SpikeRule, checkpoints_before, detect_spikes, first_unrecovered
from mergescale.pma.weights import DEFAULT_ALPHA


@dataclass
class RecoveryResult:
    """What the recovery found and did.

    Attributes:
        spikes: every spike detected (up to the first unrecovered one).
        spike: the first unrecovered spike, or None when the run recovered from every spike.
        averaged: the average of the K checkpoints before it (None when there is nothing to recover).
        rollback: the newest checkpoint before the spike (the alternative).
        eval_losses: held-out loss of ``"average"`` and ``"rollback"`` when eval data was given.
        loss_log: the loss log used, and where it came from.
    """

    spikes: list[Spike]
    spike: Spike | None
    loss_log: list[LossPoint]
    loss_log_source: Path | None
    averaged: PMAResult | None = None
    rollback: CheckpointRef | None = None
    eval_losses: dict[str, float] | None = None

    @property
    def recommendation(self) -> str | None:
        """``"average"`` or ``"rollback"`` (the lower held-out loss), when both were evaluated."""
        if not self.eval_losses:
            return None
        return min(self.eval_losses, key=lambda k: self.eval_losses[k])  # type: ignore[index]


def recover(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    k: int = 3,
    loss_log: str | Path | None = None,
    rule: SpikeRule | None = None,
    strategy: str = "sma",
    alpha: float = DEFAULT_ALPHA,
    eval_data: str | Path | None = None,
    eval_batch_size: int = 8,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    tokens_per_step: int | None = None,
    trust_remote_code: bool = False,
    skip_incomplete: bool = False,
) -> RecoveryResult:
    """Detect spikes in a run's loss log and average the ``k`` checkpoints before the first unrecovered one.

    The loss log is ``loss_log`` (a ``trainer_state.json``, CSV or JSONL with ``step`` and ``loss``), else the
    run's newest ``trainer_state.json``. Spikes follow :class:`SpikeRule` (see :mod:`mergescale.pma.spikes`).
    A checkpoint counts as before the spike when its weights fed a normal logged loss (its step is below the
    last normal logged step). The average (``strategy``, default SMA as in the paper) goes to ``out_dir``;
    nothing is written when every spike recovered. With ``eval_data`` (text or JSONL) the held-out loss of the
    average and of the rollback checkpoint are computed (float32, on the CPU); a model naming code of its own
    (``auto_map``) is refused for that unless ``trust_remote_code``. A step folder without weights among the K
    checkpoints' span is an error unless ``skip_incomplete``.

    Raises:
        InputModelError: no loss log; no checkpoint before the spike.
        and everything :func:`~mergescale.pma.average.average_checkpoints` raises.
    """
    check_device(device)
    info = discover_run(run_dir, tokens_per_step=tokens_per_step)
    if loss_log is not None:
        log, source = read_loss_log(loss_log), Path(loss_log)
    else:
        log, source = info.loss_log, info.loss_log_source
    if not log:
        raise InputModelError(
            f"{run_dir}: no loss log (no trainer_state.json with log_history); pass --loss-log FILE "
            f"(CSV or JSONL with step and loss)"
        )
    spikes = detect_spikes([p.step for p in log], [p.loss for p in log], rule)
    result = RecoveryResult(
        spikes=spikes, spike=first_unrecovered(spikes), loss_log=log, loss_log_source=source
    )
    if result.spike is None:
        return result
    picked = checkpoints_before(info.steps, result.spike, k)
    if not picked:
        first = info.checkpoints[0].step
        raise InputModelError(
            f"the loss spikes at step {result.spike.step} (last normal loss at step "
            f"{result.spike.last_good_step}), but the run has no checkpoint before it (first checkpoint at "
            f"step {first})"
        )
    window = [info.checkpoints[i] for i in picked]
    out_dtype = parse_dtype(dtype, key="--dtype")
    sub = RunInfo(root=info.root, checkpoints=window, skipped=info.skipped)
    result.averaged = choose(
        sub,
        PMASettings(strategy=strategy, alpha=alpha),
        dtype=out_dtype,
        skip_incomplete=skip_incomplete,
        last_step=result.spike.last_good_step,
    )
    result.rollback = window[-1]
    if dry_run:
        return result
    out = Path(out_dir)
    check_output_folder(out, overwrite=overwrite)
    check_apart_from_checkpoints(out, info.checkpoints)
    texts = None
    if eval_data is not None:
        from mergescale.evaluate.loading import check_remote_code
        from mergescale.pma.heldout import load_texts

        texts = load_texts(eval_data)  # fail on bad eval data before the average is written
        for folder in dict.fromkeys([info.root, *(c.folder for c in window), *(c.path for c in window)]):
            if folder is not None:  # ... and on a model that names code of its own
                check_remote_code(folder, trust_remote_code=trust_remote_code)
    _stream(
        sub,
        [_Planned(result.averaged, out)],
        out_dtype,
        device=device,
        overwrite=overwrite,
        progress=progress,
        max_shard_size="5GB",
    )
    if texts is not None:
        result.eval_losses = _compare(out, result.rollback, info, texts, eval_batch_size, trust_remote_code)
    return result


def _compare(
    averaged: Path,
    rollback: CheckpointRef,
    info: RunInfo,
    texts: list[str],
    batch_size: int,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    from mergescale.pma.heldout import folder_loss

    tokenizer = find_tokenizer_folder([averaged, rollback.path, rollback.folder, info.root], "the held-out loss")
    config = None
    if not (rollback.path / CONFIG_JSON).is_file():  # a DCP checkpoint: built with the average's config
        config = read_model_config(averaged, "evaluating the rollback checkpoint")
    return {
        "average": folder_loss(
            averaged,
            texts,
            tokenizer_folder=tokenizer,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
        ),
        "rollback": folder_loss(
            resolve_model_path(rollback.path),
            texts,
            tokenizer_folder=tokenizer,
            config=config,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
        ),
    }


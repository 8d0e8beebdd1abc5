"""Continued training from an average: PMA-init, and recovery from a loss spike (rollback vs average).

Li et al. (2025, https://arxiv.org/abs/2505.12082) report that initialising continued training or SFT from a
PMA model (PMA-init) gives smoother gradient norms, and that averaging the checkpoints before a loss spike and
resuming from the average recovers a collapsing run. The experiments here run both arms with the same data in
the same order, the same seed and the same optimizer state, and record the loss and gradient norm (before
clipping) of every step through a ``TrainerCallback``.

Training is the offline world's recipe on the Hugging Face ``Trainer`` (its AdamW groups from
``mergescale.world.train``; the anneal's linear decay, the stable phase's constant rate, or fine-tuning's
warmup and decay) on any causal LM and any dataset, in a fixed data order: the dataset is read sequentially,
so step s of every arm sees the same batch, and a resumed arm starts at the batch where it resumes.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset, Subset

from mergescale.errors import ConfigError, InputModelError
from mergescale.io.folders import read_model_config
from mergescale.pma.curves import ModelScorer, load_weights_into


class ContinueSettings(BaseModel):
    """How an arm of continued training runs (the experiments' own settings; the world's presets are not
    touched).

    Attributes:
        steps: optimizer steps of each arm.
        lr: peak learning rate.
        schedule: ``anneal`` (linear decay to 0 over ``steps``, the world's anneal), ``constant`` (the stable
            phase), ``finetune`` (``warmup_steps`` of warmup, then constant, decaying linearly over the last
            ``decay_fraction`` of the steps).
        optimizer: ``carry`` loads the optimizer state (``optimizer.pt``) of the checkpoint the arms branch
            from, into both arms (the world's anneal carries it over); ``fresh`` starts AdamW anew.
        answer_loss: loss on labelled answer tokens only (supervised data), as the world's fine-tuning.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(100, ge=1)
    lr: float = Field(3e-3, gt=0)
    schedule: Literal["anneal", "constant", "finetune"] = "anneal"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 0
    optimizer: Literal["carry", "fresh"] = "carry"
    answer_loss: bool = False


class SpikeSettings(BaseModel):
    """The deliberate spike and the recovery experiment around it.

    Attributes:
        factor: the learning rate is multiplied by this for ``length`` updates, so that the first logged loss
            computed on spiked weights is step ``at``'s (the updates of steps at − 1 … at + length − 2; steps
            counted from the checkpoint the spiked copy branches from). The detector should flag step ``at``.
        steps: steps of the spiked copy (and of the unspiked control up to the comparison).
        save_every: checkpoints of the spiked copy every this many steps (Trainer layout).
        k: checkpoints before the spike averaged (the paper used 3).
        resume_steps: steps each recovery arm trains after resuming.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    factor: float = Field(100.0, gt=1)
    at: int = Field(20, ge=2)
    length: int = Field(3, ge=1)
    steps: int = Field(40, ge=2)
    save_every: int = Field(4, ge=1)
    k: int = Field(3, ge=1)
    resume_steps: int = Field(20, ge=1)


@dataclass
class TrainCurve:
    """Per-step log of one arm of training, and what it ended with.

    Attributes:
        steps: optimizer steps, counted from the arm's ``start_step``.
        loss: training loss of each step.
        grad_norm: total gradient norm of each step, before clipping.
        lr: learning rate of each step.
        start_step: the step (in the experiment's counting) the arm started at.
        heldout_loss: held-out loss of the final weights (None without a scorer).
        out_dir: where checkpoints or the final model were saved, if anywhere.
    """

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    start_step: int = 0
    heldout_loss: float | None = None
    out_dir: Path | None = None

    @property
    def final_loss(self) -> float | None:
        return self.loss[-1] if self.loss else None

    @property
    def grad_norm_std(self) -> float | None:
        """Standard deviation of the gradient norm over the steps (population)."""
        return statistics.pstdev(self.grad_norm) if len(self.grad_norm) > 1 else None

    @property
    def max_grad_norm_jump(self) -> float | None:
        """The largest |g_{s+1} − g_s| between consecutive steps."""
        g = self.grad_norm
        return max(abs(b - a) for a, b in zip(g, g[1:], strict=False)) if len(g) > 1 else None


class StepLog:
    """A ``TrainerCallback`` that makes the Trainer log every step and keeps loss, gradient norm and rate."""

    def __new__(cls, curve: TrainCurve) -> Any:
        from transformers import TrainerCallback

        class _StepLog(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                control.should_log = True  # the log carries the step's loss and pre-clip gradient norm

            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
                if logs and "loss" in logs and "grad_norm" in logs:
                    curve.steps.append(curve.start_step + int(state.global_step))
                    curve.loss.append(float(logs["loss"]))
                    curve.grad_norm.append(float(logs["grad_norm"]))
                    curve.lr.append(float(logs.get("learning_rate", math.nan)))

        return _StepLog()


Start = str | Path | tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]
"""Where an arm starts: a model folder (Hugging Face, e.g. a checkpoint), or (config dict, state dict) in memory
(an average from ``iter_along_run``: ``(result.config, result.state_dict)``)."""


def _load_model(start: Start, device: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(start, str | Path):
        return AutoModelForCausalLM.from_pretrained(str(start), dtype=torch.float32).to(device)
    config, state = start
    cfg = dict(config)
    if "model_type" not in cfg:
        raise InputModelError("the start model's config has no model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).float()
    load_weights_into(model, state)
    return model.to(device)


def _rate(settings: ContinueSettings) -> Callable[[int], float]:
    n, warmup = settings.steps, settings.warmup_steps
    if settings.schedule == "anneal":
        return lambda s: max(0.0, 1.0 - s / n)  # the world's anneal
    if settings.schedule == "constant":
        return lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    decay = max(1, round(settings.decay_fraction * n))
    return lambda s: min(1.0, (s + 1) / max(1, warmup), (n - s) / decay)  # the world's fine-tuning


def train_arm(
    start: Start,
    data: Dataset,
    settings: ContinueSettings,
    *,
    tokenizer: Any,
    optimizer_state: str | Path | None = None,
    first_batch: int = 0,
    start_step: int = 0,
    lr_multiplier: Callable[[int], float] | None = None,
    save_every: int | None = None,
    out_dir: str | Path | None = None,
    collator: Any = None,
    callbacks: Sequence[Any] = (),
    scorer: ModelScorer | None = None,
    device: str = "cpu",
) -> TrainCurve:
    """Train one arm for ``settings.steps`` steps and return its per-step curve.

    The data is read in order from batch ``first_batch`` (``data[first_batch·B :]``), so two arms given the
    same data and ``first_batch`` see the same batches; the schedule is taken from step ``start_step`` on
    (``first_batch`` and ``start_step`` are where a resumed arm starts). ``lr_multiplier(s)`` multiplies the schedule's rate at
    step s (the deliberate spike). With ``save_every`` the Trainer writes ``checkpoint-<s>/`` (weights,
    optimizer, ``trainer_state.json`` with every step's loss) into ``out_dir``; without it the final model is
    saved there when ``out_dir`` is given. With ``scorer`` the final weights' held-out loss is recorded.
    """
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    from mergescale.world.train import _AnswerLossTrainer, _optimizer

    model = _load_model(start, device)
    opt = _optimizer(model, settings.lr, settings.weight_decay)
    if optimizer_state is not None and settings.optimizer == "carry":
        opt.load_state_dict(torch.load(optimizer_state, map_location=device, weights_only=True))
        for group in opt.param_groups:  # this arm's peak rate, as the world's anneal sets it
            group["lr"] = group["initial_lr"] = settings.lr
    base = _rate(settings)
    spike = lr_multiplier or (lambda s: 1.0)
    # the schedule goes on from start_step (a resumed arm does not warm up again)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: base(start_step + s) * spike(s))
    start_at = first_batch * settings.batch_size
    need = settings.steps * settings.batch_size
    if start_at + need > len(data):  # type: ignore[arg-type]
        raise ConfigError(
            f"the data has {len(data)} examples; {settings.steps} steps of {settings.batch_size} from batch "  # type: ignore[arg-type]
            f"{first_batch} need {start_at + need}"
        )
    part = Subset(data, range(start_at, start_at + need))
    tmp = None
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix="mergescale-arm-")
    target = Path(out_dir) if out_dir is not None else Path(tmp)  # type: ignore[arg-type]
    args = TrainingArguments(
        output_dir=str(target),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        logging_steps=1,
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500,
        save_total_limit=None,
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        dataloader_num_workers=0,
        seed=settings.seed,
        data_seed=settings.seed,
        max_grad_norm=settings.max_grad_norm,
        train_sampling_strategy="sequential",
    )
    curve = TrainCurve(start_step=start_step, out_dir=Path(out_dir) if out_dir is not None else None)
    trainer_cls = _AnswerLossTrainer if settings.answer_loss else Trainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=part,
        processing_class=tokenizer,
        data_collator=collator or default_data_collator,
        callbacks=[StepLog(curve), *callbacks],
        optimizers=(opt, sched),
    )
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
        if out_dir is not None and not save_every:
            trainer.save_model(str(out_dir))
        if scorer is not None:
            curve.heldout_loss = scorer.score(model.state_dict()).loss
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return curve


@dataclass
class PMAInitResult:
    """Two arms of continued training from the same data, seed and optimizer state: from the average and from
    the last checkpoint."""

    pma: TrainCurve
    last: TrainCurve
    averaged_steps: list[int]
    last_step: int | None


def pma_init(
    average: Any,
    last_checkpoint: str | Path,
    data: Dataset,
    settings: ContinueSettings,
    *,
    tokenizer: Any,
    scorer: ModelScorer | None = None,
    collator: Any = None,
    callbacks: Sequence[Any] = (),
    device: str = "cpu",
) -> PMAInitResult:
    """PMA-init: continue training once from ``average`` (a ``PMAResult`` in memory or in a folder, or a model
    folder) and once from ``last_checkpoint``, same data in the same order, same seed; both arms get the last
    checkpoint's optimizer state with ``settings.optimizer == "carry"``. Returns both per-step curves (loss,
    pre-clip gradient norm) and, with ``scorer``, each arm's final held-out loss."""
    from mergescale.pma.average import PMAResult

    last = Path(last_checkpoint)
    if isinstance(average, PMAResult):
        if average.state_dict is not None:
            start: Start = (
                average.config or read_model_config(last, "continuing from an average in memory"),
                average.state_dict,
            )
        elif average.out_dir is not None:
            start = average.out_dir
        else:
            raise ConfigError(f"{average.label}: the average was not computed (no state dict, no folder)")
        averaged = [int(s) for s in average.steps if s is not None]
    else:
        start, averaged = Path(average), []
    state = last / "optimizer.pt"
    opt = state if state.is_file() else None
    common = dict(tokenizer=tokenizer, optimizer_state=opt, scorer=scorer, collator=collator, device=device)
    pma = train_arm(start, data, settings, callbacks=callbacks, **common)  # type: ignore[arg-type]
    base = train_arm(last, data, settings, **common)  # type: ignore[arg-type]
    return PMAInitResult(pma=pma, last=base, averaged_steps=averaged, last_step=_step_of(last))


def _step_of(folder: Path) -> int | None:
    from mergescale.io.discover import step_from_name

    return step_from_name(folder.name)


@dataclass
class SpikeRecoveryResult:
    """The spiked copy of a run, the spike the detector found in its loss log, and three arms compared at the
    same step: resumed from the average of the K checkpoints before the spike, from the rollback checkpoint
    (the newest of them), and the unspiked control trained straight through.

    Steps are counted from the checkpoint the copy branched from. ``spike`` is None when the detector found
    nothing (then no arm resumed)."""

    injected_at: int
    spiked: TrainCurve
    spike: Any  # mergescale.pma.spikes.Spike | None
    detected_at: int | None
    averaged_steps: list[int]
    rollback_step: int | None
    from_average: TrainCurve | None
    from_rollback: TrainCurve | None
    unspiked: TrainCurve | None
    run_dir: Path | None = None


def spike_recovery(
    branch: str | Path,
    data: Dataset,
    spike: SpikeSettings,
    settings: ContinueSettings,
    *,
    tokenizer: Any,
    workdir: str | Path,
    rule: Any = None,
    scorer: ModelScorer | None = None,
    device: str = "cpu",
) -> SpikeRecoveryResult:
    """Train a copy of a run from checkpoint ``branch`` (with its optimizer state) for ``spike.steps`` steps at
    ``settings``' rate (use ``schedule="constant"`` for the stable phase), multiplied by ``spike.factor`` for
    ``spike.length`` steps from step ``spike.at``, saving checkpoints every ``spike.save_every`` steps into
    ``workdir/spiked``; find the spike in its loss log with the detector ``pma recover`` uses
    (:func:`~mergescale.pma.spikes.detect_spikes`, ``rule``); then resume for ``spike.resume_steps`` steps from
    (a) the SMA of the ``spike.k`` checkpoints before it and (b) the newest of them (both with the rollback
    checkpoint's optimizer state, on the same batches), against the unspiked copy trained straight to the same
    step. ``settings.steps`` is ignored (each part sets its own length)."""
    from mergescale.io.discover import discover_run
    from mergescale.pma.average import average_checkpoints
    from mergescale.pma.spikes import checkpoints_before, detect_spikes

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    branch = Path(branch)
    opt = branch / "optimizer.pt" if (branch / "optimizer.pt").is_file() else None
    # The loss logged at step s is measured before step s's update, on the weights of update s − 1; so for the
    # spike to show first in the loss of step `at`, the updates of steps at − 1 … at + length − 2 are spiked.
    lo, hi = spike.at - 1, spike.at - 1 + spike.length

    def spiked_rate(s: int) -> float:  # LambdaLR's s counts from 0: it sets the rate of step s + 1's update
        return spike.factor if lo <= s + 1 < hi else 1.0

    spiked_dir = work / "spiked"
    if spiked_dir.exists():
        shutil.rmtree(spiked_dir)
    run_settings = settings.model_copy(update={"steps": spike.steps})
    spiked = train_arm(
        branch, data, run_settings, tokenizer=tokenizer, optimizer_state=opt, lr_multiplier=spiked_rate,
        save_every=spike.save_every, out_dir=spiked_dir, scorer=scorer, device=device,
    )  # fmt: skip
    found = [s for s in detect_spikes(spiked.steps, spiked.loss, rule) if s.step >= spike.at]
    result = SpikeRecoveryResult(
        injected_at=spike.at, spiked=spiked, spike=found[0] if found else None,
        detected_at=found[0].step if found else None, averaged_steps=[], rollback_step=None,
        from_average=None, from_rollback=None, unspiked=None, run_dir=spiked_dir,
    )  # fmt: skip
    if not found:
        return result
    info = discover_run(spiked_dir)
    picked = checkpoints_before(info.steps, found[0], spike.k)
    if not picked:
        raise InputModelError(
            f"the spike at step {found[0].step} comes before the first checkpoint of {spiked_dir} "
            f"(saved every {spike.save_every} steps); inject it later"
        )
    window = [info.checkpoints[i] for i in picked]
    rollback = window[-1]
    r = int(rollback.step or 0)
    avg = average_checkpoints(None, work / "average", checkpoints=[c.path for c in window], overwrite=True,
                              progress=False)  # fmt: skip
    result.averaged_steps = [int(s) for s in avg.steps if s is not None]
    result.rollback_step = r
    resume = settings.model_copy(update={"steps": spike.resume_steps})
    state = rollback.path / "optimizer.pt"
    common = dict(tokenizer=tokenizer, optimizer_state=state if state.is_file() else None, first_batch=r,
                  start_step=r, scorer=scorer, device=device)  # fmt: skip
    result.from_average = train_arm(avg.out_dir, data, resume, **common)  # type: ignore[arg-type]
    result.from_rollback = train_arm(rollback.path, data, resume, **common)  # type: ignore[arg-type]
    control = settings.model_copy(update={"steps": r + spike.resume_steps})
    result.unspiked = train_arm(branch, data, control, tokenizer=tokenizer, optimizer_state=opt, scorer=scorer,
                                device=device)  # fmt: skip
    return result


def world_blocks(world: str | Path, block_size: int) -> Any:
    """The offline world's pre-training text packed into blocks (``mergescale.world.data.pack_documents``),
    as a dataset of ``input_ids``/``labels``, and its tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from mergescale.world.data import BlockDataset, pack_documents
    from mergescale.world.layout import WorldLayout

    lay = WorldLayout(Path(world))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(lay.tokenizer))
    docs = (lay.corpus / "pretrain.txt").read_text(encoding="utf-8").splitlines()
    return BlockDataset(pack_documents(tokenizer, docs, block_size)), tokenizer

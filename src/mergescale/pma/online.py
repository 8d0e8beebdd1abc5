"""Online averaging during training: :class:`PMAAverager` for any loop, :class:`PMACallback` for the HF Trainer.

The running average A over the weights M₁, M₂, … seen at each update (float32, on ``device``):

- ``sma`` (cumulative simple moving average): Aₙ = Aₙ₋₁ + (Mₙ − Aₙ₋₁)/n, i.e. Aₙ = (1/n) Σᵢ Mᵢ;
- ``ema``: A₁ = M₁, Aₙ = α·Mₙ + (1 − α)·Aₙ₋₁.

Both are ``torch.lerp`` in place, so an update costs one pass over the weights and no extra memory beyond the
average itself. Offline ``mergescale pma`` over the checkpoints saved at the same steps gives the same model
(up to float32 rounding): the tests check it on a real training run.

Distributed training (FSDP, DeepSpeed ZeRO-3): each rank holds only a shard, so this class cannot see whole
weights. Either average the full state dict gathered at save time (``accelerator.get_state_dict(model)`` on
rank 0, then ``PMAAverager.update(state_dict)``), or simply run ``mergescale pma`` offline on the saved
checkpoints, which streams one tensor at a time and needs no GPU at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from mergescale import __version__
from mergescale.errors import ConfigError, InputModelError
from mergescale.io.atomic import AtomicFolder
from mergescale.io.folders import copy_model_files
from mergescale.io.writer import ModelFolderSink
from mergescale.pma.record import PMA_JSON, PMARecord
from mergescale.pma.weights import DEFAULT_ALPHA

log = logging.getLogger(__name__)

STATE_DIR = "pma_state"  # inside each checkpoint-<step>/ folder
_STATE_TENSORS = "average.safetensors"
_STATE_JSON = "state.json"


def _state_dict(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, torch.nn.Module):
        return model_or_state.state_dict()
    return dict(model_or_state)


class PMAAverager:
    """A running average of a model's weights, for any training loop.

    Args:
        strategy: ``"sma"`` (cumulative mean of every update) or ``"ema"``.
        alpha: the EMA's α in (0, 1] (ignored by ``sma``).
        device: where the float32 average lives: ``"cpu"`` (default; costs a device-to-host copy per update
            on GPU), a device string, or ``"model"`` for the device of the weights it is updated with.

    Example::

        averager = PMAAverager("ema", alpha=0.2)
        for step, batch in enumerate(loader, 1):
            ...; optimizer.step()
            if step % 100 == 0:
                averager.update(model, step=step)
        averager.save_pretrained("out/pma", model=model)

    Tied weights (one tensor under two names, e.g. embeddings and ``lm_head``) are averaged once, under the
    first name. Floating-point tensors are averaged; integer buffers keep their latest value.
    """

    def __init__(
        self, strategy: str = "sma", alpha: float = DEFAULT_ALPHA, device: str | torch.device = "cpu"
    ) -> None:
        if strategy not in ("sma", "ema"):
            raise ConfigError(f"online averaging supports 'sma' and 'ema', not {strategy!r}")
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"EMA alpha must be in (0, 1], got {alpha}")
        self.strategy = strategy
        self.alpha = float(alpha)
        self.device = device
        self.count = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self._average: dict[str, torch.Tensor] = {}  # name -> float32 average (or latest value for integers)
        self._dtypes: dict[str, torch.dtype] = {}  # name -> dtype of the model's tensor

    def _target(self, t: torch.Tensor) -> torch.device:
        return t.device if self.device == "model" else torch.device(self.device)

    @torch.no_grad()
    def update(
        self, model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], step: int | None = None
    ) -> None:
        """Fold the current weights into the average (a model, or a state dict of full tensors)."""
        state = _state_dict(model_or_state)
        if self.count == 0:
            names = self._dedup(state)
            self._dtypes = {n: state[n].dtype for n in names}
            self._average = {}
        elif set(self._dtypes) - set(state):
            missing = sorted(set(self._dtypes) - set(state))[0]
            raise InputModelError(f"the model has no tensor {missing!r}, which earlier updates had")
        self.count += 1
        weight = 1.0 / self.count if self.strategy == "sma" else self.alpha
        for name in self._dtypes:
            x = state[name].detach()
            if not x.is_floating_point():
                self._average[name] = x.to(self._target(x), copy=True)
                continue
            xf = x.to(self._target(x), torch.float32)  # (*shape)
            acc = self._average.get(name)
            if acc is None:
                self._average[name] = xf.clone() if xf.data_ptr() == x.data_ptr() else xf
            else:
                if acc.device != xf.device:  # restored on the CPU, updated on the model's device
                    acc = self._average[name] = acc.to(xf.device)
                acc.lerp_(xf, weight)  # acc += weight · (x − acc)
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step

    @staticmethod
    def _dedup(state: Mapping[str, torch.Tensor]) -> list[str]:
        """Names in order, skipping a name whose tensor is the same storage as an earlier one (tied weights)."""
        seen: set[tuple[int, int, tuple[int, ...]]] = set()
        names = []
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if t.numel() and key in seen:
                continue
            seen.add(key)
            names.append(name)
        return names

    def averaged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The average, each tensor cast to the model's dtype for it (or ``dtype`` for floating tensors)."""
        if self.count == 0:
            raise ConfigError("the averager has not been updated yet")
        out = {}
        for name, t in self._average.items():
            target = (dtype or self._dtypes[name]) if t.is_floating_point() else self._dtypes[name]
            out[name] = t.to(target)
        return out

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into ``model`` in place (e.g. to evaluate them)."""
        params = model.state_dict()
        for name, t in self._average.items():
            params[name].copy_(t)

    # -- state, for checkpoints and resuming ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, counters and the float32 average."""
        return {
            "strategy": self.strategy,
            "alpha": self.alpha,
            "count": self.count,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "dtypes": {n: str(d).removeprefix("torch.") for n, d in self._dtypes.items()},
            "average": dict(self._average),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the strategy and alpha must match this averager's)."""
        if state["strategy"] != self.strategy or float(state["alpha"]) != self.alpha:
            raise ConfigError(
                f"saved PMA state is {state['strategy']} (alpha {state['alpha']}), but this averager is "
                f"{self.strategy} (alpha {self.alpha})"
            )
        self.count = int(state["count"])
        self.first_step = state.get("first_step")
        self.last_step = state.get("last_step")
        self._dtypes = {n: getattr(torch, d) for n, d in state["dtypes"].items()}
        self._average = {n: t.to(self._target(t)) for n, t in state["average"].items()}

    def save_state(self, folder: str | Path) -> Path:
        """Write the state as ``folder/average.safetensors`` + ``folder/state.json`` (no pickle)."""
        folder = Path(folder)
        atomic = AtomicFolder(folder, overwrite=True)
        tmp = atomic.create()
        try:
            state = self.state_dict()
            tensors = {n: t.detach().to("cpu").contiguous() for n, t in state.pop("average").items()}
            save_file(tensors, str(tmp / _STATE_TENSORS))
            (tmp / _STATE_JSON).write_text(
                json.dumps({**state, "mergescale_version": __version__}, indent=2) + "\n"
            )
            atomic.commit()
        except BaseException:
            atomic.abort()
            raise
        return folder

    def load_state(self, folder: str | Path) -> None:
        """Restore what :meth:`save_state` wrote."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / _STATE_JSON).read_text())
            average = load_file(str(folder / _STATE_TENSORS))
        except (OSError, ValueError) as exc:
            raise InputModelError(f"{folder}: cannot read the PMA state ({exc})") from None
        meta.pop("mergescale_version", None)
        self.load_state_dict({**meta, "average": average})

    # -- output ---------------------------------------------------------------------------------------------
    def record(self, every: int | None = None, start_step: int | None = None) -> PMARecord:
        """What ``pma.json`` of an online average says (``every`` and ``start_step``: the schedule, when known)."""
        return PMARecord(
            mergescale_version=__version__,
            mode="online",
            strategy=self.strategy,
            alpha=self.alpha if self.strategy == "ema" else None,
            updates=self.count,
            first_step=self.first_step,
            last_step=self.last_step,
            every=every,
            start_step=start_step,
        )

    def save_pretrained(
        self,
        path: str | Path,
        model: torch.nn.Module | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        copy_from: str | Path | None = None,
        dtype: torch.dtype | None = None,
        overwrite: bool = True,
        record: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> Path:
        """Write the average as a Hugging Face model folder, atomically.

        With a ``transformers`` ``model``, its own ``save_pretrained`` writes the averaged state dict (so tied
        weights, config and generation config are handled the Hugging Face way); otherwise the tensors are
        written as safetensors with ``config`` (a dict) as ``config.json``. Tokenizer files are copied from
        ``copy_from`` when given, or written by ``tokenizer.save_pretrained``; ``pma.json`` records the
        averager's settings (:class:`~mergescale.pma.record.PMARecord`; ``record`` adds its ``every`` and
        ``start_step``).
        """
        path = Path(path)
        extra = dict(record or {})
        unknown = sorted(set(extra) - {"every", "start_step"})
        if unknown:
            raise ConfigError(f"{PMA_JSON} of an online average has no field {unknown[0]!r} (every, start_step)")
        averaged = self.averaged_state_dict(dtype)
        text = self.record(**extra).to_json()
        if model is not None and hasattr(model, "save_pretrained"):
            atomic = AtomicFolder(path, overwrite=overwrite)
            tmp = atomic.create()
            try:
                model.save_pretrained(tmp, state_dict=averaged, safe_serialization=True)
                if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                    tokenizer.save_pretrained(tmp)
                if copy_from is not None:
                    copy_model_files(Path(copy_from), tmp, keep_existing=True)
                (tmp / PMA_JSON).write_text(text)
                atomic.commit()
            except BaseException:
                atomic.abort()
                raise
            return path
        sink = ModelFolderSink(
            path,
            config=dict(config) if config is not None else None,
            copy_from=Path(copy_from) if copy_from is not None else None,
            extra_files={PMA_JSON: text},
            overwrite=overwrite,
        )
        sink.begin([(n, tuple(t.shape), t.dtype) for n, t in averaged.items()])
        try:
            for name, t in averaged.items():
                sink.write(name, t)
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        return path


class PMACallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that keeps a running average of the weights during training.

    Every ``every`` optimizer steps from ``start_step`` on (steps s ≥ start_step with s % every == 0) the
    weights are folded into an SMA or EMA (see :class:`PMAAverager`). At every checkpoint save the average is
    written as an ordinary Hugging Face folder ``<output_dir>/pma-<step>/`` beside ``checkpoint-<step>/``
    (tokenizer files copied from it), and the averager's state goes into ``checkpoint-<step>/pma_state/``;
    once more ``pma-<step>/`` at the end of training. Resuming with ``trainer.train(resume_from_checkpoint=...)``
    restores the state from ``checkpoint-<step>/pma_state/`` under ``output_dir``, so a resumed run gives the
    same average as an uninterrupted one (call :meth:`load_state` first when resuming from elsewhere).

    Args:
        strategy: ``"sma"`` or ``"ema"``.
        alpha: EMA α.
        every: update every this many optimizer steps; with ``every = save_steps`` the average is over exactly
            the saved checkpoints, like offline ``mergescale pma``.
        start_step: first step that may be averaged (skip warm-up).
        device: where the average lives (``"cpu"``, a device, or ``"model"``).
        eval_pma: at each evaluation also evaluate the averaged weights on the eval set and log
            ``eval_pma_loss`` beside ``eval_loss`` (briefly swaps the weights; needs a copy of them in memory).
        save_folders: write ``pma-<step>/`` folders (the state is saved with checkpoints either way).
    """

    def __init__(
        self,
        strategy: str = "sma",
        alpha: float = DEFAULT_ALPHA,
        every: int = 1,
        start_step: int = 0,
        device: str = "cpu",
        eval_pma: bool = False,
        save_folders: bool = True,
    ) -> None:
        if every < 1 or start_step < 0:
            raise ConfigError(f"every must be >= 1 and start_step >= 0, got {every} and {start_step}")
        self.averager = PMAAverager(strategy, alpha, device)
        self.every = every
        self.start_step = start_step
        self.eval_pma = eval_pma
        self.save_folders = save_folders
        self.last_written: Path | None = None

    def load_state(self, checkpoint_dir: str | Path) -> None:
        """Restore the average saved with a checkpoint (``<checkpoint_dir>/pma_state``)."""
        self.averager.load_state(Path(checkpoint_dir) / STATE_DIR)

    def _record(self) -> dict[str, int]:
        return {"every": self.every, "start_step": self.start_step}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0 or self.averager.last_step == state.global_step:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if (ckpt / STATE_DIR).is_dir():
            self.load_state(ckpt)
            log.info("PMA: restored the average of %d updates from %s", self.averager.count, ckpt)
        elif state.global_step >= self.start_step:
            log.warning(
                "PMA: resuming at step %d but %s has no %s/; the average restarts here "
                "(call PMACallback.load_state(checkpoint) before train() when resuming from elsewhere)",
                state.global_step,
                ckpt,
                STATE_DIR,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if model is not None and step >= self.start_step and step % self.every == 0:
            self.averager.update(model, step=step)

    def _write(self, args: Any, state: Any, model: Any, tokenizer: Any = None) -> None:
        if not self.save_folders or self.averager.count == 0 or not state.is_world_process_zero:
            return
        out = Path(args.output_dir) / f"pma-{state.global_step}"
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # tokenizer files: from the checkpoint saved at this step, else from the Trainer's processing class
        self.averager.save_pretrained(
            out,
            model=model,
            copy_from=ckpt if ckpt.is_dir() else None,
            tokenizer=None if ckpt.is_dir() else tokenizer,
            record=self._record(),
        )
        self.last_written = out

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and self.averager.count > 0:
            self.averager.save_state(ckpt / STATE_DIR)
        self._write(args, state, model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.last_written != Path(args.output_dir) / f"pma-{state.global_step}":
            self._write(args, state, model, kwargs.get("processing_class"))

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, float] | None = None,
        model: Any = None,
        eval_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self.eval_pma or self.averager.count == 0 or model is None or eval_dataloader is None:
            return
        loss = averaged_eval_loss(model, self.averager, eval_dataloader)
        if metrics is not None:
            metrics["eval_pma_loss"] = loss
        state.log_history.append({"eval_pma_loss": loss, "epoch": state.epoch, "step": state.global_step})


@torch.no_grad()
def averaged_eval_loss(model: torch.nn.Module, averager: PMAAverager, dataloader: Any) -> float:
    """Mean loss of the averaged weights over ``dataloader`` (batches weighted by size, as the Trainer does).

    The model's own weights are kept aside on the CPU and put back afterwards.
    """
    backup = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
    was_training = model.training
    total, count = 0.0, 0
    try:
        averager.copy_to(model)
        model.eval()
        device = next(model.parameters()).device
        for batch in dataloader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**batch)
            size = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
            total += float(out.loss) * size
            count += size
    finally:
        params = model.state_dict()
        for name, t in backup.items():
            params[name].copy_(t)
        model.train(was_training)
    return total / max(count, 1)

"""A group's model in memory, whose weights are swapped for each model the study evaluates.

One ``transformers`` model per group is built once from the base folder (its architecture, tokenizer and tied
weights); every merge of the group is evaluated by copying its state dict into that model's parameters (no disk
round trip, no re-initialisation), and every baseline or scratch-written merge by copying its tensors one at a
time from its folder. The same :class:`~mergescale.evaluate.Evaluator` then serves them all, so the tasks are
tokenised once per tokenizer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mergescale.errors import InputModelError
from mergescale.evaluate.loading import parse_dtype
from mergescale.io.checkpoint import open_checkpoint
from mergescale.study.spec import EvalSpec


class UndefinedScoreWarning(UserWarning):
    """A task's score is undefined (non-finite log-likelihoods of a broken merge)."""


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task on one split; ``value`` None when undefined (e.g. NaN weights)."""

    task: str
    eval_split: str
    metric: str
    value: float | None
    primary: bool


class GroupModel:
    """The evaluation model of one group (built from its base folder) and its evaluator."""

    def __init__(self, base_path: str, settings: EvalSpec) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mergescale.evaluate import Evaluator

        self.settings = settings
        dtype = parse_dtype(settings.dtype)
        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=False)
                self.model = AutoModelForCausalLM.from_pretrained(
                    base_path, dtype=dtype if dtype is not None else "auto", trust_remote_code=False
                )
        except Exception as exc:  # transformers raises many types with long messages
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputModelError(f"{base_path}: cannot load the model to evaluate: {first}") from None
        self.model.to(settings.device).eval()
        # a broken merge (NaN weights) gets undefined scores, with a warning, rather than stopping the study
        self.evaluator = Evaluator(
            self.model, self.tokenizer, batch_size=settings.batch_size, on_nonfinite="undefined", name=base_path
        )
        self._targets = _targets(self.model)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._targets.values())

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a merged state dict into the model (tied heads, absent from merges, follow their embedding; stored
        names that differ from the model's, as for Mixture-of-Experts weights, are converted)."""
        from mergescale.pma.curves import load_weights_into

        with torch.no_grad():
            load_weights_into(self.model, state_dict)

    def load_folder(self, path: str) -> None:
        """Copy a model folder's weights into the model, one tensor at a time (all at once only when its stored
        names need converting to the model's)."""
        from mergescale.pma.curves import is_tied_head

        source = open_checkpoint(path)
        try:
            names = list(source.info())
            if not set(names) <= set(self._targets):
                self.load_state_dict({n: source.read(n) for n in names})
                return
            with torch.no_grad():
                for name in names:
                    self._targets[name].copy_(source.read(name))
            missing = [n for n in self._targets if n not in set(names) and not is_tied_head(self.model, n)]
            if missing:
                raise InputModelError(f"{path}: no weights for {missing[0]!r} ({len(missing)} missing)")
        finally:
            source.close()

    def score(self, tasks: Sequence[Any], split: str = "test") -> list[TaskScore]:
        """Every metric of each task on ``split``; non-finite values become undefined, with a warning."""
        out: list[TaskScore] = []
        if self.settings.backend == "lm-eval":
            from mergescale.evaluate import evaluate

            results = evaluate(
                self.model, [t if isinstance(t, str) else t.name for t in tasks], tokenizer=self.tokenizer,
                limit=self.settings.limit, batch_size=self.settings.batch_size, backend="lm-eval", progress=False,
                on_nonfinite="undefined",
            )  # fmt: skip
            items = [(name, r) for name, r in results.tasks.items()]
        else:
            items = []
            for task in tasks:
                result, _ = self.evaluator.run_task(task, split=split, limit=self.settings.limit)
                items.append((task.name, result))
        for name, result in items:
            for metric, value in result.metrics.items():
                defined = value is not None and math.isfinite(value)
                if not defined:
                    warnings.warn(
                        f"task {name!r}: {metric} is not finite; its score is undefined", UndefinedScoreWarning,
                        stacklevel=2,
                    )  # fmt: skip
                out.append(
                    TaskScore(name, split, metric, float(value) if defined else None, metric == result.primary_metric)
                )
        return out


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-load progress bars or info logs from transformers for the duration; restored after."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _targets(model: Any) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name (tied ones appear under each name)."""
    return dict(model.state_dict(keep_vars=True).items())

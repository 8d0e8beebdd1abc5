"""Evaluating PMA curves: held-out loss and task scores of averages in memory, beside the checkpoint at the same
step and the annealed model, and the share of the anneal's gain the average recovers.

The pre-training paper (Li et al. 2025, https://arxiv.org/abs/2505.12082) compares, along the stable phase, the
average of the window ending at step t with the checkpoint at t, and at the end with the annealed model. The
share of the anneal's gain recovered is (PMA − last) / (annealed − last), for a loss or a score alike (both
differences have the sign of an improvement).

:class:`ModelScorer` keeps one model object and reloads its weights from each state dict (no disk round trip,
no model construction per point), and the tasks' tokenised examples are cached by ``mergescale.evaluate``, so
a curve of a hundred points costs a hundred forward passes over the evaluation data and little else.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergescale.errors import ConfigError, InputModelError
from mergescale.io.checkpoint import open_checkpoint
from mergescale.pma.average import PMAResult, PMASettings


def recovered_share(pma: float | None, last: float | None, annealed: float | None) -> float | None:
    """(PMA − last) / (annealed − last): 1 when the average is as good as the anneal, 0 when no better than the
    last checkpoint. None (undefined) when the anneal changed nothing (annealed == last) or a value is missing
    or not finite.

    >>> recovered_share(2.5, 3.0, 2.0)
    0.5
    """
    if pma is None or last is None or annealed is None:
        return None
    if not all(math.isfinite(x) for x in (pma, last, annealed)) or annealed == last:
        return None
    return (pma - last) / (annealed - last)


@dataclass(frozen=True)
class Scores:
    """What one model scored: held-out loss (mean token NLL, nats) and the primary metric of each task."""

    loss: float | None
    scores: dict[str, float] = field(default_factory=dict)


class ModelScorer:
    """Scores state dicts (or model folders) of one architecture on held-out text and tasks.

    Args:
        config: the model's ``config.json`` as a dict (e.g. ``PMAResult.config``) or a folder holding it.
        tokenizer: a tokenizer, or a folder to load one from.
        heldout: held-out text for the validation loss: a perplexity task YAML (the world's
            ``tasks/pretrain_val.yaml``), a :class:`~mergescale.evaluate.Task`, or a text / JSONL file
            (:func:`mergescale.pma.heldout.load_texts`); None for no loss.
        tasks: tasks to score (a suite YAML, a task YAML, Tasks...; anything ``evaluate`` takes).
        limit: examples per task.
        heldout_limit: score only the first this many held-out documents (all by default). Evaluation is
            nearly all of a curve's cost (measured on the quick world: 96 %), so this is the knob for speed.
        batch_size, device: for ``mergescale.evaluate.evaluate``.

    The model is float32; each :meth:`score` loads the given weights into it (any float dtype).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str | Path,
        tokenizer: Any,
        *,
        heldout: Any = None,
        tasks: Any = None,
        limit: int | None = None,
        heldout_limit: int | None = None,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from mergescale.evaluate import load_tasks

        if isinstance(config, str | Path):
            path = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise InputModelError(f"{path}: cannot read the model config ({exc})") from None
        cfg = dict(config)
        if "model_type" not in cfg:
            raise InputModelError("the model config has no model_type; cannot build a model to score")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer)) if isinstance(tokenizer, str | Path) else tokenizer
        model_type = cfg.pop("model_type")
        self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).float().to(device).eval()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.heldout = self._heldout_task(heldout) if heldout is not None else None
        self.tasks = load_tasks(tasks) if tasks is not None else []
        self.limit, self.heldout_limit, self.batch_size, self.device = limit, heldout_limit, batch_size, device

    def _heldout_task(self, heldout: Any) -> Any:
        from mergescale.evaluate import Task, load_task
        from mergescale.evaluate.tasks import TaskData

        if isinstance(heldout, Task):
            return heldout
        path = Path(heldout)
        if path.suffix in (".yaml", ".yml"):
            task = load_task(path)
            if task.kind != "perplexity":
                raise ConfigError(f"{path}: the held-out loss needs a perplexity task, this one is {task.kind}")
            return task
        from mergescale.pma.heldout import load_texts

        texts = load_texts(path)
        self._tmp = tempfile.TemporaryDirectory(prefix="mergescale-heldout-")
        data = Path(self._tmp.name) / "heldout.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return Task(name="heldout", kind="perplexity", data=TaskData(test=str(data)), metrics=["loss", "ppl"])

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """Put ``state_dict``'s weights into the model (tied heads may be absent) and return it."""
        load_weights_into(self.model, state_dict)
        return self.model

    @torch.no_grad()
    def score(self, state_dict: Mapping[str, torch.Tensor]) -> Scores:
        """Held-out loss and task scores of the model with these weights."""
        from mergescale.evaluate import evaluate

        model = self.load(state_dict)
        loss = None
        if self.heldout is not None:
            res = evaluate(model, [self.heldout], tokenizer=self.tokenizer, limit=self.heldout_limit,
                           batch_size=self.batch_size, progress=False)  # fmt: skip
            loss = res.score(self.heldout.name)
            loss = loss if math.isfinite(loss) else math.inf
        scores: dict[str, float] = {}
        if self.tasks:
            res = evaluate(
                model, self.tasks, tokenizer=self.tokenizer, limit=self.limit, batch_size=self.batch_size,
                progress=False,
            )  # fmt: skip
            scores = {name: float(v) for name, v in res.scores().items()}
        return Scores(loss, scores)

    def score_folder(self, folder: str | Path) -> Scores:
        """Scores of the weights in a model folder or checkpoint (read tensor by tensor, no model built)."""
        source = open_checkpoint(folder)
        try:
            state = {n: source.read(n) for n in source.info()}
        finally:
            source.close()
        return self.score(state)


def load_weights_into(model: Any, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a checkpoint's tensors (names as stored on disk) into ``model``.

    Usually the names are the model's own. Where transformers stores weights differently from how it holds them
    (5.x keeps Mixture-of-Experts weights stacked per layer but saves one tensor per expert), the tensors are
    written to a temporary folder and loaded with ``from_pretrained``, which converts them.
    """
    state = dict(state_dict)
    own = model.state_dict()
    if set(state) - set(own):
        state = _converted(model, state)
    result = model.load_state_dict(state, strict=False)
    missing = [n for n in result.missing_keys if not is_tied_head(model, n)]
    if missing:
        raise InputModelError(f"no weights for {missing[0]!r} ({len(missing)} missing)")
    if result.unexpected_keys:
        raise InputModelError(f"weights for {result.unexpected_keys[0]!r}, which the model does not have")


def _converted(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="mergescale-convert-") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        loaded = type(model).from_pretrained(tmp, dtype=torch.float32)
        return {k: v.detach().clone() for k, v in loaded.state_dict().items()}


def is_tied_head(model: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` is an output head tied to the input embeddings (merges and averages omit it)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight and name.endswith("lm_head.weight")


@dataclass(frozen=True)
class CurvePoint:
    """One average of a curve or ablation, evaluated beside the checkpoint at its end and the annealed model.

    Attributes:
        strategy, alpha, n, interval: the settings (alpha only for EMA; interval as given, None for none).
        end_step: the requested end step; ``steps`` the checkpoints averaged (the newest is ``steps[-1]``).
        loss, scores: the average's held-out loss and task scores.
        last_loss, last_scores: the checkpoint at ``steps[-1]``.
        annealed_loss, annealed_scores: the annealed model (None / empty without one).
        recovered_share: (loss − last_loss) / (annealed_loss − last_loss); None when undefined.
        recovered_scores: the same share per task score.
        label: e.g. ``ema0.2-N6-V50-end800``.
    """

    strategy: str
    alpha: float | None
    n: int
    interval: str | None
    end_step: int
    steps: tuple[int, ...]
    loss: float | None
    scores: dict[str, float]
    last_loss: float | None
    last_scores: dict[str, float]
    annealed_loss: float | None
    annealed_scores: dict[str, float]
    recovered_share: float | None
    recovered_scores: dict[str, float | None]
    label: str

    @property
    def beats_last(self) -> bool | None:
        """Whether the average's held-out loss is below the checkpoint's (None without losses)."""
        if self.loss is None or self.last_loss is None:
            return None
        return self.loss < self.last_loss


def curve_point(result: PMAResult, mine: Scores, last: Scores, annealed: Scores | None) -> CurvePoint:
    """A :class:`CurvePoint` from an average (``PMAResult``) and the three models' scores."""
    s: PMASettings = result.settings
    rec = result.record
    ann_scores = annealed.scores if annealed is not None else {}
    return CurvePoint(
        strategy=rec.strategy,
        alpha=rec.alpha,
        n=rec.window,
        interval=rec.interval,
        end_step=int(s.end) if s.end is not None else int(result.steps[-1] or 0),
        steps=tuple(int(x) for x in result.steps if x is not None),
        loss=mine.loss,
        scores=dict(mine.scores),
        last_loss=last.loss,
        last_scores=dict(last.scores),
        annealed_loss=annealed.loss if annealed is not None else None,
        annealed_scores=dict(ann_scores),
        recovered_share=recovered_share(mine.loss, last.loss, annealed.loss if annealed is not None else None),
        recovered_scores={k: recovered_share(v, last.scores.get(k), ann_scores.get(k)) for k, v in mine.scores.items()},
        label=rec.label,
    )


class _CheckpointScores:
    """Scores of checkpoints and the annealed model, each computed once."""

    def __init__(self, scorer: ModelScorer) -> None:
        self.scorer = scorer
        self.cache: dict[Path, Scores] = {}

    def __call__(self, folder: Path) -> Scores:
        if folder not in self.cache:
            self.cache[folder] = self.scorer.score_folder(folder)
        return self.cache[folder]


def evaluate_points(
    results: Iterable[PMAResult], scorer: ModelScorer, *, annealed: str | Path | None = None,
    checkpoint_scores: _CheckpointScores | None = None,
) -> list[CurvePoint]:  # fmt: skip
    """Evaluate averages held in memory (``result.state_dict``, as :func:`~mergescale.pma.along_run.iter_along_run`
    and :func:`~mergescale.pma.ablation.iter_ablation` yield them) or in folders (``result.out_dir``)."""
    ckpt = checkpoint_scores or _CheckpointScores(scorer)
    ann = ckpt(Path(annealed)) if annealed is not None else None
    points = []
    for r in results:
        if r.state_dict is not None:
            mine = scorer.score(r.state_dict)
        elif r.out_dir is not None:
            mine = scorer.score_folder(r.out_dir)
        else:
            raise ConfigError(f"{r.label}: not computed yet (no state dict and no folder)")
        points.append(curve_point(r, mine, ckpt(r.checkpoints[-1].path), ann))
    return points


def curve_points(
    run_dir: str | Path,
    settings: PMASettings | Sequence[PMASettings],
    scorer: ModelScorer,
    *,
    ends: Sequence[int] | None = None,
    last: int | None = None,
    annealed: str | Path | None = None,
    max_outputs: int | None = 64,
    device: str = "cpu",
    workers: int | None = None,
) -> list[CurvePoint]:
    """The PMA curves of a run, evaluated: every point of :func:`~mergescale.pma.along_run.plan_along_run`
    (each setting's window ending at every checkpoint step where it is full, or at ``ends``), computed in
    memory in batches of ``max_outputs`` and scored with ``scorer`` beside the checkpoint at its end step and
    the ``annealed`` model."""
    from mergescale.pma.along_run import iter_along_run, plan_along_run

    plan = plan_along_run(run_dir, settings, ends=ends, last=last)
    ckpt = _CheckpointScores(scorer)
    points: list[CurvePoint] = []
    for batch in iter_along_run(plan, max_outputs=max_outputs, device=device, progress=False, workers=workers):
        points += evaluate_points(batch, scorer, annealed=annealed, checkpoint_scores=ckpt)
        for r in batch:
            r.state_dict = None  # let the batch's tensors go
    return points


def ablation_points(
    run_dir: str | Path,
    settings: Sequence[PMASettings],
    ends: Sequence[int],
    scorer: ModelScorer,
    *,
    annealed: str | Path | None = None,
    device: str = "cpu",
) -> list[CurvePoint]:
    """The N × V × strategy ablation at ``ends`` (see :func:`~mergescale.pma.ablation.iter_ablation`), each end
    step's averages from one read, evaluated like :func:`curve_points`. Settings that do not fit at a step are left
    out (as :class:`~mergescale.pma.ablation.AblationStep` lists them)."""
    from mergescale.pma.ablation import iter_ablation

    ckpt = _CheckpointScores(scorer)
    points: list[CurvePoint] = []
    for step in iter_ablation(run_dir, settings, ends, device=device, progress=False):
        points += evaluate_points(step.results, scorer, annealed=annealed, checkpoint_scores=ckpt)
        for r in step.results:
            r.state_dict = None
    return points

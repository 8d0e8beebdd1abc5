"""``evaluate()``: score a model on tasks and return :class:`EvalResults`.

Order of work: resolve the tasks (cached by file stamps) → load the model once → for each task: encode its
examples (cached per task, tokenizer and settings) → score in sorted batches → metrics → results. A study that
calls ``evaluate`` thousands of times on models in memory pays for loading and tokenising the tasks once.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from mergescale import __version__
from mergescale.device import check_device
from mergescale.errors import ConfigError, NonFiniteError, NonFiniteScoreWarning, TaskError
from mergescale.evaluate import metrics as M
from mergescale.evaluate.encoding import (
    EncoderSettings,
    LoglikelihoodRequest,
    encode_batch,
    encode_choice_requests,
    encode_rolling_requests,
)
from mergescale.evaluate.generation import generate_greedy
from mergescale.evaluate.loading import load_model
from mergescale.evaluate.prompts import build_contexts
from mergescale.evaluate.prompts import continuations as prompt_continuations
from mergescale.evaluate.results import EvalResults, EvalSettings, TaskResult, category_means
from mergescale.evaluate.scoring import score_loglikelihoods
from mergescale.evaluate.tasks import Suite, Task, load_tasks

TaskSource = str | Path | Task | Suite | Sequence[Task]
OnNonFinite = Literal["raise", "undefined"]


def evaluate(
    model: Any,
    tasks: TaskSource,
    *,
    tokenizer: Any | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    log_samples: bool = False,
    progress: bool = True,
    split: str = "test",
    backend: str = "mergescale",
    include_path: str | Path | None = None,
    trust_remote_code: bool = False,
    on_nonfinite: OnNonFinite = "raise",
) -> EvalResults:
    """Evaluate ``model`` on ``tasks`` and return per-task metrics, category means and the model's identity.

    Args:
        model: a Hugging Face folder, a Hub id, or a ``PreTrainedModel`` already in memory (used on its own
            device and dtype; then ``tokenizer`` is required unless ``model.name_or_path`` is a folder with one).
        tasks: a task YAML, a folder of task YAMLs, a ``suite.yaml``, a Task, a list of Tasks or a Suite.
            With ``backend="lm-eval"``: harness task names (a list or ``"a,b"``).
        limit: score only the first ``limit`` examples of each task.
        batch_size: examples per forward pass (each example carries all its choices).
        device, dtype: where and in which precision a loaded model runs (e.g. ``"cuda"``, ``"bfloat16"``).
        log_samples: keep per-example logs (``EvalResults.samples``; ``save`` writes ``samples.jsonl``).
        progress: show a progress bar per task.
        split: which data split to score (``test`` unless told otherwise, e.g. ``validation`` for model
            selection).
        backend: ``"mergescale"`` (this scorer) or ``"lm-eval"`` (lm-evaluation-harness, optional extra).
        include_path: extra task folder for the harness (``backend="lm-eval"``).
        trust_remote_code: let transformers run code shipped with the model (its ``auto_map``); off by default,
            and a model that asks for it is refused with an error (never a prompt).
        on_nonfinite: what a NaN or infinite log-likelihood (a model with NaN / Inf weights; for generation
            tasks, non-finite logits) does: ``"raise"`` (default) raises :class:`~mergescale.errors.NonFiniteError`
            naming the model and the task, never a score; ``"undefined"`` (for a study that must go on) sets
            every metric of that task to NaN, says why in ``TaskResult.undefined`` and warns
            (:class:`~mergescale.errors.NonFiniteScoreWarning`). Category means leave NaN scores out.

    Example::

        results = evaluate("out/merged", "world/tasks/suite.yaml", limit=200)
        results.score("sentiment")          # primary metric (first of the task's metrics)
    """
    check_device(device)
    if backend == "lm-eval":
        from mergescale.evaluate.lm_eval_backend import evaluate_lm_eval

        return evaluate_lm_eval(
            model, tasks, tokenizer=tokenizer, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
            log_samples=log_samples, include_path=include_path, trust_remote_code=trust_remote_code,
            on_nonfinite=on_nonfinite,
        )  # fmt: skip
    if backend != "mergescale":
        raise ConfigError(f"unknown evaluation backend {backend!r}; available: lm-eval, mergescale")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    check_on_nonfinite(on_nonfinite)
    task_list = load_tasks(tasks)
    loaded = load_model(
        model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )
    evaluator = Evaluator(
        loaded.model,
        loaded.tokenizer,
        batch_size=batch_size,
        on_nonfinite=on_nonfinite,
        name=loaded.identity.path or loaded.identity.name,
    )
    results: dict[str, TaskResult] = {}
    samples: list[dict[str, Any]] = []
    with _progress_bars(progress) as bar_for:
        for task in task_list:
            result, task_samples = evaluator.run_task(
                task,
                split=split,
                limit=limit,
                log_samples=log_samples,
                on_progress=bar_for(task.name, task, split, limit),
            )
            results[task.name] = result
            samples.extend(task_samples)
    out = EvalResults(
        mergescale_version=__version__,
        model=loaded.identity,
        settings=EvalSettings(
            limit=limit,
            batch_size=batch_size,
            device=str(next(loaded.model.parameters()).device),
            dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            split=split,
        ),
        tasks=results,
        categories=category_means(results),
    )
    out.set_samples(samples)
    return out


class Evaluator:
    """Scores tasks on one model; tokenised tasks are cached on the task objects, keyed by tokenizer.

    A caller that scores many models with one tokenizer (a study: every merge of one base) keeps one Evaluator
    and swaps the weights of its ``model`` in place: tasks resolved by :meth:`resolve_tasks` and their encodings
    are then loaded and tokenised once.

    ``on_nonfinite`` is :func:`evaluate`'s: ``"raise"`` (a NaN / infinite log-likelihood raises
    :class:`~mergescale.errors.NonFiniteError`) or ``"undefined"`` (the task's metrics are NaN,
    ``TaskResult.undefined`` says why, and a :class:`~mergescale.errors.NonFiniteScoreWarning` is issued).
    ``name`` names the model in those messages (default: its ``name_or_path``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        on_nonfinite: OnNonFinite = "raise",
        name: str | None = None,
    ) -> None:
        check_on_nonfinite(on_nonfinite)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.on_nonfinite = on_nonfinite
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        self.settings = EncoderSettings.for_model(tokenizer, getattr(model, "config", None))
        self.tokenizer_key = tokenizer_fingerprint(tokenizer)
        self._loaded: dict[str, tuple[tuple, list[Task]]] = {}

    def resolve_tasks(self, tasks: TaskSource) -> list[Task]:
        """``load_tasks``, cached for paths: the same files (same sizes and modification times) give the same
        Task objects, whose rows and encodings are then reused."""
        if not isinstance(tasks, str | Path):
            return load_tasks(tasks)
        key = str(Path(tasks).resolve())
        cached = self._loaded.get(key)
        if cached is not None and cached[0] == _stamp(cached[1], key):
            return list(cached[1])
        loaded = load_tasks(tasks)
        self._loaded[key] = (_stamp(loaded, key), loaded)
        return list(loaded)

    def run_task(
        self,
        task: Task,
        *,
        split: str = "test",
        limit: int | None = None,
        log_samples: bool = False,
        on_progress: Callable[[int], None] | None = None,
    ) -> tuple[TaskResult, list[dict[str, Any]]]:
        """Score one task; return its result and (with ``log_samples``) one log row per example."""
        start = time.perf_counter()
        encoded = self._encoded(task, split, limit)
        rows = encoded["rows"]
        self._nonfinite = (0, 0, "")
        with _eval_mode(self.model):
            if task.kind == "multiple_choice":
                metrics, samples = self._multiple_choice(task, rows, encoded, on_progress)
            elif task.kind == "generation":
                metrics, samples = self._generation(task, rows, encoded, on_progress)
            else:
                metrics, samples = self._perplexity(task, rows, encoded, on_progress)
        assert task.metrics is not None and task.category is not None
        undefined = nonfinite_outcome(self.name, task.name, *self._nonfinite, on_nonfinite=self.on_nonfinite)
        if undefined is not None:
            metrics = {name: math.nan for name in metrics}
        result = TaskResult(
            category=task.category,
            kind=task.kind,
            primary_metric=task.primary_metric,
            metrics={name: metrics[name] for name in task.metrics},
            n=len(rows),
            seconds=round(time.perf_counter() - start, 4),
            num_fewshot=task.num_fewshot,
            split=split,
            undefined=undefined,
        )
        if not log_samples:
            return result, []
        return result, [{"task": task.name, **row} for row in samples]

    # -- kinds -----------------------------------------------------------------------------------------------
    def _multiple_choice(self, task: Task, rows: list, encoded: dict, on_progress: Any) -> tuple[dict, list]:
        requests: list[LoglikelihoodRequest] = encoded["requests"]
        scores = self._score(requests, on_progress)
        self._count_nonfinite(scores, "log-likelihoods")
        lls: list[list[float]] = [[math.nan] * len(row.choices) for row in rows]
        for req, values in zip(requests, scores, strict=True):
            for k, value in zip(req.choice_ids, values, strict=True):
                lls[req.owner][k] = value
        acc, acc_norm, samples = [], [], []
        for i, (row, ll) in enumerate(zip(rows, lls, strict=True)):
            pred, pred_norm = M.predict(ll), M.predict_norm(ll, row.choices)
            acc.append(float(pred == row.gold))
            acc_norm.append(float(pred_norm == row.gold))
            samples.append({"index": i, "loglikelihoods": ll, "pred": pred, "pred_norm": pred_norm, "gold": row.gold,
                            "acc": acc[-1], "acc_norm": acc_norm[-1]})  # fmt: skip
        return {"acc": M.mean(acc), "acc_norm": M.mean(acc_norm)}, samples

    def _generation(self, task: Task, rows: list, encoded: dict, on_progress: Any) -> tuple[dict, list]:
        nonfinite: list[int] = []
        outputs = generate_greedy(
            self.model, self.tokenizer, encoded["prompts"], stop=task.generation.stop,
            max_new_tokens=task.generation.max_new_tokens, max_length=self.settings.max_length,
            batch_size=self.batch_size, on_progress=on_progress, nonfinite_rows=nonfinite,
        )  # fmt: skip
        self._nonfinite = (len(nonfinite), len(outputs), "generations (their logits)")
        assert task.metrics is not None
        per_metric: dict[str, list[float]] = {name: [] for name in M.GENERATION_METRICS}
        samples = []
        for i, (row, output) in enumerate(zip(rows, outputs, strict=True)):
            values = {name: fn(output, row.references) for name, fn in M.GENERATION_METRICS.items()}
            for name, value in values.items():
                per_metric[name].append(value)
            samples.append({"index": i, "output": output, "references": list(row.references), **values})
        return {name: M.mean(v) for name, v in per_metric.items()}, samples

    def _perplexity(self, task: Task, rows: list, encoded: dict, on_progress: Any) -> tuple[dict, list]:
        requests: list[LoglikelihoodRequest] = encoded["requests"]
        counts: list[int] = encoded["counts"]
        scores = self._score(requests, on_progress)
        self._count_nonfinite(scores, "log-likelihoods")
        nll = [0.0] * len(rows)
        for req, values in zip(requests, scores, strict=True):
            nll[req.owner] -= values[0]
        samples = [
            {"index": i, "nll": v, "tokens": n} for i, (v, n) in enumerate(zip(nll, counts, strict=True))
        ]
        return M.perplexity_metrics(sum(nll), sum(counts)), samples

    def _count_nonfinite(self, scores: list[list[float]], what: str) -> None:
        values = [v for per_request in scores for v in per_request]
        self._nonfinite = (sum(not math.isfinite(v) for v in values), len(values), what)

    # -- encoding cache --------------------------------------------------------------------------------------
    def _encoded(self, task: Task, split: str, limit: int | None) -> dict[str, Any]:
        key = (self.tokenizer_key, self.settings, split, limit)
        cache = task.encoding_cache()
        if key not in cache:
            cache[key] = self._encode(task, split, limit)
        return cache[key]

    def _encode(self, task: Task, split: str, limit: int | None) -> dict[str, Any]:
        rows = task.rows(split)
        rows = rows[:limit] if limit else rows
        if task.kind == "perplexity":
            requests, counts = encode_rolling_requests(self.tokenizer, self.settings, [r.text for r in rows])
            return {"rows": rows, "requests": requests, "counts": counts}
        train = task.rows("train") if task.num_fewshot else None
        contexts = build_contexts(task, rows, train)
        if task.kind == "generation":
            return {
                "rows": rows,
                "prompts": encode_batch(self.tokenizer, self.settings, contexts),
                "contexts": contexts,
            }
        continuations = [prompt_continuations(task, row) for row in rows]
        try:
            requests = encode_choice_requests(self.tokenizer, self.settings, contexts, continuations)
        except TaskError as exc:
            raise TaskError(f"task {task.name!r} ({task.data_path(split)}): {exc}") from None
        return {"rows": rows, "requests": requests, "contexts": contexts}

    def _score(self, requests: list[LoglikelihoodRequest], on_progress: Any) -> list:
        """Log-likelihoods of the requests' continuations, progress reported per example."""
        return score_loglikelihoods(
            self.model,
            requests,
            batch_size=self.batch_size,
            pad_token_id=self._pad_id(),
            on_progress=_per_owner(requests, on_progress),
        )

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0  # any id will do: padded positions are masked out


# -- non-finite scores -------------------------------------------------------------------------------------------


def check_on_nonfinite(on_nonfinite: str) -> None:
    if on_nonfinite not in ("raise", "undefined"):
        raise ConfigError(f"on_nonfinite must be 'raise' or 'undefined', got {on_nonfinite!r}")


def nonfinite_outcome(
    model: str, task: str, bad: int, total: int, what: str, *, on_nonfinite: OnNonFinite
) -> str | None:
    """None when nothing was non-finite; else raise (``"raise"``) or warn and return the reason the task's
    score is undefined (``"undefined"``). NaN log-likelihoods would otherwise become a plausible score: argmax
    over NaN picks the first choice every time."""
    if not bad:
        return None
    reason = f"{bad} of {total} {what} are NaN or infinite"
    message = f"model {model}: task {task!r}: {reason} (are its weights finite?)"
    if on_nonfinite == "raise":
        raise NonFiniteError(f"{message}; no score is given")
    warnings.warn(f"{message}; the task's score is undefined (NaN)", NonFiniteScoreWarning, stacklevel=3)
    return reason


# -- helpers -------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (so encodings are shared only by identical tokenizers)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = repr(
        (type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.all_special_tokens)
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def _stamp(tasks: list[Task], key: str) -> tuple:
    files = [Path(key)]
    for t in tasks:
        if t.source is not None:
            files.append(t.source)
        files.extend(p for s in ("train", "validation", "test") if (p := t.data_path(s)) is not None)
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(f), None, None))
    return tuple(out)


def _per_owner(
    requests: list[LoglikelihoodRequest], on_progress: Callable[[int], None] | None
) -> Callable[[int], None] | None:
    """Progress counts requests; translate to examples when an example has several requests (rare)."""
    if on_progress is None:
        return None
    n_examples = len({r.owner for r in requests})
    scale = n_examples / len(requests) if requests else 1.0
    state = {"done": 0.0, "reported": 0}

    def update(n: int) -> None:
        state["done"] += n * scale
        step = int(state["done"]) - state["reported"]
        if step:
            state["reported"] += step
            on_progress(step)

    return update


@contextmanager
def _eval_mode(model: Any):
    """Evaluation mode for the duration (dropout off), restoring the caller's mode afterwards (a training loop
    may evaluate its model in the middle of training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _progress_bars(enabled: bool):
    """One rich progress bar per task (``bar_for(name, task, split, limit)`` -> advance callback)."""
    if not enabled:
        yield lambda *args: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as bars:

        def bar_for(name: str, task: Task, split: str, limit: int | None) -> Callable[[int], None]:
            total = len(task.rows(split))
            bar = bars.add_task(name, total=min(total, limit) if limit else total)
            return lambda n: bars.advance(bar, n)

        yield bar_for

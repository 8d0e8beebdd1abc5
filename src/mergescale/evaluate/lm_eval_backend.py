"""lm-evaluation-harness as an evaluation backend (optional extra ``mergescale[lm-eval]``).

Runs harness tasks by name through ``lm_eval.simple_evaluate`` with its Hugging Face backend (``HFLM``) on a
folder or a model in memory, one task per call (so each task's time is its own; the model is wrapped once), and
converts the output to our :class:`EvalResults`. Our own task files can be passed too: they are exported with
:func:`~mergescale.evaluate.export.export_lm_eval` to a temporary folder and run from there.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergescale import __version__
from mergescale.errors import ConfigError, TaskError
from mergescale.evaluate.loading import load_model
from mergescale.evaluate.results import EvalResults, EvalSettings, TaskResult, category_means


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(
            "the lm-eval backend needs lm-evaluation-harness: pip install 'mergescale[lm-eval]'"
        ) from None
    return lm_eval


def evaluate_lm_eval(
    model: Any,
    tasks: str | Path | Sequence[Any],
    *,
    tokenizer: Any | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: Any | None = None,
    log_samples: bool = False,
    include_path: str | Path | None = None,
    trust_remote_code: bool = False,
    on_nonfinite: str = "raise",
) -> EvalResults:
    """Evaluate with lm-evaluation-harness and return the same results format as :func:`evaluate`.

    ``tasks``: harness task names (a list or ``"a,b"``), or one of our task files / folders / suites / Task
    lists (exported to harness YAMLs first). ``include_path``: a folder of extra harness task YAMLs.
    ``on_nonfinite``: as for :func:`evaluate`, from the harness's per-example log-likelihoods (multiple choice
    and rolling log-likelihood tasks; the harness is always asked for them, and they are dropped afterwards
    unless ``log_samples``).
    """
    from mergescale.evaluate.api import check_on_nonfinite

    check_on_nonfinite(on_nonfinite)
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mergescale.evaluate.tasks import Suite, Task, load_tasks

    ours: dict[str, Task] = {}
    names: list[str]
    if isinstance(tasks, Task | Suite) or (isinstance(tasks, Path | str) and Path(tasks).exists()):
        ours = {t.name: t for t in load_tasks(tasks)}
    elif (
        isinstance(tasks, Sequence)
        and not isinstance(tasks, str)
        and tasks
        and all(isinstance(t, Task) for t in tasks)
    ):
        ours = {t.name: t for t in load_tasks(list(tasks))}
    if ours:
        names = list(ours)
    else:
        names = [n.strip() for n in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(n).strip()]
        if not names:
            raise TaskError("no lm-eval task names given")

    loaded = load_model(
        model, tokenizer=tokenizer, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, backend="causal")
    results: dict[str, TaskResult] = {}
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mergescale-lm-eval-") as tmp:
        paths = [str(p) for p in ([include_path] if include_path else [])]
        if ours:
            from mergescale.evaluate.export import export_lm_eval

            export_lm_eval(list(ours.values()), tmp)
            paths.append(tmp)
        # Our own tasks alone need no index of the harness's thousands of task files (seconds saved).
        manager = TaskManager(
            include_path=paths or None, include_defaults=not ours or include_path is not None
        )
        for name in names:
            if name not in manager.all_tasks:
                raise TaskError(f"lm-eval has no task {name!r} (include_path={paths or None})")
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[name], limit=limit, log_samples=True, task_manager=manager,
                bootstrap_iters=0, verbosity="WARNING",
            )  # fmt: skip
            seconds = time.perf_counter() - start
            task = ours.get(name)
            results[name], task_samples = _convert(out, name, seconds, task)
            _check_finite(results[name], task_samples, name, loaded.identity, on_nonfinite)
            if log_samples:
                samples.extend(task_samples)
    device_str = str(next(loaded.model.parameters()).device)
    dtype_str = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    converted = EvalResults(
        mergescale_version=__version__,
        backend="lm-eval",
        model=loaded.identity,
        settings=EvalSettings(limit=limit, batch_size=batch_size, device=device_str, dtype=dtype_str),
        tasks=results,
        categories=category_means(results),
    )
    converted.set_samples(samples)
    return converted


def _check_finite(result: TaskResult, rows: list[dict], task: str, identity: Any, on_nonfinite: str) -> None:
    """Apply ``on_nonfinite`` to the harness's per-example log-likelihoods of one task (in place)."""
    from mergescale.evaluate.api import nonfinite_outcome

    values = [v for row in rows for v in row.get("loglikelihoods", [])]
    values += [row["nll"] for row in rows if "nll" in row]
    bad = sum(not math.isfinite(v) for v in values)
    model = identity.path or identity.name or "in memory"
    undefined = nonfinite_outcome(model, task, bad, len(values), "log-likelihoods", on_nonfinite=on_nonfinite)  # type: ignore[arg-type]
    if undefined is not None:
        result.metrics = {name: math.nan for name in result.metrics}
        result.undefined = undefined


def _convert(
    out: dict[str, Any], name: str, seconds: float, task: Any | None
) -> tuple[TaskResult, list[dict]]:
    """One task of ``simple_evaluate``'s output -> TaskResult (+ sample rows in our samples.jsonl layout)."""
    raw = out["results"][name]
    metrics: dict[str, float] = {}
    for key, value in raw.items():
        metric, _, _filter = key.partition(",")
        if not _filter or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        metrics.setdefault(metric, float(value))
    config = out.get("configs", {}).get(name, {})
    listed = [m["metric"] for m in config.get("metric_list", []) if isinstance(m.get("metric"), str)]
    primary = next((m for m in listed if m in metrics), next(iter(metrics), "acc"))
    n_info = out.get("n-samples", {}).get(name, {})
    n = int(n_info.get("effective", n_info.get("original", 0)))
    output_type = config.get("output_type", "")
    kind = {"multiple_choice": "multiple_choice", "generate_until": "generation"}.get(
        output_type, output_type
    )
    if task is not None and task.kind == "perplexity":
        kind = "perplexity"
    result = TaskResult(
        category=(task.category if task is not None else None) or name,
        kind=kind or "unknown",
        primary_metric=primary,
        metrics=metrics or {"acc": math.nan},
        n=n,
        seconds=round(seconds, 4),
        num_fewshot=int(out.get("n-shot", {}).get(name, 0) or 0),
    )
    rows = []
    for s in sorted(out.get("samples", {}).get(name, []), key=lambda s: s["doc_id"]):
        row: dict[str, Any] = {"task": name, "index": s["doc_id"]}
        if output_type == "multiple_choice":
            lls = [float(r[0][0]) for r in s["resps"]]
            row |= {
                "loglikelihoods": lls,
                "pred": max(range(len(lls)), key=lambda i: (lls[i], -i)),
                "gold": s["target"],
            }
        elif output_type == "generate_until":
            row |= {"output": s["filtered_resps"][0], "references": s["doc"].get("references", [s["target"]])}
        elif output_type == "loglikelihood_rolling":
            row |= {"nll": -float(s["filtered_resps"][0])}
        else:
            row |= {"resps": s["filtered_resps"]}
        row |= {k: s[k] for k in metrics if k in s and isinstance(s[k], int | float)}
        rows.append(row)
    return result, rows

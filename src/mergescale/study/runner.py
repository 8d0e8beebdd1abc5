"""``run_study``: a study from its spec to its store, resumable.

Order of work:

1. **expand** the spec (:mod:`.grid`): resolve and hash every model, load the tasks, list draws and cells;
2. **check** every group from the weight headers alone — same architecture, same tensors and shapes — so a
   bad input fails on one line before any merge;
3. **open the store** (:mod:`.store`): a folder made by another study is refused unless ``force_new``; cells of
   the current spec already stored are skipped (a rerun resumes), others stay in the store marked not current;
4. **run** the jobs that remain on an executor — this process, a local process pool or Ray (:mod:`.executors`):
   per group, each baseline model first (base, experts, multitask: evaluated once, never again on a rerun),
   then one job per draw (one read, every method of the draw, :mod:`.draws`);
5. **record** each job's rows in one transaction as it finishes, with the normalised scores (held-in ÷ the
   group's expert, held-out ÷ its base); the runner is the store's only writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergescale.device import check_device
from mergescale.errors import ConfigError
from mergescale.stages.keys import stage_key
from mergescale.stages.scheduler import Job
from mergescale.study.draws import BaselineJob, DrawJob, StudyContext, default_memory_budget
from mergescale.study.grid import BaselineCell, MergeCell, StudyPlan, expand, versions
from mergescale.study.pma_jobs import PMAJob, PMAJobResult, pma_jobs, resolve_runs
from mergescale.study.spec import StudySpec, load_spec, parse_spec
from mergescale.study.store import StudyStore, dumps, normalised

# (event, fields): "start" {job, label}, "done" {job, cells, label}, "plan" {jobs, cells, draws, cached}
Reporter = Callable[[str, dict[str, Any]], None]


@dataclass
class RunSummary:
    """What a run did."""

    study_dir: Path
    cells: int  # cells of the spec (merges and baselines)
    cached: int  # of which already stored before this run
    ran: int  # evaluated by this run
    draws: int  # draws run (each one read of its base and experts)
    stale: int  # stored cells no longer in the spec (kept, not shown)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def run_study(
    spec: str | Path | StudySpec | dict,
    study_dir: str | Path,
    *,
    workers: int = 1,
    threads: int | None = 1,
    ray: bool = False,
    ray_address: str | None = None,
    max_memory: int | None = None,
    force_new: bool = False,
    report: Reporter | None = None,
    spec_dir: str | Path | None = None,
    world: str | Path | None = None,
) -> RunSummary:
    """Run (or resume) the study ``spec`` into ``study_dir``; see the module docstring and docs/study.md.

    Args:
        spec: a spec file, or a :class:`StudySpec` / dict (relative paths then start at ``spec_dir``, default
            the current folder).
        study_dir: the study folder (created); rerunning the same command resumes.
        workers: processes evaluating side by side (1: this process); with ``ray``, the local runtime's CPUs.
        threads: torch CPU threads per worker (default 1: the models a study runs on a CPU gain little from more).
        ray / ray_address: run one Ray task per draw on a local runtime, or on the cluster at ``ray_address``.
        max_memory: bytes all workers together may hold in models (merged outputs, working stacks, evaluation
            models); default half the machine's memory. Past it, a draw's merges are split over several reads, or
            written to a scratch folder and evaluated from there; each merge runs under what the budget leaves
            (its stacked methods over row blocks, :func:`~mergescale.study.draws.engine_memory`).
        force_new: start ``study_dir`` afresh when it holds another study.
        report: progress callback ``report(event, fields)``.
        world: a built world to use instead of the spec's ``world`` (for a spec that names one).

    Example::

        summary = run_study("examples/study-paper.yaml", "studies/paper", workers=2)
        results = load_study("studies/paper")
    """
    start = time.perf_counter()
    if isinstance(spec, str | Path):
        parsed, base_dir = load_spec(spec)
    else:
        parsed = spec if isinstance(spec, StudySpec) else parse_spec(spec)
        base_dir = Path(spec_dir or ".").resolve()
    if world is not None:
        if parsed.world is None:
            raise ConfigError("--world: this spec lists its groups; it names no world to replace")
        parsed = parsed.model_copy(update={"world": str(Path(world).resolve())})
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if max_memory is not None and max_memory <= 0:
        raise ConfigError(f"max_memory must be positive, got {max_memory}")
    try:
        check_device(parsed.eval.device)
    except ConfigError as exc:
        raise ConfigError(f"eval.device: {exc}") from None
    plan = expand(parsed, base_dir) if parsed.has_merging else empty_plan(parsed, base_dir)
    check_groups(plan)
    runs = resolve_runs(parsed, base_dir) if parsed.pma is not None else []
    study_dir = Path(study_dir)
    store = StudyStore.create_or_open(study_dir, parsed.name, parsed.model_dump_json(), force_new=force_new)
    try:
        scratch = str(_scratch(study_dir))
        pma = pma_jobs(parsed, runs, scratch) if parsed.pma is not None else []
        store.write_setup(_group_rows(plan), _task_rows(plan), plan.spec_key)
        all_keys = [c.key for c in plan.baselines] + [c.key for c in plan.cells] + [j.key for j in pma]
        cached, stale = store.mark_current(all_keys)
        done = store.done_keys()
        jobs, twins = _jobs(plan, done)
        # the PMA experiments after the merging grid's baselines, before its draws: they are few and long
        # (the curves first: they are the longest jobs, and a pool finishes sooner when they start early)
        jobs += [
            Job(f"pma/{j.run.name}/{j.experiment}", (), 1.6 if j.experiment == "curve" else 1.5, j)
            for j in pma
            if j.key not in done
        ]
        budget = max_memory or default_memory_budget()
        context = StudyContext(
            tasks_source=plan.tasks_source,
            eval=parsed.eval,
            held_out=tuple(plan.held_out),
            diagnostics=parsed.diagnostics,
            memory_budget=budget // (workers if not ray_address else 1),
            scratch=scratch,
        )
        recorder = _Recorder(plan, store, report, twins)
        summary = RunSummary(
            study_dir=study_dir, cells=len(all_keys), cached=cached, ran=0, draws=0, stale=stale
        )
        if report:
            report(
                "plan",
                {
                    "jobs": len(jobs),
                    "cells": len(all_keys),
                    "cached": cached,
                    "to_run": sum(_cells_of(j.payload) for j in jobs)
                    + sum(len(twins.get(c.key, [])) for j in jobs for c in getattr(j.payload, "cells", ())),
                    "draws": sum(isinstance(j.payload, DrawJob) for j in jobs),
                },
            )
        from mergescale.study.executors import run_jobs

        run_jobs(
            jobs,
            context,
            on_done=recorder.record,
            prepare=recorder.prepare,
            on_start=recorder.started,
            workers=workers,
            threads=threads,
            ray=ray or ray_address is not None,
            ray_address=ray_address,
        )
        summary.ran = recorder.cells
        summary.draws = recorder.draws
        summary.warnings = sorted(recorder.warnings)
    finally:
        store.close()
    summary.seconds = time.perf_counter() - start
    return summary


def empty_plan(spec: StudySpec, spec_dir: Path) -> StudyPlan:
    """The plan of a study without a merging grid (its PMA experiments alone)."""
    return StudyPlan(spec, spec_dir, stage_key("study-spec", spec), "", "", {}, [], [])


def _cells_of(payload: Any) -> int:
    """How many of the store's units a job completes: its cells, or one PMA job."""
    return len(payload.cells) if hasattr(payload, "cells") else 1


def check_groups(plan: StudyPlan) -> None:
    """Every expert and multitask model has its base's architecture, tensors and shapes (headers only)."""
    from mergescale.api import SourcePool
    from mergescale.engine.plan import OutputSpec, build_plan
    from mergescale.io.writer import MemorySink
    from mergescale.methods import get_method

    linear = get_method("linear")
    for g in plan.groups:
        with SourcePool() as pool:
            base = pool.add(g.base.path, f"group {g.name!r} base")
            others = [pool.add(m.path, f"group {g.name!r} expert {t!r}") for t, m in g.experts.items()]
            if g.multitask is not None:
                others.append(pool.add(g.multitask.path, f"group {g.name!r} multitask model"))
            probe = OutputSpec(
                label=f"group {g.name!r}", method=linear, models=others, base=base,
                model_params=[{"weight": 1.0}] * len(others), params={}, sink=MemorySink(),
            )  # fmt: skip
            build_plan(pool.sources, pool.labels, [probe])  # checks from headers; reads no weight


def _group_rows(plan: StudyPlan) -> list[dict[str, Any]]:
    return [
        {
            "name": g.name,
            "base_kind": g.base_kind,
            "size": g.size,
            "parameters": g.parameters,
            "base": g.base.path,
            "base_identity": g.base.identity,
            "multitask": g.multitask.path if g.multitask else None,
            "experts": dumps({t: m.path for t, m in g.experts.items()}),
        }
        for g in plan.groups
    ]


def _task_rows(plan: StudyPlan) -> list[dict[str, Any]]:
    return [{"name": t.name, "split": t.split, "category": t.category} for t in plan.tasks.values()]


def _scratch(study_dir: Path) -> Path:
    path = study_dir / ".scratch"
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.iterdir():  # a killed run's half-written merges
        import shutil

        shutil.rmtree(stale, ignore_errors=True)
    return path


def draw_key(plan: StudyPlan, group: str, k: int, seed: int, experts: tuple[str, ...]) -> str:
    g = plan.group(group)
    return stage_key("study-draw", g.name, g.base.identity, [g.experts[t].identity for t in experts], k, seed)


def merge_signature(cell: MergeCell) -> tuple:
    """What a merge's result depends on besides its group: two cells with one signature compute the same model
    (k = all experts draws the same set for every seed; only randomised methods then depend on the seed)."""
    from mergescale.methods import get_method

    seed = cell.seed if get_method(cell.method).randomized else None
    return (cell.group, cell.entry, cell.method, dumps(cell.candidates), cell.select, cell.experts, seed)


def _jobs(plan: StudyPlan, done: set[str]) -> tuple[list[Job], dict[str, list[MergeCell]]]:
    """Baselines first (one job per model), then one job per draw with cells left, after its group's baselines.

    A cell whose merge another cell computes already (same :func:`merge_signature`) is not computed again: it is
    returned as a twin of that cell, recorded with its scores.
    """
    jobs: list[Job] = []
    twins: dict[str, list[MergeCell]] = {}
    first: dict[tuple, MergeCell] = {}
    for cell in plan.cells:
        sig = merge_signature(cell)
        if sig in first:
            twins.setdefault(first[sig].key, []).append(cell)
        else:
            first[sig] = cell
    twin_keys = {c.key for cs in twins.values() for c in cs}
    for g in plan.groups:
        base_jobs = []
        for cell in plan.baselines:
            if cell.group == g.name and cell.key not in done:
                name = f"baseline/{g.name}/{cell.role}" + (f"/{cell.task}" if cell.task else "")
                jobs.append(Job(name, (), 2.0, BaselineJob(g, (cell,))))
                base_jobs.append(name)
        by_draw: dict[tuple[int, int], list[MergeCell]] = {}
        for cell in plan.cells:
            if cell.group != g.name or cell.key in twin_keys:
                continue
            # computed when it, or a twin of it, is missing from the store
            if cell.key not in done or any(t.key not in done for t in twins.get(cell.key, [])):
                by_draw.setdefault((cell.k, cell.seed), []).append(cell)
        for (k, seed), cells in by_draw.items():
            experts = cells[0].experts
            payload = DrawJob(g, k, seed, experts, draw_key(plan, g.name, k, seed, experts), tuple(cells))
            jobs.append(Job(f"draw/{g.name}/k{k}/seed{seed}", tuple(base_jobs), 1.0, payload))
    return jobs, twins


class _Recorder:
    """Writes each finished job to the store (in the calling process) and prepares draws' payloads."""

    def __init__(
        self, plan: StudyPlan, store: StudyStore, report: Reporter | None, twins: dict[str, list[MergeCell]]
    ) -> None:
        self.plan = plan
        self.twins = twins
        self.store = store
        self.report = report
        self.cells = 0
        self.draws = 0
        self.warnings: set[str] = set()
        self.versions = dumps(versions())
        self.splits = {t.name: t.split for t in plan.tasks.values()}
        self._references: dict[str, tuple[dict, dict]] = {}
        self.by_key: dict[str, MergeCell | BaselineCell] = {c.key: c for c in (*plan.cells, *plan.baselines)}

    def started(self, job: Job) -> None:
        if self.report:
            self.report("start", {"job": job.name, "label": _describe(job.payload)})

    def prepare(self, job: Job) -> Any:
        """A draw's payload gets the experts' validation scores (stored by its baseline jobs) at submission."""
        payload = job.payload
        if isinstance(payload, DrawJob) and any(c.select == "validation" for c in payload.cells):
            primary = self.store.primary_metrics()
            scores = self.store.group_scores(payload.group.name, "expert", "validation")
            expert_validation = {
                t: scores.get(t, {}).get(t, {}).get(primary.get(t, ""))
                for t in payload.experts
            }
            payload = replace(payload, expert_validation={k: v for k, v in expert_validation.items() if v is not None})
        return payload

    def record(self, job: Job, result: Any) -> None:
        payload = job.payload
        if isinstance(payload, PMAJob):
            self._record_pma(job, payload, result)
            return
        group = payload.group.name
        if isinstance(payload, BaselineJob):
            experts, base = {}, {}
        else:
            experts, base = self._refs(group)
        cells, scores, primary = [], [], {}
        results = list(result.cells)
        for res in result.cells:  # twins share the computed cell's result (under their own key and seed)
            results += [replace(res, key=twin.key) for twin in self.twins.get(res.key, [])]
        n_cells = len(results)
        for res in results:
            cell = self.by_key[res.key]
            for s in res.scores:
                split = self.splits.get(s.task)
                if s.primary:
                    primary[s.task] = s.metric
                scores.append(
                    {
                        "cell_key": res.key,
                        "task": s.task,
                        "split": split,
                        "eval_split": s.eval_split,
                        "metric": s.metric,
                        "score": s.value,
                        "normalised": normalised(s.value, split, s.task, s.metric, experts, base)
                        if s.eval_split == "test"
                        else None,
                    }
                )
            g = payload.group
            row: dict[str, Any] = {
                "key": res.key,
                "group_name": g.name,
                "base_kind": g.base_kind,
                "size": g.size,
                "eval_s": round(res.eval_seconds, 4),
                "merge_s": round(res.merge_seconds, 4),
                "wall_s": round(res.eval_seconds + res.merge_seconds, 4),
                "peak_rss": result.peak_rss,
                "bytes_read": result.bytes_read if isinstance(cell, MergeCell) else None,
                "versions": self.versions,
            }
            if isinstance(cell, MergeCell):
                row |= {
                    "kind": "merge",
                    "method": cell.method,
                    "label": cell.label,
                    "entry": cell.entry,
                    "params": dumps(res.chosen or cell.candidates[0]),
                    "k": cell.k,
                    "seed": cell.seed,
                    "experts": dumps(list(cell.experts)),
                    "draw_key": payload.draw_key,
                    "selection": dumps(res.selection) if res.selection else None,
                }
            else:
                row |= {
                    "kind": cell.role,
                    "label": cell.role if cell.task is None else f"expert {cell.task}",
                    "task": cell.task,
                    "experts": dumps([cell.task] if cell.task else []),
                }
            cells.append(row)
        draw = None
        diagnostics = []
        if isinstance(payload, DrawJob):
            draw = {
                "key": payload.draw_key,
                "group_name": group,
                "k": payload.k,
                "seed": payload.seed,
                "experts": dumps(list(payload.experts)),
                "bytes_read": result.bytes_read,
                "merge_s": round(result.merge_seconds, 4),
                "plans": result.plans,
                "outputs": result.outputs,
                "peak_rss": result.peak_rss,
            }
            diagnostics = [
                {"draw_key": payload.draw_key, "stat": d.stat, "a": d.a, "b": d.b, "value": d.value}
                for d in result.diagnostics
            ]
        self.store.write_cells(cells, scores, draw=draw, diagnostics=diagnostics, primary=primary)
        if isinstance(payload, BaselineJob):
            self._references.pop(group, None)
            self.store.renormalise_baselines(group)
        else:
            self.draws += 1
        self.cells += n_cells
        self.warnings.update(result.warnings)
        if self.report:
            self.report("done", {"job": job.name, "cells": n_cells, "label": _describe(payload)})

    def _record_pma(self, job: Job, payload: PMAJob, result: PMAJobResult) -> None:
        row = {
            "key": payload.key,
            "run": payload.run.name,
            "experiment": payload.experiment,
            "seconds": round(result.seconds, 3),
            "peak_rss": result.peak_rss,
            "versions": self.versions,
        }
        self.store.write_pma(row, result.points, result.curves, result.results)
        self.cells += 1
        self.warnings.update(result.warnings)
        if self.report:
            self.report("done", {"job": job.name, "cells": 1, "label": _describe(payload)})

    def _refs(self, group: str) -> tuple[dict, dict]:
        if group not in self._references:
            self._references[group] = self.store.references(group)
        return self._references[group]


def _describe(payload: Any) -> str:
    if isinstance(payload, PMAJob):
        return f"pma {payload.run.name} {payload.experiment}"
    if isinstance(payload, DrawJob):
        return f"{payload.group.name} k={payload.k} seed={payload.seed} ({len(payload.cells)} merges)"
    cell = payload.cells[0]
    return f"{payload.group.name} {cell.role}" + (f" {cell.task}" if cell.task else "")


def parse_memory(text: str | None) -> int | None:
    """``"8GB"`` -> bytes (decimal units, as ``--max-shard-size``); None passes."""
    if text is None:
        return None
    from mergescale.io.writer import parse_size

    try:
        return parse_size(text)
    except ConfigError:
        raise ConfigError(f"--max-memory: {text!r} is not a size like 8GB or 512MiB") from None

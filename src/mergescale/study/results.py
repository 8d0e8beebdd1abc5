"""``load_study``: a study's store as typed records, and the paper's aggregation of them.

Aggregation ("What Matters for Model Merging at Scale?", section "Metrics"), through
:mod:`mergescale.evaluate.normalise`, on each task's primary metric:

1. per task, the normalised score stored by the runner (held-in ÷ the task's expert, held-out ÷ the base);
2. the mean within each category, then the mean over categories (each category counts once), per cell;
3. the mean and sample standard deviation over seeds of (group, method entry, parameters, k), per-seed kept.

The multitask model is normalised the same way, on the same held-in tasks as the merge it is compared with.
Beyond the paper: retention per task (merged ÷ expert) with the tasks below 0.9, the worst category, and Δ to
the multitask model with whether the merge beats it.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergescale.evaluate.normalise import (
    Aggregate,
    NormalisationWarning,
    SeedSummary,
    aggregate,
    over_seeds,
    versus_multitask,
)
from mergescale.study import task_splits
from mergescale.study.store import StudyStore

RETENTION_THRESHOLD = 0.9  # the paper's appendix counts tasks retaining less than 90% of their expert's score


@dataclass(frozen=True)
class GroupInfo:
    name: str
    base_kind: str | None
    size: str | None
    parameters: int | None


@dataclass(frozen=True)
class TaskInfo(task_splits.TaskInfo):
    """A task as the store records it: split, category and the metric its scores are normalised on."""

    primary_metric: str | None


@dataclass(frozen=True)
class CellRecord:
    """One evaluated model: a merge (``kind == "merge"``) or a baseline (base, expert, multitask)."""

    key: str
    kind: str
    group: str
    base_kind: str | None
    size: str | None
    method: str | None
    label: str | None
    entry: int | None  # index of the spec's method entry
    params: dict[str, Any]
    k: int | None
    seed: int | None
    experts: tuple[str, ...]
    task: str | None
    draw_key: str | None
    selection: dict[str, Any] | None
    wall_s: float | None
    merge_s: float | None
    eval_s: float | None
    peak_rss: int | None
    bytes_read: int | None


@dataclass(frozen=True)
class ScoreRecord:
    cell_key: str
    task: str
    split: str
    eval_split: str
    metric: str
    score: float | None
    normalised: float | None


@dataclass(frozen=True)
class DrawRecord:
    key: str
    group: str
    k: int
    seed: int
    experts: tuple[str, ...]
    bytes_read: int | None
    merge_s: float | None
    plans: int | None
    outputs: int | None
    peak_rss: int | None


@dataclass(frozen=True)
class PMAPoint:
    """One checkpoint average of a pre-training run (see the store's ``pma_points``)."""

    run: str
    kind: str  # along (the run) / ablation (N x V x strategy at chosen end steps)
    strategy: str  # sma / ema / wma
    alpha: float | None
    n: int
    interval: str
    end_step: int
    loss: float | None
    last_loss: float | None
    annealed_loss: float | None
    recovered: float | None  # (PMA − last) / (annealed − last)
    scores: dict[str, float]


@dataclass(frozen=True)
class CurvePoint:
    """One training step of a PMA-init or spike-recovery run."""

    run: str
    experiment: str  # pma_init / spike
    variant: str  # pma, last / spiked, average, rollback, unspiked
    step: int
    loss: float | None
    grad_norm: float | None


@dataclass(frozen=True)
class CellScores:
    """A merge's normalised aggregates, with the multitask model's on the same tasks."""

    cell: CellRecord
    held_in: Aggregate
    held_out: Aggregate
    multitask_held_in: float | None
    multitask_held_out: float | None
    below_threshold: tuple[str, ...]  # held-in tasks retaining < RETENTION_THRESHOLD of their expert


@dataclass(frozen=True)
class SummaryRow:
    """One (group, method entry, k) over seeds: the paper's table entry."""

    group: str
    base_kind: str | None
    size: str | None
    parameters: int | None
    label: str
    method: str
    k: int
    held_in: SeedSummary
    held_out: SeedSummary
    multitask_held_in: SeedSummary
    multitask_held_out: float | None
    delta_held_in: float | None  # mean over seeds of merged − multitask
    delta_held_out: float | None
    beats_multitask_held_out: float | None  # share of seeds where the merge beats the multitask model
    below_threshold: float  # mean number of held-in tasks below RETENTION_THRESHOLD
    worst_category: str | None  # the most frequent worst held-in category over seeds


@dataclass
class StudyResults(task_splits.TaskSplits):
    """Everything a study folder holds, typed (the current spec's cells only)."""

    study_dir: Path
    name: str
    spec: dict[str, Any]
    groups: list[GroupInfo]
    tasks: dict[str, TaskInfo]
    cells: list[CellRecord]
    scores: list[ScoreRecord]
    draws: list[DrawRecord]
    diagnostics: dict[str, dict[tuple[str, str, str], float | None]]  # draw key -> (stat, a, b) -> value
    pma_points: list[PMAPoint] = field(default_factory=list)
    pma_curves: list[CurvePoint] = field(default_factory=list)
    pma_results: dict[tuple[str, str, str, str], float | None] = field(default_factory=dict)  # (run, experiment, variant, metric)
    _by_cell: dict[str, list[ScoreRecord]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for s in self.scores:
            self._by_cell.setdefault(s.cell_key, []).append(s)

    # -- lookups -------------------------------------------------------------------------------------------------
    @property
    def merges(self) -> list[CellRecord]:
        return [c for c in self.cells if c.kind == "merge"]

    def group(self, name: str) -> GroupInfo:
        return next(g for g in self.groups if g.name == name)

    def baseline(self, group: str, kind: str, task: str | None = None) -> CellRecord | None:
        return next(
            (c for c in self.cells if c.group == group and c.kind == kind and (task is None or c.task == task)), None
        )

    def scores_of(self, cell_key: str, *, eval_split: str = "test") -> list[ScoreRecord]:
        return [s for s in self._by_cell.get(cell_key, []) if s.eval_split == eval_split]

    def primary(self, cell_key: str) -> dict[str, ScoreRecord]:
        """Per task, the cell's test score on the task's primary metric."""
        out = {}
        for s in self.scores_of(cell_key):
            if s.metric == self.tasks[s.task].primary_metric:
                out[s.task] = s
        return out

    @property
    def categories(self) -> dict[str, str]:
        return {t.name: t.category for t in self.tasks.values()}

    # -- aggregation ---------------------------------------------------------------------------------------------
    def normalised(self, cell_key: str, tasks: Iterable[str]) -> Aggregate:
        """Task → category → mean over categories, of the cell's normalised primary scores on ``tasks``."""
        prim = self.primary(cell_key)
        values = {t: (prim[t].normalised if t in prim else None) for t in tasks}
        return aggregate(values, self.categories)

    def cell_scores(self, cell: CellRecord) -> CellScores:
        multitask = self.baseline(cell.group, "multitask")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NormalisationWarning)
            held_in = self.normalised(cell.key, cell.experts)
            held_out = self.normalised(cell.key, self.held_out)
            mt_in = self.normalised(multitask.key, cell.experts).mean if multitask else None
            mt_out = self.normalised(multitask.key, self.held_out).mean if multitask else None
        below = tuple(t for t, v in held_in.tasks.items() if v is not None and v < RETENTION_THRESHOLD - 1e-9)
        return CellScores(cell, held_in, held_out, mt_in, mt_out, below)

    def summary(self) -> list[SummaryRow]:
        """The paper's table: per (group, method entry, k), mean ± std over seeds, in spec order."""
        rows: dict[tuple[str, str, int], list[CellScores]] = {}
        def order(c: CellRecord) -> tuple:
            return (self._group_order(c.group), c.entry or 0, c.label or "", c.k or 0, c.seed or 0)

        for cell in sorted(self.merges, key=order):
            rows.setdefault((cell.group, cell.label or cell.method or "?", cell.k or 0), []).append(self.cell_scores(cell))
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NormalisationWarning)
            for (group, label, k), scored in rows.items():
                info = self.group(group)
                deltas_in = [versus_multitask(s.held_in.mean, s.multitask_held_in) for s in scored]
                deltas_out = [versus_multitask(s.held_out.mean, s.multitask_held_out) for s in scored]
                worst = Counter(s.held_in.worst_category for s in scored if s.held_in.worst_category)
                out.append(
                    SummaryRow(
                        group=group,
                        base_kind=info.base_kind,
                        size=info.size,
                        parameters=info.parameters,
                        label=label,
                        method=scored[0].cell.method or "?",
                        k=k,
                        held_in=over_seeds([s.held_in.mean for s in scored]),
                        held_out=over_seeds([s.held_out.mean for s in scored]),
                        multitask_held_in=over_seeds([s.multitask_held_in for s in scored]),
                        multitask_held_out=scored[0].multitask_held_out,
                        delta_held_in=_mean([d.delta for d in deltas_in]),
                        delta_held_out=_mean([d.delta for d in deltas_out]),
                        beats_multitask_held_out=_mean([float(d.beats) for d in deltas_out if d.beats is not None]),
                        below_threshold=sum(len(s.below_threshold) for s in scored) / len(scored),
                        worst_category=worst.most_common(1)[0][0] if worst else None,
                    )
                )
        return out

    def baseline_summary(self, group: str) -> dict[str, float | None]:
        """A group's baselines on the normalised scale: multitask held-in / held-out (all tasks), base held-in."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NormalisationWarning)
            out: dict[str, float | None] = {}
            for kind in ("base", "multitask"):
                cell = self.baseline(group, kind)
                out[f"{kind}_held_in"] = self.normalised(cell.key, self.held_in).mean if cell else None
                out[f"{kind}_held_out"] = self.normalised(cell.key, self.held_out).mean if cell else None
        return out

    def _group_order(self, name: str) -> int:
        return next((i for i, g in enumerate(self.groups) if g.name == name), len(self.groups))

    # -- export --------------------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per (cell, task, evaluated split, metric), the columns of ``mergescale study export``."""
        out = []
        for cell in self.cells:
            for s in self._by_cell.get(cell.key, []):
                out.append(
                    {
                        "group": cell.group,
                        "base_kind": cell.base_kind,
                        "size": cell.size,
                        "kind": cell.kind,
                        "method": cell.method or cell.kind,
                        "label": cell.label,
                        "params": json.dumps(cell.params, sort_keys=True),
                        "k": cell.k,
                        "seed": cell.seed,
                        "experts": ",".join(cell.experts),
                        "task": s.task,
                        "split": s.split,
                        "eval_split": s.eval_split,
                        "metric": s.metric,
                        "primary": s.metric == self.tasks[s.task].primary_metric,
                        "score": s.score,
                        "normalised": s.normalised,
                        "cell": cell.key,
                    }
                )
        return out


# PMA rows of the current spec's jobs (rows written without a job, e.g. by hand, count too)
_CURRENT_PMA = "key IS NULL OR key IN (SELECT key FROM pma_jobs WHERE current = 1)"


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _json(text: str | None, default: Any) -> Any:
    return json.loads(text) if text else default


def load_study(study_dir: str | Path) -> StudyResults:
    """Read a study folder's store (the current spec's cells) into :class:`StudyResults`."""
    with StudyStore.open(study_dir) as store:
        groups = [GroupInfo(**dict(r)) for r in store.query("SELECT name, base_kind, size, parameters FROM groups ORDER BY rowid")]
        tasks = {
            r["name"]: TaskInfo(r["name"], r["split"], r["category"], r["primary_metric"])
            for r in store.query("SELECT * FROM tasks ORDER BY rowid")
        }
        cells = [
            CellRecord(
                key=r["key"],
                kind=r["kind"],
                group=r["group_name"],
                base_kind=r["base_kind"],
                size=r["size"],
                method=r["method"],
                label=r["label"],
                entry=r["entry"],
                params=_json(r["params"], {}),
                k=r["k"],
                seed=r["seed"],
                experts=tuple(_json(r["experts"], [])),
                task=r["task"],
                draw_key=r["draw_key"],
                selection=_json(r["selection"], None),
                wall_s=r["wall_s"],
                merge_s=r["merge_s"],
                eval_s=r["eval_s"],
                peak_rss=r["peak_rss"],
                bytes_read=r["bytes_read"],
            )
            for r in store.query("SELECT * FROM cells WHERE current = 1 ORDER BY group_name, kind, entry, k, seed, key")
        ]
        scores = [
            ScoreRecord(r["cell_key"], r["task"], r["split"], r["eval_split"], r["metric"], r["score"], r["normalised"])
            for r in store.query(
                "SELECT s.* FROM scores s JOIN cells c ON s.cell_key = c.key WHERE c.current = 1 "
                "ORDER BY s.cell_key, s.task, s.eval_split, s.metric"
            )
        ]
        draw_keys = {c.draw_key for c in cells if c.draw_key}
        draws = [
            DrawRecord(
                r["key"], r["group_name"], r["k"], r["seed"], tuple(_json(r["experts"], [])), r["bytes_read"],
                r["merge_s"], r["plans"], r["outputs"], r["peak_rss"],
            )  # fmt: skip
            for r in store.query("SELECT * FROM draws ORDER BY group_name, k, seed")
            if r["key"] in draw_keys
        ]
        diagnostics: dict[str, dict[tuple[str, str, str], float | None]] = {}
        for r in store.query("SELECT * FROM diagnostics"):
            if r["draw_key"] in draw_keys:
                diagnostics.setdefault(r["draw_key"], {})[(r["stat"], r["a"], r["b"])] = r["value"]
        name = store.meta("name") or "?"
        spec = _json(store.meta("spec"), {})
        points = [
            PMAPoint(
                r["run"], r["kind"], r["strategy"], r["alpha"], r["n"], r["interval"], r["end_step"], r["loss"],
                r["last_loss"], r["annealed_loss"], r["recovered"], _json(r["scores"], {}),
            )  # fmt: skip
            for r in (
                store.query(
                    f"SELECT * FROM pma_points WHERE {_CURRENT_PMA} ORDER BY run, kind, strategy, alpha, n, interval, "
                    "end_step"
                )
                if store.has_table("pma_jobs")
                else []
            )
        ]
        curves = [
            CurvePoint(r["run"], r["experiment"], r["variant"], r["step"], r["loss"], r["grad_norm"])
            for r in (
                store.query(f"SELECT * FROM pma_curves WHERE {_CURRENT_PMA} ORDER BY run, experiment, variant, step")
                if store.has_table("pma_jobs")
                else []
            )
        ]
        pma_results = {
            (r["run"], r["experiment"], r["variant"], r["metric"]): r["value"]
            for r in (
                store.query(f"SELECT * FROM pma_results WHERE {_CURRENT_PMA}") if store.has_table("pma_jobs") else []
            )
        }
    return StudyResults(
        Path(study_dir), name, spec, groups, tasks, cells, scores, draws, diagnostics, points, curves, pma_results
    )

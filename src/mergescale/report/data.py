"""What the report draws and judges, derived once from the study folders (pure, no I/O but :func:`load`).

Several study folders are combined into one :class:`~mergescale.study.results.StudyResults` (:func:`combine`):
a merging study and a PMA study side by side, or two merging studies. Group names (and PMA run names) that two
studies share are prefixed with their study's name so that neither hides the other; record keys are prefixed
with the study's position so that content keys equal in two stores never mix their scores.

:func:`prepare` turns the combined results into :class:`ReportData`: the paper's summary rows, the base model on
the same held-in tasks as each draw (the reference line of the held-in figure), per-task retention at the
largest number of experts, the task-vector diagnostics of each merge beside its held-in score, and the cost.
"""

from __future__ import annotations

import json
import math
import sqlite3
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from mergescale.errors import ConfigError, OutputError
from mergescale.evaluate.normalise import NormalisationWarning, SeedSummary, over_seeds
from mergescale.study.results import GroupInfo, StudyResults, SummaryRow, TaskInfo, load_study
from mergescale.study.store import StudyStore

KIND_ORDER = ("pt", "it")
KIND_NAMES = {"pt": "pre-trained", "it": "instruction-tuned"}


@dataclass(frozen=True)
class Provenance:
    """What a study's store says about how it was run (read from columns ``load_study`` does not type)."""

    study_dir: Path
    name: str
    created: str | None
    first_finished: str | None
    last_finished: str | None
    versions: tuple[dict[str, str], ...]  # the distinct package versions its cells were evaluated with

    @property
    def span_s(self) -> float | None:
        """Seconds from the first to the last finished cell (one-second resolution), None without two."""
        if not self.first_finished or not self.last_finished:
            return None
        try:
            return (datetime.fromisoformat(self.last_finished) - datetime.fromisoformat(self.first_finished)).total_seconds()
        except ValueError:
            return None


@dataclass(frozen=True)
class LoadedStudy:
    results: StudyResults
    provenance: Provenance


def load(study_dir: str | Path) -> LoadedStudy:
    """Read one study folder (its typed records and its provenance); a clear one-line error when unreadable."""
    folder = Path(study_dir)
    try:
        results = load_study(folder)
    except sqlite3.DatabaseError as exc:
        raise OutputError(
            f"{folder / 'study.sqlite'}: cannot read the study store ({exc}); was it written by an older "
            "mergescale? Rerun `mergescale study run` on it to bring it up to date"
        ) from None
    return LoadedStudy(results, provenance(folder, results.name))


def provenance(study_dir: Path, name: str) -> Provenance:
    with StudyStore.open(study_dir) as store:
        created = store.meta("created")
        row = store.query("SELECT MIN(finished) AS a, MAX(finished) AS b FROM cells WHERE current = 1")[0]
        versions = [r["versions"] for r in store.query("SELECT DISTINCT versions FROM cells WHERE current = 1")]
    parsed = []
    for text in versions:
        try:
            value = json.loads(text) if text else None
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and value not in parsed:
            parsed.append({str(k): str(v) for k, v in value.items()})
    return Provenance(Path(study_dir), name, created, row["a"], row["b"], tuple(parsed))


# -- combining studies -----------------------------------------------------------------------------------------
def combine(studies: Sequence[StudyResults]) -> StudyResults:
    """One :class:`StudyResults` holding every record of ``studies`` (see the module docstring)."""
    if not studies:
        raise ConfigError("no study folder given")
    if len(studies) == 1:
        return studies[0]
    group_count: dict[str, int] = defaultdict(int)
    run_count: dict[str, int] = defaultdict(int)
    for s in studies:
        for g in s.groups:
            group_count[g.name] += 1
        for run in {p.run for p in s.pma_points} | {c.run for c in s.pma_curves} | {k[0] for k in s.pma_results}:
            run_count[run] += 1
    tasks: dict[str, TaskInfo] = {}
    owner: dict[str, Path] = {}
    groups: list[GroupInfo] = []
    cells, scores, draws, points, curves = [], [], [], [], []
    diagnostics: dict = {}
    pma_results: dict = {}
    for i, s in enumerate(studies):
        for name, t in s.tasks.items():
            known = tasks.get(name)
            if known is not None and (known.split, known.category) != (t.split, t.category):
                raise ConfigError(
                    f"task {name!r} is {known.split}/{known.category} in {owner[name]} but {t.split}/{t.category} in "
                    f"{s.study_dir}; studies reported together must agree on their tasks"
                )
            if known is None or (known.primary_metric is None and t.primary_metric is not None):
                tasks[name] = t
                owner[name] = s.study_dir

        def gname(name: str, s: StudyResults = s) -> str:
            return f"{s.name}/{name}" if group_count[name] > 1 else name

        def rname(run: str, s: StudyResults = s) -> str:
            return f"{s.name}/{run}" if run_count[run] > 1 else run

        def key(k: str | None, i: int = i) -> str | None:
            return None if k is None else f"{i}:{k}"

        groups += [replace(g, name=gname(g.name)) for g in s.groups]
        cells += [replace(c, key=key(c.key), group=gname(c.group), draw_key=key(c.draw_key)) for c in s.cells]
        scores += [replace(r, cell_key=key(r.cell_key)) for r in s.scores]
        draws += [replace(d, key=key(d.key), group=gname(d.group)) for d in s.draws]
        diagnostics.update({key(k): v for k, v in s.diagnostics.items()})
        points += [replace(p, run=rname(p.run)) for p in s.pma_points]
        curves += [replace(c, run=rname(c.run)) for c in s.pma_curves]
        pma_results.update({(rname(r), e, v, m): x for (r, e, v, m), x in s.pma_results.items()})
    name = " + ".join(s.name for s in studies)
    spec = {s.name: s.spec for s in studies}
    return StudyResults(
        studies[0].study_dir, name, spec, groups, tasks, cells, scores, draws, diagnostics, points, curves, pma_results
    )


# -- derived tables --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetentionRow:
    """Mean over seeds of merged ÷ expert on one held-in task, for one (group, method) at ``k``."""

    group: str
    label: str
    k: int
    task: str
    retention: SeedSummary


@dataclass(frozen=True)
class DiagnosticPoint:
    """One merge: its draw's task-vector statistics beside its held-in score (÷ expert)."""

    group: str
    label: str
    k: int
    seed: int
    mean_cosine: float | None
    mean_sign_agreement: float | None
    mean_relative_distance: float | None
    held_in: float | None


@dataclass(frozen=True)
class Cost:
    """What the study cost, from the store (every figure a sum or maximum over its records)."""

    merges: int
    baselines: int
    reads: int  # draws: one read of the base and k experts feeds every method's merge
    evaluations: int  # (model, task, split) evaluations
    bytes_read_mean: float | None  # per draw
    bytes_read_max: int | None
    bytes_read_total: int | None
    merge_s_total: float | None  # over draws
    eval_s_total: float | None  # over cells
    wall_s_total: float | None  # over cells (merge share + evaluation)
    span_s: float | None  # first to last finished cell, over the studies
    peak_rss: int | None


@dataclass
class ReportData:
    """Everything the figures, the findings and the tables read."""

    results: StudyResults
    rows: list[SummaryRow]
    base_held_in: dict[tuple[str, int], SeedSummary]  # (group, k) -> the base on each draw's held-in tasks
    retention: list[RetentionRow]
    diagnostic_points: list[DiagnosticPoint]
    cost: Cost
    studies: list[LoadedStudy] = field(default_factory=list)

    # -- orderings shared by figures and tables -------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """Method entries in spec order."""
        return list(dict.fromkeys(r.label for r in self.rows))

    @property
    def ks(self) -> list[int]:
        return sorted({r.k for r in self.rows})

    @property
    def groups(self) -> list[GroupInfo]:
        """Groups with merges, by base kind then size."""
        with_rows = {r.group for r in self.rows}
        return sorted((g for g in self.results.groups if g.name in with_rows), key=self.group_order)

    @property
    def sizes(self) -> list[str]:
        """Size labels, smallest model first."""
        seen: dict[str, int] = {}
        for g in self.groups:
            label = g.size or g.name
            seen[label] = min(seen.get(label, g.parameters or 0), g.parameters or 0)
        return sorted(seen, key=lambda s: (seen[s], s))

    @property
    def kinds(self) -> list[str]:
        kinds = list(dict.fromkeys(g.base_kind or "" for g in self.groups))
        return sorted(kinds, key=kind_order)

    def group_order(self, g: GroupInfo) -> tuple:
        return (kind_order(g.base_kind or ""), g.parameters or 0, g.size or "", g.name)

    def rows_of(self, group: str, label: str | None = None) -> list[SummaryRow]:
        return sorted((r for r in self.rows if r.group == group and (label is None or r.label == label)), key=lambda r: r.k)

    def row(self, group: str, label: str, k: int) -> SummaryRow | None:
        return next((r for r in self.rows if r.group == group and r.label == label and r.k == k), None)

    def group_at(self, kind: str, size: str) -> GroupInfo | None:
        return next((g for g in self.groups if (g.base_kind or "") == kind and (g.size or g.name) == size), None)

    @property
    def has_merges(self) -> bool:
        return bool(self.rows)

    @property
    def has_pma(self) -> bool:
        r = self.results
        return bool(r.pma_points or r.pma_curves or r.pma_results)


def kind_order(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def kind_name(kind: str | None) -> str:
    return KIND_NAMES.get(kind or "", kind or "base")


def human_count(n: int | None) -> str:
    """55584 -> '55.6k', 217792 -> '218k', 8_030_261_248 -> '8.03B'."""
    if n is None:
        return "?"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            value = n / div
            return f"{value:.3g}{unit}"
    return str(n)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def prepare(studies: Sequence[LoadedStudy] | StudyResults) -> ReportData:
    """The report's derived tables, from loaded study folders (or one :class:`StudyResults` built in memory)."""
    if isinstance(studies, StudyResults):
        loaded: list[LoadedStudy] = []
        results = studies
    else:
        loaded = list(studies)
        results = combine([s.results for s in loaded])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormalisationWarning)
        rows = results.summary()
        base = _base_on_draws(results)
        retention = _retention(results)
        points = _diagnostic_points(results)
    return ReportData(results, rows, base, retention, points, _cost(results, [s.provenance for s in loaded]), loaded)


def _base_on_draws(results: StudyResults) -> dict[tuple[str, int], SeedSummary]:
    """Per (group, k): the base model's held-in score (÷ expert) on the tasks of each seed's draw, over seeds."""
    per: dict[tuple[str, int], dict[int, float | None]] = defaultdict(dict)
    for cell in results.merges:
        base = results.baseline(cell.group, "base")
        if base is None or cell.k is None:
            continue
        seeds, seed = per[(cell.group, cell.k)], cell.seed or 0
        if seed not in seeds:  # the draw is the same for every method of (group, k, seed)
            seeds[seed] = results.normalised(base.key, cell.experts).mean
    return {key: over_seeds(list(v.values())) for key, v in per.items()}


def _retention(results: StudyResults) -> list[RetentionRow]:
    """Per (group, method entry) at the group's largest k: each held-in task's merged ÷ expert, over seeds."""
    largest: dict[str, int] = {}
    for c in results.merges:
        if c.k is not None:
            largest[c.group] = max(largest.get(c.group, 0), c.k)
    values: dict[tuple[str, str, int, str], list[float | None]] = defaultdict(list)
    for c in results.merges:
        if c.k != largest.get(c.group):
            continue
        prim = results.primary(c.key)
        for task in c.experts:
            s = prim.get(task)
            values[(c.group, c.label or c.method or "?", c.k, task)].append(s.normalised if s else None)
    return [RetentionRow(g, label, k, t, over_seeds(v)) for (g, label, k, t), v in values.items()]


def _diagnostic_points(results: StudyResults) -> list[DiagnosticPoint]:
    out = []
    for c in results.merges:
        stats = results.diagnostics.get(c.draw_key or "", {})
        if not stats or (c.k or 0) < 2:
            continue
        out.append(
            DiagnosticPoint(
                group=c.group,
                label=c.label or c.method or "?",
                k=c.k or 0,
                seed=c.seed or 0,
                mean_cosine=stats.get(("mean_cosine", "", "")),
                mean_sign_agreement=stats.get(("mean_sign_agreement", "", "")),
                mean_relative_distance=stats.get(("mean_relative_distance", "", "")),
                held_in=results.normalised(c.key, c.experts).mean,
            )
        )
    return out


def _sum(values: Iterable[float | int | None]) -> float | None:
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) if kept else None


def _cost(results: StudyResults, provenances: Sequence[Provenance]) -> Cost:
    draws = results.draws
    read = [d.bytes_read for d in draws if d.bytes_read is not None]
    evaluations = {(s.cell_key, s.task, s.eval_split) for s in results.scores}
    rss = [v for v in [*(c.peak_rss for c in results.cells), *(d.peak_rss for d in draws)] if v is not None]
    spans = [p.span_s for p in provenances if p.span_s is not None]
    return Cost(
        merges=len(results.merges),
        baselines=sum(c.kind != "merge" for c in results.cells),
        reads=len(draws),
        evaluations=len(evaluations),
        bytes_read_mean=sum(read) / len(read) if read else None,
        bytes_read_max=max(read) if read else None,
        bytes_read_total=sum(read) if read else None,
        merge_s_total=_sum(d.merge_s for d in draws),
        eval_s_total=_sum(c.eval_s for c in results.cells),
        wall_s_total=_sum(c.wall_s for c in results.cells),
        span_s=sum(spans) if spans else None,
        peak_rss=max(rss) if rss else None,
    )

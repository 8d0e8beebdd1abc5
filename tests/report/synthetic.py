"""Synthetic study tables for the report tests: StudyResults built directly (through the real aggregation of
:mod:`mergescale.study.results`), PMA records, and the same written into a real study store.

A merge's normalised score on every task it is judged on is set to the value its (group, method, k, seed)
asks for, so each category mean, the mean over categories and hence the aggregate equal that value; seeds add
``-spread, 0, +spread`` (three seeds: sample std = ``spread``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergescale.study.results import (
    CellRecord,
    CurvePoint,
    DrawRecord,
    GroupInfo,
    PMAPoint,
    ScoreRecord,
    StudyResults,
    TaskInfo,
)

HELD_IN = ["t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8"]
HELD_OUT = ["o1", "o2"]
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
KS = [2, 4, 8]
SEEDS = [0, 1, 2]
PARAMS = {"s": 1_000_000, "m": 8_000_000, "l": 64_000_000}


@dataclass(frozen=True)
class Group:
    name: str
    kind: str
    size: str

    @property
    def parameters(self) -> int:
        return PARAMS[self.size]


GROUPS = [Group("s-pt", "pt", "s"), Group("s-it", "it", "s"), Group("m-pt", "pt", "m"), Group("m-it", "it", "m")]

# value(group, method, k) -> (held-in mean, held-out mean, spread over seeds)
Values = Callable[[Group, str, int], tuple[float, float, float]]


def paper_like(group: Group, method: str, k: int) -> tuple[float, float, float]:
    """A world where every merging claim holds: IT > PT, larger > smaller, held-out > 1 and rising with k for IT,
    the larger model drops less with k, methods alike at the largest IT size, merges beat multitask held-out."""
    size = {"s": 0, "m": 1, "l": 2}[group.size]
    strong = group.kind == "it"
    base = 0.55 + 0.15 * size + (0.15 if strong else 0.0)
    drop = (0.30 - 0.12 * size - (0.05 if strong else 0.0)) * (k - 2) / 6
    method_gap = {"linear": 0.0, "task_arithmetic": 0.01, "ties": 0.005, "dare_ties": -0.005}[method]
    if not (strong and size == 1):
        method_gap *= 8
    held_in = base - drop + method_gap
    held_out = 1.10 + (0.02 * (k - 2) if strong else 0.0) + method_gap
    return held_in, held_out, 0.01


def merging_study(
    values: Values = paper_like,
    *,
    groups: Sequence[Group] = GROUPS,
    methods: Sequence[str] = METHODS,
    ks: Sequence[int] = KS,
    seeds: Sequence[int] = SEEDS,
    multitask: tuple[float, float] | None = (0.95, 1.15),
    base_held_in: float = 0.3,
    name: str = "synthetic",
    diagnostics: bool = True,
) -> StudyResults:
    tasks = {t: TaskInfo(t, "held_in", f"cat_{t}", "acc") for t in HELD_IN}
    tasks.update({t: TaskInfo(t, "held_out", f"cat_{t}", "acc") for t in HELD_OUT})
    cells: list[CellRecord] = []
    scores: list[ScoreRecord] = []
    draws: list[DrawRecord] = []
    stats: dict[str, dict[tuple[str, str, str], float | None]] = {}

    def add(key: str, kind: str, g: Group, normalised: dict[str, float], **fields) -> None:
        record = dict(
            key=key, kind=kind, group=g.name, base_kind=g.kind, size=g.size, method=None, label=None, entry=None,
            params={}, k=None, seed=None, experts=(), task=None, draw_key=None, selection=None, wall_s=1.0,
            merge_s=0.1, eval_s=0.9, peak_rss=100_000_000, bytes_read=None,
        )  # fmt: skip
        record.update(fields)
        cells.append(CellRecord(**record))
        for task, value in normalised.items():
            split = tasks[task].split
            scores.append(ScoreRecord(key, task, split, "test", "acc", 0.5 * value, value))

    for g in groups:
        add(f"{g.name}/base", "base", g, {**{t: base_held_in for t in HELD_IN}, **{t: 1.0 for t in HELD_OUT}})
        for t in HELD_IN:
            add(f"{g.name}/expert/{t}", "expert", g, {t: 1.0}, task=t, experts=(t,))
        if multitask is not None:
            add(f"{g.name}/multitask", "multitask", g, {**{t: multitask[0] for t in HELD_IN}, **{t: multitask[1] for t in HELD_OUT}})
        for k in ks:
            for seed in seeds:
                key = f"{g.name}/{k}/{seed}"
                experts = tuple(HELD_IN[(seed + i) % len(HELD_IN)] for i in range(k))
                draws.append(DrawRecord(key, g.name, k, seed, experts, 1000 * k, 0.01 * k, 1, len(methods), 10**8))
                if diagnostics:  # more experts, more overlap: cosine and sign agreement grow with k
                    stats[key] = {("mean_cosine", "", ""): 0.02 * k + 0.005 * seed,
                                  ("mean_sign_agreement", "", ""): 0.5 + 0.005 * k,
                                  ("mean_relative_distance", "", ""): 0.2}  # fmt: skip
        for e, method in enumerate(methods):
            for k in ks:
                for s_i, seed in enumerate(seeds):
                    held_in, held_out, spread = values(g, method, k)
                    noise = (s_i - (len(seeds) - 1) / 2) * spread if len(seeds) > 1 else 0.0
                    experts = tuple(HELD_IN[(seed + i) % len(HELD_IN)] for i in range(k))
                    normalised = {**{t: held_in + noise for t in experts}, **{t: held_out + noise for t in HELD_OUT}}
                    add(f"{g.name}/{method}/{k}/{seed}", "merge", g, normalised, method=method, label=method, entry=e,
                        k=k, seed=seed, experts=experts, draw_key=f"{g.name}/{k}/{seed}", bytes_read=1000 * k)  # fmt: skip
    return StudyResults(
        Path("/synthetic"), name, {"methods": [{"method": m} for m in methods], "num_experts": list(ks), "seeds": list(seeds)},
        [GroupInfo(g.name, g.kind, g.size, g.parameters) for g in groups], tasks, cells, scores, draws, stats,
    )  # fmt: skip


# -- PMA -------------------------------------------------------------------------------------------------------
def pma_records(
    *,
    average_gain: float = 0.05,  # (last − average) / last along the run
    anneal_gain: float = 0.08,
    late_n_gain: float = 0.03,  # loss(N small) − loss(N large), relative, at the late end step
    early_n_gain: float = -0.03,  # the same at the early end step (negative: larger N hurts)
    ema_gain: float = 0.02,  # loss(α 0.1) − loss(α 0.2), relative, early
    wma_gain: float = 0.02,  # best other − WMA, relative, early
    grad_std: tuple[float, float] = (0.05, 0.30),  # std of the gradient norm: PMA-init, last
    spike: tuple[float, float] = (2.0, 2.6),  # final loss: average, rollback
    runs: Sequence[str] = ("s",),
) -> tuple[list[PMAPoint], list[CurvePoint], dict]:
    """PMA rows whose every claim goes the way the gains say (positive: the paper's way)."""
    points: list[PMAPoint] = []
    curves: list[CurvePoint] = []
    results: dict = {}
    for run in runs:
        steps = [100, 200, 300, 400, 500]
        for i, step in enumerate(steps):
            last = 3.0 - 0.2 * i + (0.03 if i % 2 else -0.03)
            annealed = last * (1 - anneal_gain) if step == steps[-1] else None
            for strategy, alpha in (("sma", None), ("ema", 0.2), ("wma", None)):
                loss = last * (1 - average_gain) * (1.0 if strategy == "sma" else 1.001)
                recovered = (loss - last) / (annealed - last) if annealed is not None else None
                points.append(PMAPoint(run, "along", strategy, alpha, 4, "", step, loss, last, annealed, recovered, {}))
        for end, n_gain in ((200, early_n_gain), (500, late_n_gain)):
            last = 3.0 if end == 200 else 2.2
            for strategy, alpha, offset in (("sma", None, 0.0), ("ema", 0.2, 0.0), ("ema", 0.1, ema_gain), ("wma", None, -wma_gain)):
                for n, extra in ((3, 0.0), (10, -n_gain)):
                    early_offset = offset if end == 200 else 0.0
                    loss = last * (0.97 + early_offset + extra)
                    points.append(PMAPoint(run, "ablation", strategy, alpha, n, "", end, loss, last, None, None, {}))
        for step in range(1, 31):
            wiggle = 1 if step % 2 else -1
            curves.append(CurvePoint(run, "pma_init", "pma", step, 2.0 - 0.01 * step, 1.0 + wiggle * grad_std[0]))
            curves.append(CurvePoint(run, "pma_init", "last", step, 2.05 - 0.01 * step, 1.0 + wiggle * grad_std[1]))
        for step in range(0, 40):
            spiked = 2.0 if step < 20 else 9.0
            curves.append(CurvePoint(run, "spike", "spiked", step, spiked, None))
            curves.append(CurvePoint(run, "spike", "unspiked", step, 2.0 - 0.005 * step, None))
            if step >= 20:
                frac = (step - 20) / 19
                curves.append(CurvePoint(run, "spike", "average", step, 2.0 + (spike[0] - 2.0) * frac, None))
                curves.append(CurvePoint(run, "spike", "rollback", step, 2.0 + (spike[1] - 2.0) * frac, None))
        results[(run, "spike", "spiked", "injected_step")] = 20.0
        results[(run, "spike", "average", "final_loss")] = spike[0]
        results[(run, "spike", "rollback", "final_loss")] = spike[1]
    return points, curves, results


def pma_study(**kwargs) -> StudyResults:
    points, curves, results = pma_records(**kwargs)
    return StudyResults(Path("/synthetic-pma"), "pma", {}, [], {}, [], [], [], {}, points, curves, results)


def write_store(folder: Path, results: StudyResults) -> Path:
    """Write ``results`` into a real study store at ``folder`` (so that load_study reads it back)."""
    from mergescale.study.store import StudyStore

    store = StudyStore.create_or_open(folder, results.name, json.dumps(results.spec))
    try:
        store.write_setup(
            [{"name": g.name, "base_kind": g.base_kind, "size": g.size, "parameters": g.parameters, "base": "b",
              "base_identity": "x", "multitask": None, "experts": "{}"} for g in results.groups],
            [{"name": t.name, "split": t.split, "category": t.category} for t in results.tasks.values()],
            "spec-key",
        )  # fmt: skip
        by_cell: dict[str, list[ScoreRecord]] = {}
        for s in results.scores:
            by_cell.setdefault(s.cell_key, []).append(s)
        cells = [
            {"key": c.key, "kind": c.kind, "group_name": c.group, "base_kind": c.base_kind, "size": c.size,
             "method": c.method, "label": c.label, "entry": c.entry, "params": json.dumps(c.params), "k": c.k,
             "seed": c.seed, "experts": json.dumps(list(c.experts)), "task": c.task, "draw_key": c.draw_key,
             "wall_s": c.wall_s, "merge_s": c.merge_s, "eval_s": c.eval_s, "peak_rss": c.peak_rss,
             "bytes_read": c.bytes_read, "versions": json.dumps({"mergescale": "test"})}
            for c in results.cells
        ]  # fmt: skip
        scores = [
            {"cell_key": s.cell_key, "task": s.task, "split": s.split, "eval_split": s.eval_split, "metric": s.metric,
             "score": s.score, "normalised": s.normalised}
            for s in results.scores
        ]  # fmt: skip
        if cells:
            store.write_cells(cells, scores, primary={t.name: t.primary_metric for t in results.tasks.values() if t.primary_metric})
        with store.transaction() as c:
            c.executemany(
                "INSERT INTO pma_points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(p.run, p.kind, p.strategy, p.alpha, p.n, p.interval, p.end_step, p.loss, p.last_loss,
                  p.annealed_loss, p.recovered, json.dumps(p.scores), None) for p in results.pma_points],
            )  # fmt: skip
            c.executemany(
                "INSERT INTO pma_curves VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(p.run, p.experiment, p.variant, p.step, p.loss, p.grad_norm, None) for p in results.pma_curves],
            )
            c.executemany(
                "INSERT INTO pma_results VALUES (?, ?, ?, ?, ?, ?)",
                [(*key, value, None) for key, value in results.pma_results.items()],
            )
    finally:
        store.close()
    return folder

"""What a worker does: evaluate a group's baselines, or run one draw (one read, every merge of it, evaluated).

A draw is (group, k, seed): its merge cells are every method × parameter set over the same base and experts, so
they are one engine plan whose outputs are all of them — the base and the experts are read once, whatever the
number of methods. Merged state dicts stay in memory (``MemorySink``) and are copied into the group's evaluation
model; when they would not fit the memory budget, the outputs are split over several plans (each reading the
inputs again), and a merge too large for memory on its own is written to a scratch folder and evaluated from
there. The task-vector diagnostics come from the first plan's read (:mod:`.diagnostics`).

Everything here runs in a worker (a process of the pool, a Ray task, or the runner's own process) and returns
plain picklable results; only the runner writes the store.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergescale.api import SourcePool, plan_merges
from mergescale.config import InputModel, MergeConfig
from mergescale.engine.memory import (
    MemoryBudgetError,
    MemoryPlan,
    current_rss,
    high_water_mark,
    plan_memory,
    stacked_working_bytes,
)
from mergescale.engine.plan import TIED_HEADS, tied_embeddings
from mergescale.engine.stream import run_plan
from mergescale.io.writer import MemorySink, ModelFolderSink, TensorSink
from mergescale.methods import get_method
from mergescale.study.diagnostics import Diagnostic, TaskVectorStats
from mergescale.study.grid import BaselineCell, MergeCell, StudyGroup
from mergescale.study.models import GroupModel, TaskScore, quiet_transformers
from mergescale.study.pma_jobs import PMAJob, PMAJobResult, run_pma_job
from mergescale.study.spec import EvalSpec

Scalar = bool | int | float


# ---------------------------------------------------------------------------------------------------------------
# payloads and results (picklable)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyContext:
    """What every worker needs, whatever job it runs."""

    tasks_source: Any  # a suite path, or HarnessTasks
    eval: EvalSpec
    held_out: tuple[str, ...]
    diagnostics: bool
    memory_budget: int  # bytes this worker may hold in models (merged outputs, stacks, the evaluation model)
    scratch: str  # folder for merges too large to keep in memory


@dataclass(frozen=True)
class BaselineJob:
    group: StudyGroup
    cells: tuple[BaselineCell, ...]


@dataclass(frozen=True)
class DrawJob:
    group: StudyGroup
    k: int
    seed: int
    experts: tuple[str, ...]
    draw_key: str
    cells: tuple[MergeCell, ...]
    # each expert's validation scores (task -> primary metric), to normalise selection on validation
    expert_validation: dict[str, float] = field(default_factory=dict)


@dataclass
class CellResult:
    key: str
    scores: list[TaskScore]
    eval_seconds: float
    merge_seconds: float = 0.0
    chosen: dict[str, Scalar] | None = None
    selection: dict[str, Any] | None = None


@dataclass
class JobResult:
    """A job's cells with their scores, and what the job cost."""

    cells: list[CellResult]
    seconds: float
    peak_rss: int | None
    bytes_read: int = 0
    merge_seconds: float = 0.0
    plans: int = 0
    outputs: int = 0
    diagnostics: list[Diagnostic] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------------------------
class StudyWorker:
    """A worker's state: the tasks (loaded once) and the evaluation model of the group it last worked on."""

    def __init__(self, context: StudyContext, *, emit: Callable[[Any], None] | None = None) -> None:
        self.context = context
        self.emit = emit or (lambda event: None)
        self._tasks: dict[str, Any] | None = None
        self._model: tuple[str, GroupModel] | None = None

    def tasks(self) -> dict[str, Any]:
        """Task name -> Task (our format), or the name itself for harness tasks."""
        if self._tasks is None:
            source = self.context.tasks_source
            if isinstance(source, str):
                from mergescale.evaluate.tasks import load_suite

                self._tasks = {t.name: t for t in load_suite(source).tasks}
            else:
                self._tasks = {n: n for n in (*source.held_in, *source.held_out)}
        return self._tasks

    def model(self, group: StudyGroup) -> GroupModel:
        # one group's model at a time: the previous one is dropped first, so two never coexist
        if self._model is None or self._model[0] != group.base.path:
            self._model = None
            self._model = (group.base.path, GroupModel(group.base.path, self.context.eval))
        return self._model[1]

    def run(self, job: BaselineJob | DrawJob | PMAJob) -> JobResult | PMAJobResult:
        start = time.perf_counter()
        reset_peak_rss()
        # no per-load / per-save progress bars from transformers inside a study (it has its own), restored after
        with warnings.catch_warnings(record=True) as caught, quiet_transformers():
            warnings.simplefilter("always")
            if isinstance(job, PMAJob):
                result: JobResult | PMAJobResult = run_pma_job(job, self.context.eval.batch_size)
            elif isinstance(job, BaselineJob):
                result = self._baselines(job)
            else:
                result = self._draw(job)
        result.seconds = time.perf_counter() - start
        result.peak_rss = peak_rss()
        result.warnings = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
        return result

    # -- baselines -----------------------------------------------------------------------------------------------
    def _baselines(self, job: BaselineJob) -> JobResult:
        model = self.model(job.group)
        tasks = self.tasks()
        out = []
        for cell in job.cells:
            t0 = time.perf_counter()
            model.load_folder(cell.model.path)  # the base's too: the model may hold a merge of the group by now
            scores = model.score([tasks[t] for t in cell.tasks], "test")
            if cell.validation:
                scores += model.score([tasks[t] for t in cell.validation], "validation")
            out.append(CellResult(cell.key, scores, time.perf_counter() - t0))
        return JobResult(out, 0.0, None)

    # -- draws ---------------------------------------------------------------------------------------------------
    def _draw(self, job: DrawJob) -> JobResult:
        model = self.model(job.group)
        outputs = [(cell, i, _config(job, cell, params)) for cell in job.cells for i, params in enumerate(cell.candidates)]
        chunks, scratch = plan_chunks(job, outputs, self.context, model.nbytes)
        sizes = draw_sizes(job, self.context, model.nbytes)
        result = JobResult([], 0.0, None, outputs=len(outputs), plans=len(chunks))
        merged: dict[tuple[str, int], Any] = {}  # (cell key, candidate) -> state dict or scratch folder
        pending = {cell.key: len(cell.candidates) for cell in job.cells}
        merge_seconds: dict[str, float] = {}
        tmp = Path(tempfile.mkdtemp(prefix="draw-", dir=self.context.scratch)) if scratch else None
        try:
            for n, chunk in enumerate(chunks):
                sinks: list[TensorSink] = []
                with SourcePool() as pool:
                    for cell, i, cfg in chunk:
                        if (cell.key, i) in scratch:
                            assert tmp is not None
                            ref = pool.add(cfg.base_model or cfg.models[0].model)
                            sinks.append(ModelFolderSink(tmp / f"{cell.key}-{i}", config=pool.sources[ref].config))
                        else:
                            sinks.append(MemorySink())
                    plan = plan_merges([(cfg, sink) for (_, _, cfg), sink in zip(chunk, sinks, strict=True)], pool=pool)
                    observers = []
                    stats_obs = None
                    if n == 0 and self.context.diagnostics:
                        stats_obs = _diagnostics_observer(pool, job)
                        observers = [stats_obs] if stats_obs is not None else []
                    held = sum(1 for v in merged.values() if not isinstance(v, str))
                    in_memory = held + sum(1 for cell, i, _ in chunk if (cell.key, i) not in scratch)
                    memory = engine_memory(plan, self.context, sizes, in_memory)
                    stats = run_plan(plan, device=self.context.eval.device, progress=False, observers=observers,
                                     memory=memory)  # fmt: skip
                result.bytes_read += stats.bytes_read
                result.merge_seconds += stats.seconds
                if stats_obs is not None and stats_obs.tensors:
                    result.diagnostics = stats_obs.result()
                for (cell, i, _), sink in zip(chunk, sinks, strict=True):
                    merged[(cell.key, i)] = sink.state_dict if isinstance(sink, MemorySink) else str(tmp / f"{cell.key}-{i}")
                    merge_seconds[cell.key] = merge_seconds.get(cell.key, 0.0) + stats.seconds / len(chunk)
                    pending[cell.key] -= 1
                del sinks, plan
                # evaluate (and let go of) every cell whose candidates are all merged
                for cell in job.cells:
                    if pending.get(cell.key) == 0:
                        del pending[cell.key]
                        cell_result = self._evaluate_cell(job, cell, merged, model)
                        cell_result.merge_seconds = merge_seconds[cell.key]
                        result.cells.append(cell_result)
                        for i in range(len(cell.candidates)):
                            merged.pop((cell.key, i), None)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return result

    def _evaluate_cell(
        self, job: DrawJob, cell: MergeCell, merged: dict[tuple[str, int], Any], model: GroupModel
    ) -> CellResult:
        tasks = self.tasks()
        t0 = time.perf_counter()
        chosen = 0
        selection = None
        if cell.select == "validation":
            ratios = []
            for i in range(len(cell.candidates)):
                _load(model, merged[(cell.key, i)])
                scores = model.score([tasks[t] for t in cell.experts], "validation")
                ratios.append(_validation_ratio(scores, job.expert_validation))
            defined = [(r, i) for i, r in enumerate(ratios) if r is not None]
            chosen = max(defined, key=lambda ri: (ri[0], -ri[1]))[1] if defined else 0
            selection = {
                "rule": "the highest mean over the drawn held-in tasks of validation score / expert's validation score "
                "(primary metric); ties go to the first candidate",
                "candidates": [dict(c) for c in cell.candidates],
                "validation": ratios,
                "chosen": chosen,
            }
        _load(model, merged[(cell.key, chosen)])
        scores = model.score([tasks[t] for t in (*cell.experts, *self.context.held_out)], "test")
        return CellResult(
            cell.key, scores, time.perf_counter() - t0, chosen=dict(cell.candidates[chosen]), selection=selection
        )


def _load(model: GroupModel, merged: Any) -> None:
    if isinstance(merged, str):
        model.load_folder(merged)
    else:
        model.load_state_dict(merged)


def _validation_ratio(scores: list[TaskScore], expert: dict[str, float]) -> float | None:
    ratios = []
    for s in scores:
        if not s.primary or s.value is None:
            continue
        ref = expert.get(s.task)
        if ref is None or ref == 0 or not math.isfinite(ref):
            continue
        ratios.append(s.value / ref)
    return sum(ratios) / len(ratios) if ratios else None


def _config(job: DrawJob, cell: MergeCell, params: dict[str, Scalar]) -> MergeConfig:
    """The merge of one cell's parameter set as a mergekit-style config.

    Per-model parameters go on every expert (``weight`` 1 unless given, so Σ τᵢ is scaled by λ alone); the base is
    passed only to methods that need it (averaging is over the experts, as in the paper); the draw's seed seeds
    the random masks of DARE-style methods.
    """
    method = get_method(cell.method)
    model_keys = {p.name for p in method.model_params}
    model_params = {k: v for k, v in params.items() if k in model_keys}
    if "weight" in model_keys and "weight" not in model_params:
        model_params["weight"] = 1.0
    global_params = {k: v for k, v in params.items() if k not in model_keys}
    return MergeConfig(
        merge_method=cell.method,
        base_model=job.group.base.path if method.base == "required" else None,
        models=[InputModel(model=job.group.experts[t].path, parameters=model_params or None) for t in cell.experts],
        parameters=global_params or None,
        seed=job.seed,
    )


def _diagnostics_observer(pool: SourcePool, job: DrawJob) -> TaskVectorStats | None:
    """Statistics of the draw's task vectors, when its plan reads the base (methods that use it)."""
    index = {str(Path(p).resolve()): i for i, p in enumerate(pool.folders)}
    base = index.get(job.group.base.path)
    experts = {index[job.group.experts[t].path]: t for t in job.experts if job.group.experts[t].path in index}
    if base is None or len(experts) != len(job.experts):
        return None
    return TaskVectorStats(base, experts)


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
def plan_chunks(
    job: DrawJob, outputs: Sequence[tuple[MergeCell, int, MergeConfig]], context: StudyContext, model_bytes: int
) -> tuple[list[list[tuple[MergeCell, int, MergeConfig]]], set[tuple[str, int]]]:
    """Split a draw's outputs into plans that fit the memory budget, and pick those to write to scratch.

    A merged output held in memory costs its bytes; every output costs its method's working memory on the
    largest tensor (the engine's plan for it: a ``(k, *shape)`` float32 stack, or one block and the method's
    state for stacked methods that block large tensors, see :func:`~mergescale.engine.memory.stacked_working_bytes`;
    one float32 tensor for linear ones); the evaluation model and the diagnostics' inputs are held throughout. A
    cell's candidates stay in one plan when they fit, since selection evaluates them together.
    """
    sizes = draw_sizes(job, context, model_bytes)
    total, largest, k = sizes.total, sizes.largest, len(job.experts)
    room = context.memory_budget - sizes.held

    def work(cfg: MergeConfig) -> int:
        method = get_method(cfg.merge_method)
        if method.linear_coefficients is not None:
            return 4 * largest * 2
        return stacked_working_bytes(method.blocked is not None, k, largest)

    chunks: list[list[tuple[MergeCell, int, MergeConfig]]] = [[]]
    used = 0
    scratch: set[tuple[str, int]] = set()
    by_cell: dict[str, list[tuple[MergeCell, int, MergeConfig]]] = {}
    for out in outputs:
        by_cell.setdefault(out[0].key, []).append(out)
    for group in by_cell.values():
        cost = sum(total + work(cfg) for _, _, cfg in group)
        if chunks[-1] and used + cost > room:
            chunks.append([])
            used = 0
        for cell, i, cfg in group:
            if total + work(cfg) > room:
                scratch.add((cell.key, i))  # alone it does not fit: written to disk, evaluated from there
                used += work(cfg)
            else:
                used += total + work(cfg)
            chunks[-1].append((cell, i, cfg))
    return [c for c in chunks if c], scratch


@dataclass(frozen=True)
class DrawSizes:
    """What a draw's memory planning needs of its models: a merged model's bytes (``total``), the largest
    tensor's entries, and what the worker holds throughout (the evaluation model, the diagnostics' inputs)."""

    total: int
    largest: int
    held: int


def draw_sizes(job: DrawJob, context: StudyContext, model_bytes: int) -> DrawSizes:
    """The sizes of the draw's base from its headers (tied heads are not written), ``model_bytes`` the
    evaluation model's."""
    sizes = _tensor_sizes(job.group.base.path)  # (bytes, entries) per tensor
    largest = max((numel for _, numel in sizes), default=0)
    diagnostics = 4 * (len(job.experts) + 1) * largest if context.diagnostics else 0
    return DrawSizes(sum(nbytes for nbytes, _ in sizes), largest, model_bytes + diagnostics)


def engine_memory(plan: Any, context: StudyContext, sizes: DrawSizes, in_memory: int) -> MemoryPlan:
    """The memory plan a draw's merge runs under: a ``max_memory`` of this process now, plus what the worker's
    budget leaves for merging once the evaluation model, the diagnostics' inputs and ``in_memory`` merged
    models (held from earlier plans of the draw, or this plan's) are taken out of it; stacked methods then
    block their large tensors to fit (:mod:`mergescale.engine.memory`). A budget too small for one block of
    some tensor (where :func:`plan_chunks` sent the outputs to scratch) is raised to the least that holds one:
    the draw then runs as lean as the engine can."""
    room = context.memory_budget - sizes.held - in_memory * sizes.total
    baseline = current_rss()
    budget = baseline + max(room, 0)
    while True:  # each refusal names the least that holds one more tensor: at most one round per tensor
        try:
            return plan_memory(plan, max_memory=budget, device=context.eval.device, baseline=baseline)
        except MemoryBudgetError as exc:
            if exc.needed <= budget:
                raise
            budget = exc.needed


def _tensor_sizes(folder: str) -> list[tuple[int, int]]:
    """(bytes, entries) of every tensor a merge of this base outputs (tied heads are not written)."""
    from mergescale.io.checkpoint import open_checkpoint

    source = open_checkpoint(folder)
    try:
        tied = tied_embeddings(source.config)
        return [(i.nbytes, i.numel) for n, i in source.info().items() if not (tied and n in TIED_HEADS)]
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------------------------
# peak memory of a job
# ---------------------------------------------------------------------------------------------------------------
def reset_peak_rss() -> None:
    """Start measuring this process's peak RSS afresh (Linux: ``/proc/self/clear_refs``); else a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss() -> int | None:
    """Peak resident memory since :func:`reset_peak_rss` (Linux ``VmHWM``), or the process's peak elsewhere."""
    hwm = high_water_mark()
    if hwm is not None:
        return hwm
    try:
        import resource

        scale = 1 if os.uname().sysname == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    except (ImportError, OSError):
        return None


def default_memory_budget() -> int:
    """Half the machine's memory: room for the interpreter, the page cache of the inputs and other work."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 << 30

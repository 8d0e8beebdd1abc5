"""Executes a :class:`MergePlan` tensor by tensor.

Order of work, with three threads so reading, computing and writing overlap:

1. **read** (background thread): for each tensor name, each needed source's tensor is mapped (safetensors: a
   copy-on-write memory map of the page cache, no copy) or read in its stored dtype, and queued. A byte budget
   bounds what is in flight, so memory follows the largest tensor, not the model size.
2. **compute** (calling thread, on ``device``): inputs of linear methods are kept in their stored dtype until
   they complete a block of an output's terms, which is then computed in cache-sized chunks straight into the
   output (:mod:`.linear_fold`, on ``workers`` threads; a float32 partial sum carries over between blocks, so
   memory does not grow with the number of inputs). Inputs of the other methods are converted straight into
   that output's ``(k, *shape)`` float32 stack, and when a name's last input has arrived the method runs on it.
3. **write** (background thread): each result, cast to its output dtype, is handed to its sink; results may
   wait for it up to a byte bound, so computing goes on while several outputs are written.

Any error or Ctrl-C aborts every sink, so no output folder is left behind.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mergescale.device import check_device
from mergescale.engine.allocator import allocator_settings, before_large_allocation
from mergescale.engine.blocks import run_blocked, runner
from mergescale.engine.buffers import BufferPool, empty_tensor
from mergescale.engine.finite import raise_if_nonfinite
from mergescale.engine.linear_outputs import LinearFolder
from mergescale.engine.memory import MemoryPlan, PeakRss, ProductMemory, blocked_merge, plan_memory
from mergescale.engine.plan import MergePlan, OutputSpec, Product, TensorJob, TensorRead
from mergescale.engine.progress import MergeProgress
from mergescale.engine.threads import ByteBudget, abort_run, finish_run
from mergescale.errors import NonFiniteError
from mergescale.io.checkpoint import SafetensorsCheckpoint
from mergescale.methods.base import MethodInputs, TensorMeta
from mergescale.methods.blocked import run_in_memory

_DONE = object()


class InputObserver(Protocol):
    """Sees every input tensor of a run as it is read (see ``run_plan``'s ``observers``)."""

    def observe(self, job: TensorJob, read: TensorRead, tensor: torch.Tensor) -> None: ...


@dataclass
class StreamStats:
    """What a run cost: wall time, bytes read, tensors produced, memory planned and used.

    ``peak_rss``: the process's peak resident set size during the run (bytes; mapped input pages count);
    ``planned_peak``: what the memory plan expected (:mod:`.memory`); ``blocked``: output tensors computed
    over row blocks.
    """

    seconds: float = 0.0
    bytes_read: int = 0
    tensors: int = 0
    outputs: int = 0
    peak_rss: int = 0
    planned_peak: int = 0
    blocked: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _OutputState:
    """Work in progress of one product (one output tensor of one output) of the current job."""

    spec: OutputSpec
    product: Product
    coefficients: dict[int, float] | None = None  # read -> coefficient, for linear methods
    acc: torch.Tensor | None = None  # (*shape) float32 partial sum of linear methods (or a non-float reference)
    result: torch.Tensor | None = None  # (*shape) output dtype: a linear method's finished tensor
    result_sum: float = 0.0  # sum of the float32 result: non-finite iff an entry is
    stack: torch.Tensor | None = None  # (k, *shape) float32 inputs of non-linear methods
    base: torch.Tensor | None = None  # (*shape) float32
    raw: dict[int, torch.Tensor] = field(default_factory=dict)  # read -> float32 input, before vocabulary alignment
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (k, ...) float32 stack
    memory: ProductMemory | None = None  # how it is computed ("blocked": over row blocks of the held inputs)


def run_plan(
    plan: MergePlan,
    *,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
    progress: bool | Callable[[int, int], None] = True,
    prefetch_bytes: int | None = None,
    threads: int | None = 1,
    workers: int | None = None,
    observers: Sequence[InputObserver] = (),
    max_memory: int | str | None = None,
    memory: MemoryPlan | None = None,
) -> StreamStats:
    """Stream every tensor of ``plan`` through its outputs' methods into their sinks.

    Args:
        plan: from :func:`~mergescale.engine.plan.build_plan`.
        device: where the arithmetic runs (``cpu``, ``cuda``, ``cuda:1``...); inputs are read on the CPU.
        check_finite: raise :class:`NonFiniteError` on NaN/Inf in any input tensor.
        progress: show a rich progress bar (True), nothing (False), or call ``fn(bytes_done, bytes_total)``.
        prefetch_bytes: how many bytes of input may be read ahead of the computation (linear methods' waiting
            inputs included). Default: 256 MB when every output is linear; 128 MB otherwise, because while a
            stacked method works on its (k, *shape) float32 stack, whatever is read ahead adds to the peak.
        threads: torch intra-op threads for the computation while the plan runs (restored afterwards); None
            leaves torch's setting. The default of 1 is deliberate: reading and converting, computing, and
            casting and writing already run in three threads, and methods work in cache-sized chunks whose
            many small ops lose more to waking an OpenMP team than they gain from it (a TIES merge of one
            32000x1024 tensor of 4 experts: 1.3 s with 1 thread, 12-30 s with 2 on a busy 2-core machine).
        workers: threads that share the chunks of linear methods' weighted sums (default: the CPU count, at
            most 4). Each runs torch single-threaded on its own slice, so no OpenMP team is woken.
        observers: each is shown every input tensor as it arrives (``observe(job, source, tensor)``, in the
            computing thread, before any method runs; ``read`` says which source and tensor name it is), e.g. to
            compute task-vector statistics from the same read. Inputs of blocked products are shown as read
            (their memory maps, on the CPU).
        max_memory: budget for the process's peak memory (bytes, or a size like ``"16GB"``): stacked methods
            that can block (:mod:`mergescale.methods.blocked`) run over row blocks sized to keep within it, and
            a budget that cannot hold one block raises :class:`~.memory.MemoryBudgetError` before anything is
            read. None: blocks of at most 256 MiB (every product that can block does, :mod:`.memory`).
        memory: the memory plan to follow, from :func:`~.memory.plan_memory` on this plan (instead of planning
            again with ``max_memory``: a caller that searched for a budget runs exactly the plan it accepted).

    The plan's sources stay open: whoever opened them closes them. Process-wide settings the run changes (torch
    threads, the allocator's, :func:`allocator_settings`) are restored when it returns.

    Returns:
        :class:`StreamStats` of the run (with its peak RSS and the planned peak). On any exception every sink is
        aborted and the exception re-raised.
    """
    device = check_device(device)
    if isinstance(max_memory, str):
        from mergescale.io.writer import parse_size

        max_memory = parse_size(max_memory, "max memory")
    if memory is None:
        memory = plan_memory(plan, max_memory=max_memory, device=device, prefetch_bytes=prefetch_bytes)
    with allocator_settings(), PeakRss() as rss:
        stats = _run_plan(plan, device, check_finite, progress, memory, threads, workers, observers)
    stats.peak_rss, stats.planned_peak = rss.peak, memory.peak
    return stats


def _run_plan(
    plan: MergePlan,
    device: torch.device,
    check_finite: bool,
    progress: bool | Callable[[int, int], None],
    memory: MemoryPlan,
    threads: int | None,
    workers: int | None,
    observers: Sequence[InputObserver],
) -> StreamStats:
    saved_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    stats = StreamStats(outputs=len(plan.outputs), blocked=memory.blocked)
    start = time.perf_counter()
    for out in plan.outputs:
        out.sink.begin(plan.layout(out))
    prefetch_bytes = memory.prefetch
    budget = ByteBudget(prefetch_bytes)
    read_q: queue.Queue = queue.Queue()
    # Results wait for the writer up to a byte bound, not an item count: a sweep makes nine outputs per tensor,
    # and with room for only one the computation would stall on every write.
    write_q: queue.Queue = queue.Queue()
    write_budget = ByteBudget(prefetch_bytes)
    errors: list[BaseException] = []
    pool = BufferPool(max_idle_bytes=prefetch_bytes)
    lazy = [jm.lazy for jm in memory.jobs]
    reader = threading.Thread(target=_read_all, args=(plan, budget, read_q, lazy), daemon=True)
    writer = threading.Thread(target=_write_all, args=(write_q, write_budget, errors), daemon=True)
    bar = MergeProgress(progress, plan.bytes_to_read, len(plan.jobs))
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    executor = ThreadPoolExecutor(n_workers - 1, thread_name_prefix="mergescale-fold") if n_workers > 1 else None
    folder = LinearFolder(
        plan, device, executor, n_workers, block_bytes=prefetch_bytes, buffers=pool, budget=budget
    )
    try:
        reader.start()
        writer.start()
        with bar:
            consumed = _consume(plan, memory, read_q, budget, device, bar, stats, check_finite, folder, observers)
            for job, state, held in consumed:
                for out_state in state:
                    result = _finish(job, out_state, plan, held, device, pool, check_finite, executor, n_workers)
                    # drop this job's stack now, before the cast allocates: loop variables would keep it alive
                    # while the next job's stack is allocated, doubling the peak memory of stacked methods
                    out_state.stack = out_state.base = out_state.acc = out_state.result = None
                    out_state.statistics = {}
                    if check_finite and out_state.coefficients is not None:
                        _check_linear_result(plan, job, out_state, result)
                    # cast here so only output-dtype tensors wait for the writer (bf16: half the memory)
                    result = _cast(result, plan.output_dtype(out_state.spec, out_state.product), pool)
                    nbytes = result.numel() * result.element_size()
                    write_budget.acquire(nbytes)
                    write_q.put((out_state.spec.sink, out_state.product.name, result, nbytes))
                    del result
                    if errors:
                        raise errors[0]
                held.release()
                stats.tensors += len({p.name for p in job.products})
        finish_run(plan.outputs, write_q, writer, _DONE, errors)
    except BaseException:
        budget.close()
        write_budget.close()
        abort_run(plan.outputs, write_q, writer, _DONE)
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
        torch.set_num_threads(saved_threads)
    stats.seconds = time.perf_counter() - start
    return stats


def _cast(t: torch.Tensor, dtype: torch.dtype, pool: BufferPool) -> torch.Tensor:
    """``t.to(dtype)``, into a pooled buffer when it is large and on the CPU."""
    if t.dtype == dtype:
        return t
    return empty_tensor(t.shape, dtype, t.device, pool).copy_(t)


def _read_all(plan: MergePlan, budget: ByteBudget, read_q: queue.Queue, lazy: Sequence[frozenset[int]]) -> None:
    try:
        for j, job in enumerate(plan.jobs):
            for r, read in enumerate(job.reads):
                source = plan.sources[read.source]
                if not budget.acquire(read.nbytes):  # before reading: nothing is allocated while waiting
                    return
                # safetensors: a copy-on-write map of the page cache, no copy (SafetensorsCheckpoint.map); inputs
                # of blocked products are not populated: blocks map their pages in and drop them again (only
                # for private file maps, maps_files: dropping anonymous pages would lose them)
                mapped = (r in lazy[j] and isinstance(source, SafetensorsCheckpoint) and source.maps_files
                          and read.nbytes > 0 and hasattr(mmap, "MAP_PRIVATE"))  # fmt: skip
                t = source.map(read.name, populate=False) if mapped else source.map(read.name)
                read_q.put((j, r, t, read.nbytes, mapped))
        read_q.put(_DONE)
    except BaseException as exc:  # hand every failure to the consumer, which aborts the sinks
        read_q.put(exc)


def _write_all(write_q: queue.Queue, budget: ByteBudget, errors: list[BaseException]) -> None:
    while True:
        item = write_q.get()
        if item is _DONE:
            return
        sink, name, tensor, nbytes = item
        budget.taken()
        if not errors:  # after a failure, keep draining so the producer never blocks
            try:
                sink.write(name, tensor)
            except BaseException as exc:
                errors.append(exc)
        del tensor, item
        budget.release(nbytes)


def _start_job(plan: MergePlan, job: TensorJob, memory: MemoryPlan, j: int) -> list[_OutputState]:
    return [
        _OutputState(plan.outputs[p.output], p, coefficients=p.coefficients, memory=pm)
        for p, pm in zip(job.products, memory.jobs[j].products, strict=True)
    ]


class _Held:
    """The inputs of a job's blocked products, as read (maps), kept until the job is done."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.tensors: dict[int, torch.Tensor] = {}
        self.mapped: dict[int, bool] = {}
        self.nbytes = 0

    def add(self, read: int, t: torch.Tensor, mapped: bool, nbytes: int) -> None:
        self.tensors[read], self.mapped[read] = t, mapped
        self.nbytes += nbytes

    def release(self) -> None:
        self.tensors, self.mapped = {}, {}
        if self.nbytes:
            self.budget.release(self.nbytes)
            self.nbytes = 0


def _consume(
    plan: MergePlan,
    memory: MemoryPlan,
    read_q: queue.Queue,
    budget: ByteBudget,
    device: torch.device,
    bar: MergeProgress,
    stats: StreamStats,
    check_finite: bool,
    folder: LinearFolder,
    observers: Sequence[InputObserver],
) -> Iterator[tuple[TensorJob, list[_OutputState], _Held]]:
    current: int | None = None
    states: list[_OutputState] = []
    held = _Held(budget)
    remaining = 0
    while True:
        item = read_q.get()
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        j, r, t, nbytes, mapped = item
        budget.taken()
        job = plan.jobs[j]
        if j != current:
            current, states, remaining = j, _start_job(plan, job, memory, j), len(job.reads)
            held = _Held(budget)
            folder.start(job, states)
        read = job.reads[r]
        lazy = r in memory.jobs[j].lazy
        if lazy:  # read block by block by the job's blocked products, from where it is, at the job's end
            held.add(r, t, mapped, nbytes)
            if all(st.memory is not None and st.memory.mode == "blocked" for st in states if r in st.product.inputs):
                for observer in observers:
                    observer.observe(job, read, t)
                del t
                remaining -= 1
                stats.bytes_read += nbytes
                bar.advance(nbytes)
                if remaining == 0:
                    yield job, states, held
                    bar.tensor_done()
                    current, states = None, []
                continue
        x = t.to(device, non_blocking=True)
        del t
        for observer in observers:
            observer.observe(job, read, x)
        checked = False
        for st in states:
            if st.memory is not None and st.memory.mode == "blocked":
                continue
            placed = _fold_stacked(st, r, x)
            if check_finite and placed is not None and not checked:
                # stacked inputs are checked where they landed; linear outputs once on their result
                raise_if_nonfinite(plan.labels[read.source], read.name, placed)
                checked = True
            placed = None  # a view of the stack: it must not outlive the job
        remaining -= 1
        # kept inputs are released when the folder lets go of them (held ones when the job is done)
        if not folder.add(r, x, 0 if lazy else nbytes) and not lazy:
            budget.release(nbytes)
        del x
        stats.bytes_read += nbytes
        bar.advance(nbytes)
        if remaining == 0:
            yield job, states, held
            bar.tensor_done()
            current, states = None, []


def _fold_stacked(st: _OutputState, read: int, x: torch.Tensor) -> torch.Tensor | None:
    """Fold one input into a non-linear product's state: convert ``x`` straight into its slot of the
    ``(k, *shape)`` float32 stack (and the base, and the statistics' stacks), or keep it as the reference of a
    non-float tensor, or keep it whole until the vocabulary alignment (which needs every input).

    Returns the float32 tensor the input became (to be checked for NaN/Inf), else None.
    """
    p = st.product
    if not p.dtype.is_floating_point:
        if read == p.reference:
            st.acc = x.clone()  # its own memory: x may map an input file
        return None
    if st.coefficients is not None:
        return None
    placed = None
    if p.vocabulary is not None and (read in p.models or read == p.base):
        st.raw[read] = placed = x.to(torch.float32, copy=True)
    elif read == p.base:
        # a private copy: methods may write their result into it (x may be shared, or already float32)
        st.base = placed = x.to(torch.float32, copy=True)
    positions = [i for i, m in enumerate(p.models) if m == read]
    if positions and p.vocabulary is None:
        if st.stack is None:
            before_large_allocation(4 * len(p.models) * x.numel(), x.device)
            st.stack = torch.empty((len(p.models), *p.shape), dtype=torch.float32, device=x.device)
        for i in positions:
            st.stack[i].copy_(x)  # converts while copying: no float32 temporary
        placed = st.stack[positions[0]]
    for kind, reads in p.statistics.items():
        for i, r in enumerate(reads):
            if r == read:
                if kind not in st.statistics:
                    st.statistics[kind] = torch.empty((len(reads), *x.shape), dtype=torch.float32, device=x.device)
                st.statistics[kind][i].copy_(x)
    return placed


def _check_linear_result(plan: MergePlan, job: TensorJob, st: _OutputState, result: torch.Tensor) -> None:
    """A weighted sum is non-finite iff an input was (0·NaN is NaN too), or it overflowed: one check of the
    result (its sum, taken while it was computed) replaces k checks of the inputs; the culprit is looked up
    only on failure, among the product's own inputs first, then the others of the job."""
    if math.isfinite(st.result_sum) or bool(torch.isfinite(result).all()):
        return
    own = list(st.coefficients or {})
    for r in own + [r for r in range(len(job.reads)) if r not in own]:
        read = job.reads[r]
        raise_if_nonfinite(plan.labels[read.source], read.name, plan.sources[read.source].read(read.name).to(torch.float32))
    raise NonFiniteError(f"{st.spec.label}: tensor {st.product.name!r} overflows to Inf when merged")


def _finish(
    job: TensorJob,
    st: _OutputState,
    plan: MergePlan,
    held: _Held,
    device: torch.device,
    pool: BufferPool,
    check_finite: bool,
    executor: Executor | None = None,
    workers: int = 1,
) -> torch.Tensor:
    spec, p = st.spec, st.product
    if st.memory is not None and st.memory.mode == "blocked":
        return _finish_blocked(job, st, plan, held, device, pool, check_finite, executor, workers)
    if not p.dtype.is_floating_point:
        assert st.acc is not None, f"{p.name}: no input reached {spec.label}"
        return st.acc
    if st.coefficients is not None:
        assert st.result is not None, f"{p.name}: no input reached {spec.label}"
        return st.result
    if p.vocabulary is not None:
        _align_vocabulary(job, st)
    base = st.base
    stack = st.stack
    if stack is None:  # no merged model for this tensor: only the base (a method that returns it as is)
        assert base is not None, f"{p.name}: no input reached {spec.label}"
        stack = base.new_empty((0, *p.shape))
    inputs = MethodInputs(
        name=p.name,
        tensors=stack,
        base=base,
        model_params=p.model_params,
        params=p.params,
        base_params=p.base_params,
        seed=spec.seed,
        statistics=st.statistics,
    )
    merge = spec.method.blocked(TensorMeta.of(inputs)) if spec.method.blocked is not None and workers > 1 else None
    if merge is not None:
        # the method's own function is this merge on one block, run on one thread; the engine's threads share
        # its models and column ranges instead (the same result whatever the threads)
        return run_in_memory(merge, inputs, workers=workers, run=runner(executor, workers))
    return spec.method(inputs)


def _finish_blocked(
    job: TensorJob,
    st: _OutputState,
    plan: MergePlan,
    held: _Held,
    device: torch.device,
    pool: BufferPool,
    check_finite: bool,
    executor: Executor | None,
    workers: int,
) -> torch.Tensor:
    """A blocked product: its method over row blocks of the held inputs, straight into the output dtype."""
    p, pm = st.product, st.memory
    assert pm is not None
    reads = [*p.models, *([p.base] if p.base is not None else [])]
    out = empty_tensor(p.shape, plan.output_dtype(st.spec, p), torch.device("cpu"), pool)
    before_large_allocation(pm.work, device)

    def check(i: int, rows: torch.Tensor) -> None:
        read = job.reads[reads[i]]
        raise_if_nonfinite(plan.labels[read.source], read.name, rows)

    # made here and dropped with this call: what a merge keeps across blocks (selection candidates and samples,
    # DARE's packed verdicts: up to n/8 bytes per model) must not outlive the tensor, and a memory plan (which
    # keeps only the block sizes) can be run again
    merge = blocked_merge(st.spec, p, device)
    assert merge is not None
    return run_blocked(
        merge,
        pm.rows_per_block,
        [held.tensors[r] for r in p.models],
        held.tensors[p.base] if p.base is not None else None,
        [held.mapped[r] for r in reads],
        out,
        device,
        check if check_finite else None,
        executor,
        workers,
    )


def _align_vocabulary(job: TensorJob, st: _OutputState) -> None:
    """Re-index every input's vocabulary rows to the output vocabulary (which needs all of them at once), then
    stack them as any input is stacked."""
    p = st.product
    reads = [*p.models, *([p.base] if p.base is not None else [])]
    sources = [job.reads[r].source for r in reads]
    base_source = job.reads[p.base].source if p.base is not None else p.vocabulary.base  # type: ignore[union-attr]
    aligned = p.vocabulary.align([st.raw[r] for r in reads], sources, base_source)  # type: ignore[union-attr]
    st.raw = {}
    if p.base is not None:
        st.base = aligned.pop()
    st.stack = torch.stack(aligned) if aligned else None

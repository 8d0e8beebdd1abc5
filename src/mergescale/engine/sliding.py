"""Windows of checkpoints along a run: every average of a curve from one read of each checkpoint.

A curve is many averages Mⱼ = Σᵢ wⱼᵢ·xᵢ over one ordered set of sources x (checkpoints, oldest first), each
over a window of N consecutive (or evenly thinned) ones. Averaged one by one, T windows would read and convert
T × N checkpoint tensors. Here every source tensor is read once and converted once, chunk by chunk, into a
float32 scratch X (sources × chunk) that stays in cache, and the windows are grouped so that a group's
windows lie in one contiguous range of sources: the group's outputs are then one matrix product,
O = A·X[lo:hi] with A the (windows × sources) weights, zero outside each window (Li et al. 2025,
https://arxiv.org/abs/2505.12082, define the strategies; ``mergescale.pma.weights`` has the weights).

Why a product and not running sums: consecutive SMA windows differ by one checkpoint in and one out, so a
window could be read off running sums, P_{j+N} − P_j, in O(1) operations per window instead of N. We
implemented that first (float64 running sums: a difference of two float32 sums would keep their rounding
error, which grows with the length of the curve) and measured it on the 268M-parameter benchmark: 56 s of CPU
for 20 windows of 10, twelve times one average, because each running-sum step is a separate operation over a
chunk and the float64 rows do not stay in cache. A BLAS matrix product over the same chunk does the T × N
multiply-adds from cache faster than the running sums did their one add per step (measured here: 20 windows
of 10 over 29 rows, 0.38 ns per input entry against 1.07 ns for the float64 running sum alone). And each
window is a direct float32 sum of its own N terms, as ``mergescale pma`` computes it: no cancellation, no error
that grows along the curve, so no float64 or compensation is needed. It is not bit-identical to the single
average (BLAS sums the terms in another order), but both are within N·ε₃₂·Σ|wᵢxᵢ| of the exact average:
the tests hold them to 1e-6 of the weights' magnitude.

Groups are at most ``GROUP`` consecutive windows of one weighting, so a group spans at most GROUP + N − 1
sources and the zeros of A cost at most (GROUP + N − 1)/N times the necessary multiply-adds. All windows of a
group are one (windows, *shape) allocation per tensor: memory grows with the number of windows computed
together, so callers cut long curves into batches (``mergescale.pma.along_run`` does).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mergescale.device import check_device
from mergescale.engine.allocator import allocator_settings
from mergescale.engine.buffers import BufferPool, empty_tensor
from mergescale.engine.finite import raise_if_nonfinite
from mergescale.engine.plan import MergePlan, TensorJob
from mergescale.engine.progress import MergeProgress
from mergescale.engine.stream import StreamStats
from mergescale.engine.threads import ByteBudget, abort_run, drain, finish_run
from mergescale.errors import ConfigError, NonFiniteError
from mergescale.io.checkpoint import populate_map, release_map_pages

# Entries per chunk on the CPU: the float32 scratch of 30 sources × 32K entries (4 MB) stays in L2/L3 and the
# product's output block in L2 (measured: 16K-64K best; smaller chunks pay each operation's dispatch more often
# than its arithmetic).
CPU_CHUNK = 1 << 15
DEVICE_CHUNK = 1 << 24
_SPLIT_MIN = 1 << 18  # below this many entries one thread does the whole tensor
GROUP = 24  # windows per matrix product at most
# Inputs of a tensor larger than the read-ahead budget are not populated ahead: the computing threads fault them
# in as they read them and let go of their pages every this many entries (see release_map_pages), so the 29
# inputs of a 268M model's embedding (1.9 GB) never count in memory all at once.
_RELEASE_ENTRIES = 1 << 20


@dataclass
class WindowGroup:
    """Outputs whose windows lie in sources ``lo`` … ``hi − 1`` (indices into the plan's sources, which are in
    order): output ``outputs[k]`` is Σᵢ ``weights[k][i]``·x_{lo+i}.

    Attributes:
        lo, hi: the range of sources.
        outputs: indices into the plan's outputs.
        weights: per output, hi − lo weights (zero for sources outside its window).
    """

    lo: int
    hi: int
    outputs: list[int]
    weights: list[list[float]]

    def __post_init__(self) -> None:
        if not self.outputs or len(self.weights) != len(self.outputs):
            raise ConfigError("a window group needs one row of weights per output, and at least one output")
        if not 0 <= self.lo < self.hi or any(len(w) != self.hi - self.lo for w in self.weights):
            raise ConfigError(f"every row of weights must cover sources {self.lo} ... {self.hi - 1}")


def group_windows(
    windows: Sequence[tuple[Sequence[int], Sequence[float]]], keys: Sequence[object], size: int = GROUP
) -> list[WindowGroup]:
    """Groups of at most ``size`` consecutive windows with the same key (e.g. the weighting), in order.

    ``windows[o]`` is output o's (sources, weights), sources ascending. A window joins the open group of its key
    unless that group is full; a group spans its windows' sources.
    """
    open_: dict[object, list[int]] = {}
    groups: list[list[int]] = []
    for o, key in enumerate(keys):
        g = open_.get(key)
        if g is None or len(g) >= size:
            g = []
            groups.append(g)
            open_[key] = g
        g.append(o)
    out = []
    for g in groups:
        lo = min(windows[o][0][0] for o in g)
        hi = max(windows[o][0][-1] for o in g) + 1
        rows = []
        for o in g:
            row = [0.0] * (hi - lo)
            for src, w in zip(*windows[o], strict=True):
                row[src - lo] += float(w)
            rows.append(row)
        out.append(WindowGroup(lo, hi, list(g), rows))
    return out


@dataclass
class SlidingPlan:
    """A plan's sources and outputs (as :func:`~mergescale.engine.plan.build_plan` checked them) and the window
    groups that compute the outputs. Every output is in exactly one group."""

    plan: MergePlan
    groups: list[WindowGroup]

    def __post_init__(self) -> None:
        seen = [o for g in self.groups for o in g.outputs]
        if sorted(seen) != list(range(len(self.plan.outputs))):
            raise ConfigError("every output must be computed by exactly one window group")


def run_sliding(
    sliding: SlidingPlan,
    *,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
    progress: bool | Callable[[int, int], None] = True,
    workers: int | None = None,
    threads: int | None = 1,
    prefetch_bytes: int = 256 << 20,
) -> StreamStats:
    """Compute every output of every window group, tensor by tensor, and hand each to its sink.

    Three threads overlap the work: a reader maps (or reads) the next tensor's inputs, the caller's thread
    computes (its chunks split between ``workers`` threads, default the CPU count, at most 4), a writer hands
    finished tensors to the sinks. ``threads``: torch's intra-op threads while it runs (restored afterwards;
    1 by default, as for :func:`~mergescale.engine.stream.run_plan`: the workers already split the work).

    The plan's sources stay open (their opener closes them); the allocator settings and torch threads the run
    changes are restored when it returns.

    Raises:
        NonFiniteError: NaN or Inf in a source (named, with the tensor), with ``check_finite``.
        On any exception every sink is aborted.
    """
    with allocator_settings():
        return _run_sliding(sliding, check_device(device), check_finite, progress, workers, threads, prefetch_bytes)


def _run_sliding(
    sliding: SlidingPlan,
    device: torch.device,
    check_finite: bool,
    progress: bool | Callable[[int, int], None],
    workers: int | None,
    threads: int | None,
    prefetch_bytes: int,
) -> StreamStats:
    plan = sliding.plan
    saved_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    stats = StreamStats(outputs=len(plan.outputs))
    start = time.perf_counter()
    for out in plan.outputs:
        out.sink.begin(plan.layout(out))
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    executor = ThreadPoolExecutor(n_workers - 1, thread_name_prefix="mergescale-slide") if n_workers > 1 else None
    read_q: queue.Queue = queue.Queue(maxsize=1)
    # inputs mapped ahead of the computation, in bytes (one tensor's always): a curve maps every checkpoint of a
    # tensor at once, and mapped pages count in the process's memory
    budget = ByteBudget(prefetch_bytes)
    write_q: queue.Queue = queue.Queue(maxsize=1)  # one tensor's outputs wait for the writer
    stop = threading.Event()
    errors: list[BaseException] = []
    reader = threading.Thread(target=_read_jobs, args=(sliding, read_q, stop, budget), daemon=True)
    writer = threading.Thread(target=_write_jobs, args=(write_q, errors), daemon=True)
    bar = MergeProgress(progress, plan.bytes_to_read, len(plan.jobs))
    # idle output blocks kept for reuse: room for the largest tensor's outputs and as much again for the others,
    # so the largest ones wait, idle, for the next large tensor (the pool lets go of the largest first)
    largest = max((math.prod(r.shape) * r.dtype.itemsize for j in plan.jobs for r in j.reads), default=0)
    pool = BufferPool(max_idle_bytes=2 * largest * max((len(g.outputs) for g in sliding.groups), default=1))
    try:
        reader.start()
        writer.start()
        with bar:
            while True:
                item = read_q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                job, inputs, streamed = item
                results = _compute_job(
                    sliding, job, inputs, streamed, device, executor, n_workers, check_finite, pool
                )
                del inputs, item
                budget.taken()  # computed: its inputs no longer count
                budget.release(job.nbytes)
                write_q.put([(plan.outputs[o].sink, job.name, t) for o, t in results])
                del results
                if errors:
                    raise errors[0]
                stats.bytes_read += job.nbytes
                stats.tensors += 1
                bar.advance(job.nbytes)
                bar.tensor_done()
        finish_run(plan.outputs, write_q, writer, None, errors)
    except BaseException:
        stop.set()
        budget.close()
        drain(read_q)
        abort_run(plan.outputs, write_q, writer, None)
        raise
    finally:
        stop.set()
        budget.close()
        drain(read_q)
        if executor is not None:
            executor.shutdown(wait=True)
        torch.set_num_threads(saved_threads)
    stats.seconds = time.perf_counter() - start
    return stats


def _job_order(jobs: Sequence[TensorJob]) -> list[TensorJob]:
    """The plan's jobs with its largest ones (at least half the size of the largest) spread evenly among the
    others, so no two of them run back to back.

    A curve holds all its outputs of one tensor until they are written: a Llama's output head and embedding
    (the two largest tensors, next to each other in a checkpoint) would otherwise need two sets of 20 outputs at
    once, one being written while the next is computed, each on freshly faulted memory (measured on the 268M
    benchmark: 1.3 GB more peak memory, and about 1 s of CPU per GB to fault it in). Apart, the second reuses the
    first one's buffer. The order never changes a result: every tensor is written at its own place.
    """
    if len(jobs) < 3:
        return list(jobs)
    largest = max(job.nbytes for job in jobs)
    big = [job for job in jobs if 2 * job.nbytes >= largest]
    rest = [job for job in jobs if 2 * job.nbytes < largest]
    if len(big) < 2 or not rest:
        return list(jobs)
    # big[0], rest[b₀:b₁], big[1], rest[b₁:b₂], …, big[-1]: the first and the last job are big ones
    bounds = [round(k * len(rest) / (len(big) - 1)) for k in range(len(big))]
    order = [big[0]]
    for k in range(1, len(big)):
        order += [*rest[bounds[k - 1] : bounds[k]], big[k]]
    return order


def _read_jobs(sliding: SlidingPlan, read_q: queue.Queue, stop: threading.Event, budget: ByteBudget) -> None:
    plan = sliding.plan
    try:
        for job in _job_order(plan.jobs):
            if not budget.acquire(job.nbytes):
                return
            inputs: dict[int, torch.Tensor] = {}
            for read in job.reads:  # map all first: their reads from disk (WILLNEED) overlap...
                source = plan.sources[read.source]
                if source.maps_files:
                    inputs[read.source] = source.map(read.name, populate=False)
                else:
                    inputs[read.source] = source.read(read.name)
            mapped = {src for src in inputs if plan.sources[src].maps_files}
            streamed: set[int] = set()  # maps the computing threads fault in and release behind them
            if job.nbytes <= budget.limit:  # ...then fill their page tables here, not in the computing threads
                for src in mapped:
                    populate_map(inputs[src])
            else:  # too large to hold at once
                streamed = mapped
            while not stop.is_set():
                try:
                    read_q.put((job, inputs, streamed), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
            del inputs
        read_q.put(None)
    except BaseException as exc:  # the consumer re-raises it and aborts the sinks
        read_q.put(exc)


def _write_jobs(write_q: queue.Queue, errors: list[BaseException]) -> None:
    while True:
        items = write_q.get()
        if items is None:
            return
        if not errors:
            try:
                for sink, name, tensor in items:
                    sink.write(name, tensor)
            except BaseException as exc:
                errors.append(exc)
        del items


def _compute_job(
    sliding: SlidingPlan,
    job: TensorJob,
    inputs: dict[int, torch.Tensor],
    streamed: set[int],
    device: torch.device,
    executor: ThreadPoolExecutor | None,
    workers: int,
    check_finite: bool,
    pool: BufferPool,
) -> list[tuple[int, torch.Tensor]]:
    """Every output's tensor for one tensor name, as (output index, tensor).

    An along-run plan reads one tensor name from every checkpoint, and each output makes that tensor: the job's
    reads are keyed by their source (checkpoint) and its products by their output."""
    plan = sliding.plan
    xs = {s: t.to(device, non_blocking=True) for s, t in inputs.items()}
    shape = job.reads[0].shape
    products = {p.output: p for p in job.products}
    if not job.reads[0].dtype.is_floating_point:
        # integer buffers: each output takes its reference's (the window's oldest checkpoint, as the engine does;
        # the plan reads only the first output's reference for them)
        first = next(iter(xs.values()))
        return [(o, xs.get(plan.outputs[o].reference, first).clone()) for o in range(len(plan.outputs))]
    results: list[tuple[int, torch.Tensor]] = []
    targets: list[torch.Tensor] = []  # per group: (windows, n) in the group's output dtype
    for g in sliding.groups:
        dtypes = {plan.output_dtype(plan.outputs[o], products[o]) for o in g.outputs}
        if len(dtypes) != 1:
            raise ConfigError("the outputs of one window group must share an output dtype")
        target = empty_tensor((len(g.outputs), math.prod(shape)), dtypes.pop(), device, pool)
        targets.append(target)
        results += [(o, target[k].view(shape)) for k, o in enumerate(g.outputs)]
    used = sorted({s for g in sliding.groups for s in range(g.lo, g.hi)})
    if any(s not in xs for s in used):
        raise ConfigError(f"tensor {job.name!r}: a window group spans a source the plan does not read")
    flat = [xs[s].reshape(-1) for s in used]  # (n,) each
    row = {s: i for i, s in enumerate(used)}
    weights = [torch.tensor(g.weights, dtype=torch.float32, device=device) for g in sliding.groups]  # (T_g, L_g)
    checks = [_check_kind(w) if check_finite else _NO_CHECK for w in weights]
    if check_finite:
        # one more row per group, Σₖ|wₖ|: its entries are finite iff every input the group spans is (0·NaN is
        # NaN too), so summing it alone checks the group; only windows that might overflow are summed themselves
        weights = [torch.cat([w, w.abs().sum(0, keepdim=True)]) for w in weights]  # (T_g + 1, L_g)
    spans = [(row[g.lo], row[g.lo] + g.hi - g.lo) for g in sliding.groups]
    n = flat[0].numel()
    chunk = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK

    # maps of a checkpoint (never written) too large to hold at once let go of their pages as they are read
    release = [s in streamed and device.type == "cpu" for s in used]

    def run(lo: int, hi: int) -> float:
        return _fold_range(flat, weights, spans, targets, checks, release, lo, hi, chunk, device)

    if executor is None or workers <= 1 or n < _SPLIT_MIN or device.type != "cpu":
        total = run(0, n)
    else:
        per = -(-n // workers)
        per = -(-per // chunk) * chunk
        bounds = [(s, min(n, s + per)) for s in range(0, n, per)]
        futures = [executor.submit(run, s, e) for s, e in bounds[1:]]
        total = run(*bounds[0])
        for f in futures:
            total += f.result()
    if check_finite and not math.isfinite(total):
        for s in used:  # a window is non-finite iff one of the group's inputs is (0·NaN is NaN too)
            raise_if_nonfinite(plan.labels[s], job.name, xs[s].to(torch.float32))
        raise NonFiniteError(f"tensor {job.name!r} overflows when averaged")
    return results


# What a group's finite check sums (see _compute_job): nothing, its check row, or every row.
_NO_CHECK, _CHECK_ROW, _CHECK_ALL = 0, 1, 2


def _check_kind(w: torch.Tensor) -> int:
    """A group whose windows are convex combinations (weights ≥ 0, each window's summing to at most 1: SMA,
    EMA, WMA) cannot overflow where its inputs are finite, so its check row is enough; other weights (a custom
    window may have negative ones) could, so every window is summed as well."""
    convex = bool((w >= 0).all()) and bool((w.double().sum(1) <= 1 + 1e-6).all())
    return _CHECK_ROW if convex else _CHECK_ALL


def _fold_range(
    flat: list[torch.Tensor],
    weights: list[torch.Tensor],
    spans: list[tuple[int, int]],
    targets: list[torch.Tensor],
    checks: list[int],
    release: list[bool],
    lo: int,
    hi: int,
    chunk: int,
    device: torch.device,
) -> float:
    """Every group's windows over entries [lo, hi), chunk by chunk; the sum of each group's checked rows (see
    :func:`_check_kind`), non-finite iff one of their entries is: a cheap finite check."""
    width = max(1, min(chunk, hi - lo))
    x = torch.empty((len(flat), width), dtype=torch.float32, device=device)  # (m, C): the sources, converted
    rows = list(x.unbind(0))  # (C,) each: full chunks convert into these without slicing again
    most = max(w.shape[0] for w in weights)
    d = torch.empty((most, width), dtype=torch.float32, device=device)  # (T + 1, C): a group's windows
    total = 0.0
    released = lo  # entries before this one are released (when release says so)
    to_release = [t for t, r in zip(flat, release, strict=True) if r]
    for s in range(lo, hi, width):
        e = min(hi, s + width)
        c = e - s
        if to_release and (s - released >= _RELEASE_ENTRIES):
            for t in to_release:
                release_map_pages(t, released, s)
            released = s
        xs = x[:, :c]
        for r, t in zip(rows if c == width else xs.unbind(0), flat, strict=True):
            r.copy_(t[s:e])  # converts while copying, into cache
        for w, (a, b), target, check in zip(weights, spans, targets, checks, strict=True):
            out = d[: w.shape[0], :c]
            torch.mm(w, xs[a:b], out=out)  # (T_g [+ 1], C) = (T_g [+ 1], L_g) @ (L_g, C)
            if check == _CHECK_ROW:
                total += float(out[-1].sum())
            elif check == _CHECK_ALL:
                total += float(out.sum())
            target[:, s:e].copy_(out[: target.shape[0]])  # casts to the output dtype
    for t in to_release:
        release_map_pages(t, released, hi)
    return total

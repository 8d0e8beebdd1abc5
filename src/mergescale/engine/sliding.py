"""Windows of checkpoints sliding along a run: every average of a curve from one read of each checkpoint.

A **chain** is an ordered sequence of sources x₀ … x_{L−1} (checkpoints, oldest first) and a set of windows
of N consecutive ones, window j = x_j … x_{j+N−1}, all weighed the same way. Consecutive windows share N − 1
inputs, so instead of T × N weighted adds per tensor entry, each strategy keeps running sums over the sequence
and reads every window off them in O(1) vector operations (Li et al. 2025, https://arxiv.org/abs/2505.12082,
define the strategies; ``mergescale.pma.weights`` has the weights):

- SMA, wₚ = 1/N: P₀ = 0, P_{i+1} = P_i + x_i/N; window j = P_{j+N} − P_j.
- EMA, A₁ = M₁, Aᵢ = α·Mᵢ + (1 − α)·Aᵢ₋₁ (c = 1 − α): Q₀ = 0, Q_{i+1} = c·Q_i + x_i; window j =
  α·(Q_{j+N} − c^{N−1}·Q_{j+1}) + c^{N−1}·x_j (the N − 1 newest with weights α·c^k, the oldest c^{N−1}).
- WMA, wₚ = (p + 1)/Z with Z = N(N + 1)/2: P as for SMA (unscaled) and R_{i+1} = R_i + i·x_i; window j =
  ((R_{j+N} − R_j) − (j − 1)·(P_{j+N} − P_j))/Z.
- ``direct`` (custom weights): Σₚ wₚ·x_{j+p}, window by window.

The running sums are **float64**. A window is a difference of two running sums, which keeps their absolute
rounding error: in float32 that is of order L·ε₃₂·max|x| and grows with the length of the curve (3·10⁻⁶ of
the weights for L = 50, more than the 10⁻⁶ a direct float32 average is accurate to), in float64 about 10⁻¹⁴.
Kahan-compensated float32 would cost four operations per add instead of one for the same effect, and the
operations, not the width, are what cost here (measured: a float64 add of 64K entries from cache costs 1.4×
a float32 one; each operation's dispatch costs as much as its arithmetic). So every window equals the direct
float32 average up to float32 rounding, though not bit for bit: the direct average rounds Σ wᵢ·xᵢ in float32
in BLAS order, this one rounds an exact-to-10⁻¹⁴ float64 sum once.

Work is tensor by tensor and, inside a tensor, chunk by chunk (cache-sized, split between worker threads):
each source's chunk is converted to float64 once and shared by every chain and window that uses it; a chain
computes its running sums over the chunk and writes all its windows with a few operations over (windows,
chunk) blocks. All windows of one tensor are one (windows, *shape) allocation: memory grows with the number of
windows, so callers cut long curves into batches (``mergescale.pma.along_run`` does). Each (source, tensor) is
read once (safetensors: a memory map of the page cache).
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
from typing import Literal

import torch

from mergescale.engine.plan import MergePlan, TensorJob
from mergescale.engine.stream import StreamStats, _check_finite, _Progress, tune_allocator
from mergescale.errors import ConfigError, NonFiniteError
from mergescale.io.checkpoint import SafetensorsCheckpoint

# Entries per chunk on the CPU: float64 rows of a 30-checkpoint chain then fit in a 2 MB L2 (measured here:
# 32K-64K best; smaller chunks pay an operation's dispatch more often than its arithmetic).
CPU_CHUNK = 1 << 15
DEVICE_CHUNK = 1 << 24
_SPLIT_MIN = 1 << 18  # below this many entries one thread does the whole tensor

Kind = Literal["sma", "ema", "wma", "direct"]


@dataclass
class Chain:
    """Windows of one weighting sliding along one sequence of sources.

    Attributes:
        kind: ``sma``, ``ema``, ``wma`` (running sums) or ``direct`` (each window summed on its own).
        sequence: indices into the plan's sources, oldest first; window j is ``sequence[j : j + width]``.
        width: N, the number of checkpoints in a window.
        starts: per output, where its window starts in ``sequence`` (ascending; repeats allowed).
        outputs: indices into the plan's outputs, one per start.
        alpha: the EMA's α.
        weights: ``direct`` only: the N weights, oldest first.
    """

    kind: Kind
    sequence: list[int]
    width: int
    starts: list[int]
    outputs: list[int]
    alpha: float = 0.2
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.starts) != len(self.outputs) or not self.starts:
            raise ConfigError("a chain needs one start per output, and at least one")
        if min(self.starts) < 0 or max(self.starts) + self.width > len(self.sequence):
            raise ConfigError(f"a window of {self.width} runs past the chain's {len(self.sequence)} sources")
        if list(self.starts) != sorted(self.starts):
            raise ConfigError("chain starts must be ascending")
        if self.kind == "direct" and (self.weights is None or len(self.weights) != self.width):
            raise ConfigError("a direct chain needs one weight per checkpoint of its window")
        if self.kind == "ema" and not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"EMA alpha must be in (0, 1], got {self.alpha}")

    @property
    def length(self) -> int:
        """How much of the sequence the windows use."""
        return max(self.starts) + self.width

    def runs(self) -> list[tuple[int, int, int]]:
        """Maximal runs of consecutive starts as (first start, last start + 1, first output position)."""
        out: list[tuple[int, int, int]] = []
        i = 0
        while i < len(self.starts):
            k = i
            while k + 1 < len(self.starts) and self.starts[k + 1] == self.starts[k] + 1:
                k += 1
            out.append((self.starts[i], self.starts[k] + 1, i))
            i = k + 1
        return out

    def window_weights(self) -> list[float]:
        """The N weights of every window, oldest first (what the running sums compute)."""
        n = self.width
        if self.kind == "sma":
            return [1.0 / n] * n
        if self.kind == "wma":
            z = n * (n + 1) / 2
            return [(p + 1) / z for p in range(n)]
        if self.kind == "ema":
            c = 1.0 - self.alpha
            return [c ** (n - 1)] + [self.alpha * c ** (n - 1 - p) for p in range(1, n)]
        assert self.weights is not None
        return list(self.weights)


@dataclass
class SlidingPlan:
    """A plan's sources and outputs (as :func:`~mergescale.engine.plan.build_plan` checked them) and the chains
    that compute the outputs. Every output is in exactly one chain."""

    plan: MergePlan
    chains: list[Chain]

    def __post_init__(self) -> None:
        seen = [o for ch in self.chains for o in ch.outputs]
        if sorted(seen) != list(range(len(self.plan.outputs))):
            raise ConfigError("every output must be computed by exactly one chain")


def run_sliding(
    sliding: SlidingPlan,
    *,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
    progress: bool | Callable[[int, int], None] = True,
    workers: int | None = None,
    threads: int | None = 1,
) -> StreamStats:
    """Compute every output of every chain, tensor by tensor, and hand each to its sink.

    Three threads overlap the work: a reader maps (or reads) the next tensor's inputs, the caller's thread
    computes (its chunks split between ``workers`` threads), a writer hands finished tensors to the sinks.

    Raises:
        NonFiniteError: NaN or Inf in a source (named, with the tensor), with ``check_finite``.
        On any exception every sink is aborted.
    """
    plan = sliding.plan
    device = torch.device(device)
    tune_allocator()
    saved_threads = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    stats = StreamStats(outputs=len(plan.outputs))
    start = time.perf_counter()
    for out in plan.outputs:
        out.sink.begin(plan.layout(out))
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    executor = ThreadPoolExecutor(n_workers - 1, thread_name_prefix="mergescale-slide") if n_workers > 1 else None
    read_q: queue.Queue = queue.Queue(maxsize=1)  # one tensor's inputs read ahead of the computation
    write_q: queue.Queue = queue.Queue(maxsize=2)  # up to two tensors' outputs wait for the writer
    stop = threading.Event()
    errors: list[BaseException] = []
    reader = threading.Thread(target=_read_jobs, args=(sliding, read_q, stop), daemon=True)
    writer = threading.Thread(target=_write_jobs, args=(write_q, errors), daemon=True)
    bar = _Progress(progress, plan.bytes_to_read, len(plan.jobs))
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
                job, inputs = item
                results = _compute_job(sliding, job, inputs, device, executor, n_workers, check_finite)
                del inputs, item
                write_q.put([(plan.outputs[o].sink, job.name, t) for o, t in results])
                del results
                if errors:
                    raise errors[0]
                stats.bytes_read += job.nbytes
                stats.tensors += 1
                bar.advance(job.nbytes)
                bar.tensor_done()
            write_q.put(None)
            writer.join()
        if errors:
            raise errors[0]
        for out in plan.outputs:
            out.sink.commit()
    except BaseException:
        stop.set()
        _drain(read_q)
        _drain(write_q)
        if writer.is_alive():
            write_q.put(None)
            writer.join(timeout=30)
        for out in plan.outputs:
            out.sink.abort()
        raise
    finally:
        stop.set()
        _drain(read_q)
        if executor is not None:
            executor.shutdown(wait=True)
        torch.set_num_threads(saved_threads)
        for src in plan.sources:
            src.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def _read_jobs(sliding: SlidingPlan, read_q: queue.Queue, stop: threading.Event) -> None:
    plan = sliding.plan
    try:
        for job in plan.jobs:
            inputs: dict[int, torch.Tensor] = {}
            for src in job.sources:
                source = plan.sources[src]
                inputs[src] = source.map(job.name) if isinstance(source, SafetensorsCheckpoint) else source.read(job.name)
            while not stop.is_set():
                try:
                    read_q.put((job, inputs), timeout=0.1)
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
    device: torch.device,
    executor: ThreadPoolExecutor | None,
    workers: int,
    check_finite: bool,
) -> list[tuple[int, torch.Tensor]]:
    """Every output's tensor for one tensor name, as (output index, tensor)."""
    plan = sliding.plan
    xs = {s: t.to(device, non_blocking=True) for s, t in inputs.items()}
    if not job.dtype.is_floating_point:
        # integer buffers: each output takes its reference's (the window's oldest checkpoint, as the engine does)
        # (the plan reads only the first output's reference for them)
        first = next(iter(xs.values()))
        return [(o, xs.get(plan.outputs[o].reference, first).clone()) for o in range(len(plan.outputs))]
    results: list[tuple[int, torch.Tensor]] = []
    targets: list[torch.Tensor] = []  # per chain: (windows, n) in the chain's output dtype
    for ch in sliding.chains:
        dtypes = {plan.output_dtype(plan.outputs[o], job) for o in ch.outputs}
        if len(dtypes) != 1:
            raise ConfigError("the outputs of one chain must share an output dtype")
        target = torch.empty((len(ch.outputs), math.prod(job.shape)), dtype=dtypes.pop(), device=device)
        targets.append(target)
        results += [(o, target[k].view(job.shape)) for k, o in enumerate(ch.outputs)]
    used = sorted({s for ch in sliding.chains for s in ch.sequence[: ch.length]})
    flat = [xs[s].reshape(-1) for s in used]
    row = {s: i for i, s in enumerate(used)}
    n = flat[0].numel()
    chunk = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK

    def run(lo: int, hi: int) -> list[float]:
        return _fold_range(sliding.chains, flat, row, targets, lo, hi, chunk, device)

    if executor is None or workers <= 1 or n < _SPLIT_MIN or device.type != "cpu":
        sums = run(0, n)
    else:
        per = -(-n // workers)
        per = -(-per // chunk) * chunk
        bounds = [(s, min(n, s + per)) for s in range(0, n, per)]
        futures = [executor.submit(run, s, e) for s, e in bounds[1:]]
        sums = run(*bounds[0])
        for f in futures:
            sums = [a + b for a, b in zip(sums, f.result(), strict=True)]
    if check_finite and not all(math.isfinite(s) for s in sums):
        for s in used:  # a running sum is non-finite iff one of its inputs is: find which
            _check_finite(plan.labels[s], job.name, xs[s].to(torch.float32))
        raise NonFiniteError(f"tensor {job.name!r} overflows when averaged")
    return results


def _fold_range(
    chains: Sequence[Chain],
    flat: list[torch.Tensor],
    row: dict[int, int],
    targets: list[torch.Tensor],
    lo: int,
    hi: int,
    chunk: int,
    device: torch.device,
) -> list[float]:
    """Every chain's windows over entries [lo, hi), chunk by chunk; per chain the sum of its last running sum
    (non-finite iff an input was)."""
    width = max(1, min(chunk, hi - lo))
    x = torch.empty((len(flat), width), dtype=torch.float64, device=device)  # (m, C): the sources, converted
    longest = max(ch.length for ch in chains)
    p = torch.empty((longest + 1, width), dtype=torch.float64, device=device)  # (L+1, C) running sums
    r = torch.empty_like(p) if any(ch.kind == "wma" for ch in chains) else None  # (L+1, C) WMA's Σ i·xᵢ
    most = max(len(ch.starts) for ch in chains)
    d = torch.empty((most, width), dtype=torch.float64, device=device)  # (T, C) windows before the cast
    e2 = torch.empty_like(d) if any(ch.kind == "wma" for ch in chains) else None
    sums = [0.0] * len(chains)
    for s in range(lo, hi, width):
        e = min(hi, s + width)
        c = e - s
        xs = x[:, :c]
        for i, t in enumerate(flat):
            xs[i].copy_(t[s:e])  # converts while copying
        for k, (ch, target) in enumerate(zip(chains, targets, strict=True)):
            rows = [row[q] for q in ch.sequence[: ch.length]]
            ps = p[: ch.length + 1, :c]
            _running_sums(ch, xs, rows, ps, None if r is None else r[: ch.length + 1, :c])
            sums[k] += float(ps[ch.length].sum())
            out = target[:, s:e]  # (T, C) strided view of the chain's outputs
            for a, b, o in ch.runs():
                _windows(ch, xs, rows, ps, None if r is None else r[: ch.length + 1, :c], a, b,
                         d[: b - a, :c], None if e2 is None else e2[: b - a, :c], out[o : o + b - a])  # fmt: skip
    return sums


def _running_sums(ch: Chain, xs: torch.Tensor, rows: list[int], ps: torch.Tensor, rs: torch.Tensor | None) -> None:
    """Fill ``ps`` (and for WMA ``rs``), (L+1, C) float64, with the chain's running sums."""
    ps[0].zero_()
    if ch.kind == "sma":
        w = 1.0 / ch.width
        for i, q in enumerate(rows):
            torch.add(ps[i], xs[q], alpha=w, out=ps[i + 1])
    elif ch.kind == "ema":
        c = 1.0 - ch.alpha
        for i, q in enumerate(rows):
            torch.add(xs[q], ps[i], alpha=c, out=ps[i + 1])
    elif ch.kind == "wma":
        assert rs is not None
        rs[0].zero_()
        for i, q in enumerate(rows):
            torch.add(ps[i], xs[q], out=ps[i + 1])
            torch.add(rs[i], xs[q], alpha=float(i), out=rs[i + 1])
    else:  # direct: only a finite check of the inputs
        for i, q in enumerate(rows):
            torch.add(ps[i], xs[q], out=ps[i + 1])


def _windows(
    ch: Chain,
    xs: torch.Tensor,
    rows: list[int],
    ps: torch.Tensor,
    rs: torch.Tensor | None,
    a: int,
    b: int,
    d: torch.Tensor,
    d2: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Windows starting at a … b − 1 (consecutive) into ``out`` (b − a, C), via the float64 scratch ``d``."""
    n = ch.width
    if ch.kind == "sma":
        torch.sub(ps[a + n : b + n], ps[a:b], out=d)
    elif ch.kind == "ema":
        c, alpha = 1.0 - ch.alpha, ch.alpha
        oldest = c ** (n - 1)
        torch.sub(ps[a + n : b + n], ps[a + 1 : b + 1], alpha=oldest, out=d)
        d.mul_(alpha)
        d.add_(_gather(xs, rows[a:b], d), alpha=oldest)
    elif ch.kind == "wma":
        assert rs is not None and d2 is not None
        z = n * (n + 1) / 2
        torch.sub(rs[a + n : b + n], rs[a:b], out=d)
        torch.sub(ps[a + n : b + n], ps[a:b], out=d2)
        shift = torch.arange(a - 1, b - 1, dtype=torch.float64, device=d.device).unsqueeze(1)  # (T, 1): j − 1
        d.sub_(d2.mul_(shift)).mul_(1.0 / z)
    else:
        assert ch.weights is not None
        for t, j in enumerate(range(a, b)):
            d[t].zero_()
            for w, q in zip(ch.weights, rows[j : j + n], strict=True):
                d[t].add_(xs[q], alpha=w)
    out.copy_(d)  # casts to the output dtype


def _gather(xs: torch.Tensor, rows: list[int], like: torch.Tensor) -> torch.Tensor:
    """Rows of ``xs`` as a (len(rows), C) tensor: a view when they are consecutive."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return xs[rows[0] : rows[0] + len(rows)]
    return xs[rows]


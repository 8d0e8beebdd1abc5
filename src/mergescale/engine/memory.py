"""How much memory a merge needs, how the engine keeps within a budget, and what it really used.

:func:`plan_memory` decides, from headers only, how each output tensor is computed:

- ``linear``: folded input by input (:mod:`.linear_fold`): a float32 partial sum and the result;
- ``whole``: a stacked method on the ``(k, *shape)`` float32 stack of its inputs (small tensors: fastest);
- ``blocked``: a method that declares a blocked form (:mod:`mergescale.methods.blocked`) over row blocks of
  its inputs, read from their memory maps block by block: its memory is one block, whatever k and the
  tensor's size;
- ``copy``: a non-float tensor copied from its reference.

and from that the peak memory of the run (:attr:`MemoryPlan.peak`): this process's own memory when planning
(Python, torch; :attr:`MemoryPlan.baseline`) plus the largest of the tensor jobs' needs. A job needs its
outputs in their dtype, the results still waiting for the writer, the inputs read ahead, and the working
memory of its products (stacks, partial sums, one block of a blocked product).

A stacked product whose method can block runs over row blocks of its mapped inputs (unless its stack fits in
:data:`WHOLE_BYTES`, 0 by default: reading the rows as stored and converting them piece by piece on every thread
was measured faster, and leaner, than stacking every input in float32 even where the stack fits); the rest are
stacked whole, within ``max_memory`` when one is given. Blocks are as many rows as fit in :data:`BLOCK_BYTES`
(less when the budget leaves less); a budget that cannot hold one block of some tensor besides the rest of its
job is refused with :class:`MemoryBudgetError`, before anything is read.

:class:`PeakRss` measures the run's peak resident set size (mapped input pages count, as in ``getrusage``).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mergescale.engine.plan import MergePlan, OutputSpec, Product, TensorJob, tensor_meta
from mergescale.errors import ConfigError
from mergescale.methods import kernels
from mergescale.methods.blocked import BlockedMerge, block_bounds

WHOLE_BYTES = 0
"""A blockable stacked product whose stack (and base) fit in this many bytes, and in the budget, runs on the whole
stack instead of over blocks. 0: every product that can block does. On the 128k-vocabulary slice of
``benchmarks/merge_speed.py --slice`` (TIES of 8 experts, whole process, this 2-core machine, two runs each),
blocking the layers' tensors too instead of stacking those under 1 GiB: 25.0 / 28.2 s against 27.4 / 29.8 s,
peak RSS 1.78-1.82 GB against 2.15 GB."""
BLOCK_BYTES = 256 << 20
"""Largest working memory of one block of a blocked product (:func:`block_row_bytes`: on the CPU the populated
pages of every input's rows, the base's rows in float32 and the method's temporaries)."""
FUSED_LOOPS_BYTES = 160 << 20
"""What loading the compiled loops of :mod:`~mergescale.methods.kernels` adds to a process: numba's runtime and
the loaded machine code, measured 0.06 + 0.08 GB on our machine. Planned once, from the first job whose method
uses them, unless this process has loaded them already (its resident set, the baseline, then holds them)."""
DEFAULT_PREFETCH = {True: 256 << 20, False: 128 << 20}
"""Read-ahead byte budget when every output is linear (True) or not."""


class MemoryBudgetError(ConfigError):
    """``max_memory`` cannot hold the merge (one block of some tensor besides the rest of its job).

    ``needed`` is the least budget that would hold the tensor refused (others may then need more)."""

    def __init__(self, message: str, needed: int = 0) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass
class ProductMemory:
    """How one product (output tensor of one output) is computed, and its working memory."""

    mode: str  # "linear", "whole", "blocked" or "copy"
    work: int  # bytes of working memory while it is computed (besides its output)
    output: int  # bytes of its result in the output dtype
    rows_per_block: int = 0
    blocks: int = 1
    block: int = 0  # bytes of one block (blocked products; ``work`` adds the method's state)


@dataclass
class JobMemory:
    """One tensor job: its products' plans, which reads stay memory maps read block by block, its need."""

    products: list[ProductMemory]
    lazy: frozenset[int]  # reads blocked products use: mapped unpopulated, held until the job is done
    need: int = 0
    runtime: int = 0  # numba's runtime, counted in need (loaded by this job or an earlier one)


@dataclass
class MemoryPlan:
    """The memory plan of a run (see the module docstring); sizes in bytes."""

    jobs: list[JobMemory]
    baseline: int
    prefetch: int
    max_memory: int | None
    peak_job: int = 0
    plan: MergePlan | None = field(default=None, repr=False)

    @property
    def peak(self) -> int:
        """Planned peak memory of the run: the baseline plus the most any job needs."""
        return self.baseline + max((j.need for j in self.jobs), default=0)

    @property
    def blocked(self) -> int:
        """How many products run over blocks."""
        return sum(p.mode == "blocked" for j in self.jobs for p in j.products)

    def describe(self) -> list[str]:
        """Lines for a person: the planned peak, where it is reached and how the large tensors are cut."""
        plan = self.plan
        assert plan is not None
        budget = f" (--max-memory {gb(self.max_memory)})" if self.max_memory is not None else ""
        lines = [f"planned peak memory: {gb(self.peak)}{budget}", f"  this process before merging: {gb(self.baseline)}"]
        if self.jobs:
            jm = self.jobs[self.peak_job]
            lines += [f"  the largest tensor job: {gb(jm.need)}, at", f"    {plan.jobs[self.peak_job].name}"]
        products = [pm for jm in self.jobs for pm in jm.products]
        lines.append(
            f"  {len(products)} output tensors: {sum(pm.mode == 'blocked' for pm in products)} over row blocks, "
            f"{sum(pm.mode == 'whole' for pm in products)} whole, {sum(pm.mode == 'linear' for pm in products)} "
            "linear"
        )
        blocked = [(p, pm) for j, jm in enumerate(self.jobs)
                   for p, pm in zip(plan.jobs[j].products, jm.products, strict=True) if pm.mode == "blocked"]  # fmt: skip
        for p, pm in sorted(blocked, key=lambda item: -item[1].work)[:3]:
            state = f" + {gb(pm.work - pm.block)} kept across them" if pm.work > pm.block else ""
            lines += [
                f"    {p.name}:",
                f"      {pm.blocks} blocks of {pm.rows_per_block} rows, {gb(pm.block)} each{state}",
            ]
        return lines


def _row_numel(shape: Sequence[int]) -> int:
    return math.prod(shape[1:]) if shape else 1


def _rows(shape: Sequence[int]) -> int:
    return shape[0] if shape else 1


def blocked_merge(spec: OutputSpec, product: Product, device: torch.device) -> BlockedMerge | None:
    """The product's blocked merge, or None when it is not a stacked product its method can block."""
    method = spec.method
    if (
        method.blocked is None
        or product.coefficients is not None
        or product.vocabulary is not None
        or product.statistics
        or not product.dtype.is_floating_point
    ):
        return None
    meta = tensor_meta(product, seed=spec.seed, device=device)
    return method.blocked(meta)


def block_row_bytes(product: Product, merge: BlockedMerge, device: torch.device) -> int:
    """Working bytes per row of a block. On the CPU: the populated pages of every input's rows, the base's rows
    in float32 and the method's temporaries (models are converted piece by piece into cache-sized scratch);
    elsewhere, or for methods that need whole rows (``materialize``), float32 rows of every input besides."""
    row = _row_numel(product.shape)
    inputs = len(product.models) + (product.base is not None)
    pages = inputs * product.dtype.itemsize
    converted = 4 if device.type == "cpu" and not merge.materialize else 4 * inputs
    return row * (pages + converted + int(4 * merge.temporaries))


def whole_bytes(product: Product) -> int:
    """Working bytes of a stacked product on the whole tensor: its float32 stack, base and statistics."""
    numel = math.prod(product.shape)
    inputs = len(product.models) + (product.base is not None) + sum(len(r) for r in product.statistics.values())
    if product.vocabulary is not None:
        inputs *= 2  # the raw inputs, then the aligned ones
    return 4 * numel * inputs


def stacked_working_bytes(blockable: bool, k: int, numel: int) -> int:
    """Working memory of a stacked method on a tensor of ``numel`` entries with ``k`` models and a base, with
    the engine's defaults (no ``max_memory``), when the shape is not known: its whole stack (k + 2 float32
    tensors: the models, the base, the result) when it cannot block (or the stack fits :data:`WHOLE_BYTES`);
    else the smaller of that and one block with what the method keeps across blocks (at most 4 bytes for 2.5 %
    of each model's entries: the selection's candidates; DARE keeps less)."""
    whole = 4 * numel * (k + 2)
    if not blockable or 4 * numel * (k + 1) <= WHOLE_BYTES:
        return whole
    return min(whole, BLOCK_BYTES + int(0.1 * k * numel))


def plan_memory(
    plan: MergePlan,
    *,
    max_memory: int | None = None,
    device: str | torch.device = "cpu",
    prefetch_bytes: int | None = None,
    baseline: int | None = None,
) -> MemoryPlan:
    """Decide how every product is computed and the run's planned peak memory, from headers only.

    Args:
        plan: from :func:`~mergescale.engine.plan.build_plan`.
        max_memory: the budget for the whole process's peak memory (bytes), or None for the defaults
            (:data:`WHOLE_BYTES`, :data:`BLOCK_BYTES`).
        device: where the arithmetic runs (blocks and stacks live there; outputs and inputs on the CPU).
        prefetch_bytes: the run's read-ahead budget (default as :func:`~mergescale.engine.stream.run_plan`).
        baseline: this process's memory before the run (default: its resident set size now).

    Raises:
        MemoryBudgetError: ``max_memory`` cannot hold one block of some tensor besides the rest of its job.
    """
    device = torch.device(device)
    if prefetch_bytes is None:
        prefetch_bytes = DEFAULT_PREFETCH[all(o.method.linear_coefficients is not None for o in plan.outputs)]
    if baseline is None:
        baseline = current_rss()
    result = MemoryPlan([], baseline, prefetch_bytes, max_memory, plan=plan)
    largest_output = max(
        (math.prod(p.shape) * plan.output_dtype(plan.outputs[p.output], p).itemsize
         for job in plan.jobs for p in job.products), default=0)  # fmt: skip
    # results waiting for the writer: up to the write budget, or one result whatever its size
    backlog = max(prefetch_bytes, largest_output)
    # numba's runtime, from the first job that loads it to the end
    pending = FUSED_LOOPS_BYTES if device.type == "cpu" and kernels.HAVE_NUMBA and not kernels.loaded() else 0
    runtime = 0
    for j, job in enumerate(plan.jobs):
        jm = _plan_job(plan, job, device, max_memory, baseline, prefetch_bytes, backlog, runtime, pending)
        runtime = jm.runtime
        result.jobs.append(jm)
        if jm.need > result.jobs[result.peak_job].need:
            result.peak_job = j
    return result


def _plan_job(
    plan: MergePlan,
    job: TensorJob,
    device: torch.device,
    max_memory: int | None,
    baseline: int,
    prefetch: int,
    backlog: int,
    runtime: int = 0,
    pending: int = 0,
) -> JobMemory:
    """``runtime``: what earlier jobs loaded (numba's); ``pending``: what this job adds if its methods load it."""
    products: list[ProductMemory] = []
    blocked: list[tuple[int, BlockedMerge]] = []
    for p in job.products:
        spec = plan.outputs[p.output]
        out = math.prod(p.shape) * plan.output_dtype(spec, p).itemsize
        if not p.dtype.is_floating_point:
            products.append(ProductMemory("copy", 0, out))
        elif p.coefficients is not None:
            products.append(ProductMemory("linear", 4 * math.prod(p.shape), out))
        else:
            merge = blocked_merge(spec, p, device)  # sizes the blocks; the run makes its own (engine/stream.py)
            products.append(ProductMemory("whole", whole_bytes(p), out))
            if merge is not None:
                blocked.append((len(products) - 1, merge))
    # inputs held while the job computes: linear outputs keep up to the read-ahead budget of their inputs
    held = prefetch if any(pm.mode == "linear" for pm in products) else 0
    if not runtime and any(merge.fused_loops for _, merge in blocked):
        runtime = pending
    fixed = prefetch + backlog + held + runtime + sum(pm.output for pm in products)

    def need() -> int:
        whole = sum(pm.work for pm in products if pm.mode in ("whole", "linear"))
        block = max((pm.work for pm in products if pm.mode == "blocked"), default=0)
        return fixed + whole + block

    limit = None if max_memory is None else max_memory - baseline
    # the largest stacks first: block them unless the stack fits WHOLE_BYTES (and the budget, given one)
    for i, merge in sorted(blocked, key=lambda item: -products[item[0]].work):
        pm = products[i]
        fits = pm.work <= WHOLE_BYTES and (limit is None or need() <= limit)
        if fits:
            continue
        p = job.products[i]
        per_row = block_row_bytes(p, merge, device)
        pm.mode, pm.work = "blocked", 0
        # the block's rows within BLOCK_BYTES and what the budget leaves besides the method's state
        room = BLOCK_BYTES if limit is None else min(BLOCK_BYTES, limit - need() - merge.state_bytes)
        rows = room // per_row
        if limit is None:
            rows = max(rows, merge.row_multiple)  # without a budget, the smallest block goes
        if rows < merge.row_multiple:
            assert max_memory is not None
            rest = need() + merge.state_bytes
            smallest = per_row * merge.row_multiple
            raise MemoryBudgetError(_refusal(plan, p, max_memory, baseline, rest, smallest), baseline + rest + smallest)
        bounds = block_bounds(_rows(p.shape), int(rows), merge.row_multiple)
        pm.rows_per_block = bounds[0][1] - bounds[0][0]
        pm.blocks = len(bounds)
        pm.block = per_row * pm.rows_per_block
        pm.work = pm.block + merge.state_bytes
    users = [[pm.mode for p, pm in zip(job.products, products, strict=True) if r in p.inputs]
             for r in range(len(job.reads))]  # fmt: skip
    lazy = frozenset(r for r, modes in enumerate(users) if "blocked" in modes)
    # an input a blocked product shares with others is read in whole by them and held to the job's end
    shared = sum(job.reads[r].nbytes for r in lazy if any(m != "blocked" for m in users[r]))
    jm = JobMemory(products, lazy, runtime=runtime)
    jm.need = need() + shared
    if limit is not None and jm.need > limit:
        raise MemoryBudgetError(_refusal(plan, job.products[0], max_memory or 0, baseline, jm.need, 0), baseline + jm.need)
    return jm


def _refusal(plan: MergePlan, p: Product, max_memory: int, baseline: int, rest: int, block: int) -> str:
    """One line: which tensor does not fit, and the least memory that would hold it."""
    what = f"one block of tensor {p.name!r}" if block else f"tensor {p.name!r}"
    parts = f"{gb(baseline)} this process, {gb(rest)} for its outputs, read-ahead and pending writes"
    parts += f", {gb(block)} for the smallest block" if block else " and working memory"
    return (
        f"--max-memory {gb(max_memory)} cannot hold {what} ({plan.outputs[p.output].method.name}, "
        f"{len(p.models)} models): it needs at least {gb(baseline + rest + block)} ({parts})"
    )


def gb(n: int | float) -> str:
    """Bytes as GB with two decimals (decimal units, as the sizes users write)."""
    return f"{n / 1e9:.2f} GB"


# ---------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def high_water_mark() -> int | None:
    """The kernel's peak RSS of this process (``VmHWM``), or None where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class PeakRss:
    """The peak resident set size of this process during a ``with`` block.

    Exact when the block sets a new high for the process (the kernel's ``VmHWM``); otherwise (the process had
    been larger before) the largest of samples taken every ``interval`` seconds.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="mergescale-rss")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> PeakRss:
        self._before = high_water_mark()
        self.peak = current_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        after = high_water_mark()
        if after is not None and self._before is not None and after > self._before:
            self.peak = after

"""Running a blocked merge (:mod:`mergescale.methods.blocked`) over the engine's inputs.

The inputs of a blocked product stay as they were read: memory maps of the safetensors files (not populated)
or tensors in their stored dtype. Each block is converted from them into a float32 buffer on the compute
device: the rows' pages are mapped in (``MADV_POPULATE_READ``), converted, and given back
(``MADV_DONTNEED``: they are clean private pages of the page cache, re-read from it if needed), so the
process holds the pages of one block of one input at a time, however large the tensor. The result rows go
straight into the output tensor in its dtype.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import torch

from mergescale.io.checkpoint import populate_map
from mergescale.methods.blocked import (
    Block,
    BlockedMerge,
    Runner,
    block_bounds,
    column_ranges,
    drive,
    sequential,
)

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_WINDOW = 16 << 20  # entries of a map populated at a time to read a sample from it
_madvise = None


def release_pages(t: torch.Tensor) -> None:
    """Drop the pages under ``t`` from this process (``MADV_DONTNEED``). Only for tensors that view a private,
    unmodified file map (``SafetensorsCheckpoint.map``): anonymous memory would be zeroed."""
    global _madvise
    if t.numel() == 0 or t.device.type != "cpu":
        return
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    addr = t.data_ptr()
    end = addr + t.numel() * t.element_size()
    start = addr - addr % mmap.PAGESIZE
    # pages shared with the neighbouring rows are dropped too: they are clean and fault back in from the cache
    _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def runner(executor: Executor | None, workers: int) -> Runner:
    """A :data:`~mergescale.methods.blocked.Runner` on the caller's thread and ``workers - 1`` executor threads:
    calls are dealt out round robin (they are of like cost: one per model, or per column range)."""
    if executor is None or workers <= 1:
        return sequential

    def run(fn: Callable[[int], None], n: int) -> None:
        if n <= 1:
            sequential(fn, n)
            return
        groups = [range(j, n, workers) for j in range(min(workers, n))]
        futures = [executor.submit(lambda g=g: [fn(i) for i in g]) for g in groups[1:]]
        try:
            for i in groups[0]:
                fn(i)
        finally:
            for f in futures:
                f.result()

    return run


def run_blocked(
    merge: BlockedMerge,
    rows_per_block: int,
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    mapped: Sequence[bool],
    out: torch.Tensor,
    device: torch.device,
    check: Callable[[int, torch.Tensor], None] | None = None,
    executor: Executor | None = None,
    workers: int = 1,
) -> torch.Tensor:
    """Merge one tensor block by block into ``out``.

    On the CPU a block's model rows are handed to the method as read (populated pages of the maps, converted
    piece by piece into cache-sized scratch, :class:`~mergescale.methods.blocked.Block`), and only the base's
    rows are converted to float32 up front; methods that need whole float32 rows (``materialize``) and other
    devices get every input's rows converted (to the device) instead.

    Args:
        merge: the product's blocked merge.
        rows_per_block: rows of dim 0 per block (the plan's).
        models / base: the inputs as read (CPU, stored dtype), base last in ``mapped``.
        mapped: per input (models, then the base), whether it views a file map whose pages may be dropped.
        out: the result (output dtype, CPU), written block by block.
        device: where blocks are converted and merged.
        check: ``check(input, rows)``, called once per block of every input with its rows (the finite check);
            input indexes ``models`` then the base.
        executor / workers: threads to share independent work with (populating and converting inputs, the
            method's models and column ranges): the caller's thread and ``workers - 1`` of the executor's.
    """
    run = runner(executor, workers)
    k = len(models)
    shape = tuple(out.shape)
    rows = shape[0] if shape else 1
    row_shape = shape[1:] if shape else ()
    flat_row = 1
    for d in row_shape:
        flat_row *= d
    sources = [*models, *([base] if base is not None else [])]
    sources = [s.reshape(rows, *row_shape) for s in sources]
    bounds = block_bounds(rows, rows_per_block, merge.row_multiple)
    size = max(b - a for a, b in bounds)
    lazy = device.type == "cpu" and not merge.materialize
    converted = 1 if lazy else len(sources)  # the base only, or every input
    buf = torch.empty((converted, size, *row_shape), dtype=torch.float32, device=device)  # (·, r, ...)
    checked: set[int] = set()
    out_rows = out.reshape(rows, *row_shape)

    def release(start: int, stop: int) -> None:
        for i, s in enumerate(sources):
            if mapped[i]:
                release_pages(s[start:stop])

    def fill(start: int, stop: int) -> Block:
        first = check is not None and start not in checked
        r = stop - start

        def one(i: int) -> None:
            src = sources[i][start:stop]  # (r, ...) stored dtype, CPU
            if mapped[i]:
                populate_map(src)
            if not lazy:
                rows_in = buf[i, :r].copy_(src)  # converts while copying (to the device too)
                if mapped[i]:
                    release_pages(src)
            elif i == k:
                rows_in = buf[0, :r].copy_(src)  # the base, float32
            else:
                rows_in = src  # read piece by piece by the method; checked as stored
            if first:
                check(i, rows_in)  # type: ignore[misc]

        run(one, len(sources))
        checked.add(start)
        offset = start * flat_row
        if lazy:
            b = buf[0, :r] if base is not None else None
            return Block(start, stop, offset, b, sources=[sources[i][start:stop] for i in range(k)],
                         numel=r * flat_row, device=device, run=run, workers=workers)  # fmt: skip
        return Block(start, stop, offset, buf[k, :r] if base is not None else None, tensors=buf[:k, :r], run=run,
                     workers=workers)  # fmt: skip

    def emit(block: Block, result: torch.Tensor) -> None:
        # into the output dtype, on every thread: the output's pages are touched for the first time here, and
        # faulting them in on one thread cost as much as a pass of the method
        dst = out_rows[block.start : block.stop].reshape(-1)
        src = result.reshape(-1)
        ranges = column_ranges(dst.numel(), workers, block.offset, [])
        run(lambda j: dst[ranges[j][0] : ranges[j][1]].copy_(src[ranges[j][0] : ranges[j][1]]), len(ranges))

    def done(block: Block) -> None:
        if lazy:
            release(block.start, block.stop)

    def gather(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        order = positions.argsort()
        ordered = positions[order]  # ascending: window by window through each map
        got: list[torch.Tensor] = [positions] * len(sources)

        def one(i: int) -> None:
            flat = sources[i].reshape(-1)
            if not mapped[i]:
                got[i] = flat[positions].to(device=device, dtype=torch.float32)
                return
            # populate a window, read its sample entries, drop it: faulting in the scattered pages one by one
            # cost seconds per GB; the pages held stay one window's
            values = torch.empty(positions.numel(), dtype=flat.dtype)
            bounds = torch.searchsorted(ordered, torch.arange(0, flat.numel() + _WINDOW, _WINDOW)).tolist()
            for w in range(len(bounds) - 1):
                lo, hi = bounds[w], bounds[w + 1]
                if hi == lo:
                    continue
                window = flat[w * _WINDOW : (w + 1) * _WINDOW]
                populate_map(window)
                values[order[lo:hi]] = window[ordered[lo:hi] - w * _WINDOW]
                release_pages(window)
            got[i] = values.to(device=device, dtype=torch.float32)

        run(one, len(sources))
        return torch.stack(got[:k]), (got[k] if base is not None else None)

    drive(merge, bounds, fill, emit, gather, done)
    return out

"""Weighted sums of same-shaped tensors, computed cache chunk by cache chunk: the kernel of every linear merge.

An output's weighted sum Σⱼ cⱼ·float32(x_j) is computed in **blocks** of consecutive terms: each block is one
BLAS matrix-vector product over a cache-sized chunk, ``r = prior + X_blockᵀ·c_block`` (no prior for the first
block), where ``X_block`` holds the block's inputs converted to float32 in a small scratch that stays in cache.
So memory is read once in the inputs' dtype (bf16 as read) and written once in the output's, instead of
converting every input to a full float32 copy and adding copies in memory. Measured here (one thread, chunks of
64K entries): 4 bf16 inputs of 32M entries, 0.56 s the whole-tensor way, 0.12 s in chunks; 10 inputs in one
block, 63 µs per chunk with one ``mv`` against 183 µs with 10 in-place adds.

The caller decides the blocks from the output's own terms only (the engine: by the tensor's size), and each
block is the same BLAS call whatever else shares the read: an average computed within a sweep of nine is bit
for bit the average computed alone.

Chunks are split between ``workers`` threads (torch releases the GIL in its kernels), each with its own
scratch. Pure tensor code, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

# Entries per chunk on the CPU (measured: 64K-256K best on a 2-core EPYC; 128K by 15% for 4 bf16 inputs).
CPU_CHUNK = 1 << 17
# On accelerators one kernel per op wins; the cap bounds the float32 scratch (m × 64M × 4 bytes).
DEVICE_CHUNK = 1 << 26
# Below this many entries one thread does the whole tensor: handing work to a second costs more.
_SPLIT_MIN = 1 << 20


@dataclass
class Block:
    """One block of one output: ``target = prior + Σⱼ coefs[j]·inputs[rows[j]]`` (float32, cast to target)."""

    rows: list[int]  # indices into the inputs, in term order
    coefs: list[float]
    target: torch.Tensor  # the inputs' shape: a float32 accumulator or the output dtype; may be the prior
    prior: torch.Tensor | None = None  # float32 partial sum of the output's earlier blocks


def fold_blocks(
    inputs: Sequence[torch.Tensor],
    blocks: Sequence[Block],
    *,
    pool: Executor | None = None,
    workers: int = 1,
) -> list[float]:
    """Compute every block (:class:`Block`) in one pass over the inputs, chunk by chunk.

    Args:
        inputs: m tensors of one shape (any float dtype), on one device; each is converted once per chunk.
        blocks: what to compute; inputs a block does not list never reach its target (not even as 0·NaN).
        pool: executor for the extra workers (``workers - 1`` tasks are submitted to it).
        workers: how many threads share the chunks.

    Returns:
        Per block, the sum of its float32 result: non-finite whenever an entry is (a cheap finite check).
    """
    n = inputs[0].numel()
    device = inputs[0].device
    chunk = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
    flat_in = [x.reshape(-1) for x in inputs]  # (n,) views
    plans = [
        _FlatBlock(
            b.rows,
            torch.tensor(b.coefs, dtype=torch.float32, device=device),
            b.target.view(-1),
            None if b.prior is None else b.prior.view(-1),
        )
        for b in blocks
    ]

    stride = max(1, min(chunk, n))  # depends on the tensor only: the same layout in every call

    def run(start: int, stop: int) -> list[float]:
        return _fold_range(flat_in, plans, start, stop, max(1, min(stride, stop - start)), stride)

    if pool is None or workers <= 1 or n < _SPLIT_MIN or device.type != "cpu":
        return run(0, n)
    # contiguous slices, one per worker, cut at chunk boundaries (so every chunk is the same in any split)
    per = -(-n // workers)
    per = -(-per // chunk) * chunk
    bounds = [(s, min(n, s + per)) for s in range(0, n, per)]
    futures = [pool.submit(run, s, e) for s, e in bounds[1:]]
    sums = run(*bounds[0])
    for f in futures:
        sums = [a + b for a, b in zip(sums, f.result(), strict=True)]
    return sums


@dataclass
class _FlatBlock:
    rows: list[int]
    coefs: torch.Tensor  # (len,) float32
    target: torch.Tensor  # (n,)
    prior: torch.Tensor | None  # (n,)

    @property
    def contiguous(self) -> range | None:
        """The rows as a range when they are consecutive and ascending (the block is then a view)."""
        lo = self.rows[0]
        return range(lo, lo + len(self.rows)) if self.rows == list(range(lo, lo + len(self.rows))) else None


def _fold_range(
    inputs: list[torch.Tensor], blocks: list[_FlatBlock], start: int, stop: int, width: int, stride: int
) -> list[float]:
    device = inputs[0].device
    used = sorted({i for b in blocks for i in b.rows})
    # Scratch rows are ``stride`` apart in every call and split, so a block's BLAS call sees the same layout
    # (and gives the same bits) whichever inputs share the pass.
    scratch = torch.empty((len(inputs), stride), dtype=torch.float32, device=device)[:, :width]  # (m, C)
    longest = max(len(b.rows) for b in blocks)
    gather = torch.empty((longest, stride), dtype=torch.float32, device=device)[:, :width]  # (len, C)
    res = torch.empty(width, dtype=torch.float32, device=device)  # (C,)
    sums = [0.0] * len(blocks)
    spans = [b.contiguous for b in blocks]
    for s in range(start, stop, width):
        e = min(stop, s + width)
        c = e - s
        xs, r = scratch[:, :c], res[:c]
        for i in used:
            xs[i].copy_(inputs[i][s:e])  # converts while copying, into cache
        for k, (b, span) in enumerate(zip(blocks, spans, strict=True)):
            if span is not None:
                x = xs[span.start : span.stop]  # (len, C) view
            else:
                x = gather[: len(b.rows), :c]
                for j, i in enumerate(b.rows):
                    x[j].copy_(xs[i])
            if b.prior is None:
                torch.mv(x.T, b.coefs, out=r)  # (C,) Σⱼ cⱼ·xⱼ
            else:
                torch.addmv(b.prior[s:e], x.T, b.coefs, out=r)  # (C,) prior + Σⱼ cⱼ·xⱼ
            sums[k] += float(r.sum())
            b.target[s:e].copy_(r)  # casts to the target's dtype
    return sums

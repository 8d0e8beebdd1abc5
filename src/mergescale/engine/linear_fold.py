"""Weighted sums of same-shaped tensors, computed cache chunk by cache chunk: the kernel of every linear merge.

An output's weighted sum Σⱼ cⱼ·float32(x_j) is computed in **blocks** of consecutive terms, each block chunk by
chunk into a float32 accumulator ``a`` of one chunk that stays in cache: ``a = c₁·x₁`` (or ``prior + c₁·x₁``),
then ``a += cⱼ·xⱼ`` for the block's other terms, each one torch operation, then ``a`` is cast into the target.
An input that only one block of the pass reads (one average) is read in its own dtype (bf16 as read) by that
multiply-add, which converts it on the fly; an input several blocks read (a sweep) is converted once per chunk
into a float32 scratch row that stays in cache, and the blocks read that. So every input is read from memory
once, in its stored dtype, and the output is written once in its own dtype.

Why multiply-adds: the previous kernel converted the chunk's inputs into a float32 scratch (m × chunk) and
summed it with one BLAS matrix-vector product. Profiled on the 268M-parameter benchmark (10 bf16 checkpoints,
one thread, chunks of 128K entries, Intel Xeon), its CPU went 60 % to the conversion and 30 % to the product,
which re-read the 5 MB scratch from the L3 cache. Measured alone on the same data (one thread, interleaved,
shared machine): one SMA of 10, 1.6-2.3 s of CPU against 2.1-2.8 s; the sweep of 9 averages (57 terms),
6.8-7.2 s against 6.9-9.9 s. Chunks of 128K entries (a 512 KB accumulator, in L2) were best: torch costs about
5 µs per operation here, so smaller chunks pay that more often than they gain from the cache (64K: +5 %, 32K:
+20 %).

Each block is summed in its terms' order by the same operations whatever else shares the pass, so an average
computed within a sweep of nine is bit for bit the average computed alone; the caller decides the blocks from
the output's own terms only (the engine: by the tensor's size).

Chunks are split between ``workers`` threads (torch releases the GIL in its kernels), each with its own
accumulator. Pure tensor code, no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

# Entries per chunk on the CPU (measured: 64K-256K best on a 2-core EPYC and on an Intel Xeon; see above).
CPU_CHUNK = 1 << 17
# On accelerators one kernel per op wins; the cap bounds the float32 accumulator (64M × 4 bytes per worker).
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
        inputs: m tensors of one shape (any float dtype), on one device; each chunk of an input is read by every
            block that lists it (after the first, from cache) and converted as it is read.
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

    def run(start: int, stop: int) -> list[float]:
        return _fold_range(flat_in, plans, start, stop, max(1, min(chunk, stop - start)))

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


def _fold_range(
    inputs: list[torch.Tensor], blocks: list[_FlatBlock], start: int, stop: int, width: int
) -> list[float]:
    device = inputs[0].device
    reads = Counter(i for b in blocks for i in b.rows)
    # inputs several blocks read (a sweep) are converted once per chunk into a float32 scratch that stays in
    # cache; an input one block reads is converted as that block's multiply-add reads it. Both give the same
    # bits (torch converts a mixed-dtype operand exactly, then runs the same float32 kernel; checked by
    # tests/engine/test_linear_fold.py), so a block's result never depends on what shares the pass.
    shared = [i for i in sorted(reads) if reads[i] > 1]
    scratch = torch.empty((len(shared), width), dtype=torch.float32, device=device)  # (shared, C)
    full_rows = list(scratch.unbind(0))  # (C,) each
    acc = torch.empty(width, dtype=torch.float32, device=device)  # (C,) one for every block, in cache
    once = [i for i in sorted(reads) if reads[i] == 1]
    first = [float(b.coefs[0]) for b in blocks]
    terms = [list(zip(b.rows[1:], b.coefs[1:].tolist(), strict=True)) for b in blocks]
    sums = [0.0] * len(blocks)
    for s in range(start, stop, width):
        e = min(stop, s + width)
        a = acc[: e - s]
        xs = {i: inputs[i][s:e] for i in once}  # (C,) views in the inputs' dtype
        rows = full_rows if e - s == width else list(scratch[:, : e - s].unbind(0))
        for row, i in zip(rows, shared, strict=True):
            xs[i] = row.copy_(inputs[i][s:e])  # converts once, into cache
        for k, b in enumerate(blocks):
            if b.prior is None:
                torch.mul(xs[b.rows[0]], b.coefs[:1], out=a)  # c₁·x₁ in float32 (a (1,) float32 factor)
            else:
                torch.add(b.prior[s:e], xs[b.rows[0]], alpha=first[k], out=a)  # prior + c₁·x₁
            for i, c in terms[k]:
                a.add_(xs[i], alpha=c)  # a + cⱼ·xⱼ in the block's term order, converting xⱼ if it is not yet
            sums[k] += float(a.sum())
            b.target[s:e].copy_(a)  # casts to the target's dtype
    return sums

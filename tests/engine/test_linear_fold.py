"""The chunked weighted-sum kernel of linear merges."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mergescale.engine import linear_fold
from mergescale.engine.linear_fold import Block, fold_blocks


def _inputs(m: int, n: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g).to(dtype) for _ in range(m)]


def _reference(inputs, rows, coefs, prior=None) -> torch.Tensor:
    """Σⱼ cⱼ·xⱼ in float64: the formula, independent of the kernel."""
    acc = torch.zeros(inputs[0].shape, dtype=torch.float64) if prior is None else prior.double().clone()
    for i, c in zip(rows, coefs, strict=True):
        acc += inputs[i].double() * c
    return acc


@pytest.mark.parametrize("workers", [1, 3])
def test_blocks_equal_the_formula_across_chunks_and_workers(monkeypatch, workers):
    monkeypatch.setattr(linear_fold, "CPU_CHUNK", 1000)  # many chunks, a ragged last one
    monkeypatch.setattr(linear_fold, "_SPLIT_MIN", 0)
    xs = [x.view(50, 101) for x in _inputs(4, 5050)]
    specs = [([0, 1, 2, 3], [0.25] * 4, torch.bfloat16), ([3, 1], [2.0, -0.5], torch.float32), ([2], [1.0], torch.float32)]
    blocks = [Block(rows, coefs, torch.empty(50, 101, dtype=dt)) for rows, coefs, dt in specs]
    with ThreadPoolExecutor(max(workers - 1, 1)) as pool:
        sums = fold_blocks(xs, blocks, pool=pool, workers=workers)
    for (rows, coefs, dt), block, total in zip(specs, blocks, sums, strict=True):
        ref = _reference(xs, rows, coefs)
        tol = 1e-2 if dt == torch.bfloat16 else 1e-5  # bf16 output: one rounding of a float32 result
        assert torch.allclose(block.target.double(), ref, rtol=tol, atol=tol)
        assert math.isclose(total, float(ref.sum()), rel_tol=1e-4, abs_tol=1e-2)


def test_a_prior_adds_to_the_block_and_may_be_its_target():
    xs = _inputs(5, 4000)
    acc = torch.empty(4000)
    fold_blocks(xs[:2], [Block([0, 1], [0.1, 0.2], acc)])
    fold_blocks(xs[2:], [Block([0, 1, 2], [0.3, 0.4, 0.5], acc, prior=acc)])
    assert torch.allclose(acc.double(), _reference(xs, range(5), [0.1, 0.2, 0.3, 0.4, 0.5]), atol=1e-5)


def test_a_block_gives_the_same_bits_whatever_shares_the_pass(monkeypatch):
    """What makes a sweep's average equal the average alone: same block, same bits, other inputs or not."""
    monkeypatch.setattr(linear_fold, "CPU_CHUNK", 1024)
    xs = _inputs(6, 10_000)
    alone = torch.empty(10_000)
    fold_blocks(xs[3:6], [Block([0, 1, 2], [0.2, 0.3, 0.5], alone)])
    shared = [torch.empty(10_000) for _ in range(3)]
    fold_blocks(
        xs,
        [
            Block([3, 4, 5], [0.2, 0.3, 0.5], shared[0]),  # contiguous rows: a view of the scratch
            Block([0, 2, 4], [0.1, 0.1, 0.8], shared[1]),  # scattered rows: gathered
            Block([5, 0], [0.5, 0.5], shared[2]),
        ],
    )
    assert torch.equal(shared[0], alone)
    gathered_alone = torch.empty(10_000)
    fold_blocks([xs[0], xs[2], xs[4]], [Block([0, 1, 2], [0.1, 0.1, 0.8], gathered_alone)])
    assert torch.equal(shared[1], gathered_alone)


def test_unlisted_nan_input_never_reaches_a_block_and_sums_flag_nan():
    xs = _inputs(2, 100, torch.float32)
    xs[1][7] = float("nan")
    out = [torch.empty(100), torch.empty(100)]
    sums = fold_blocks(xs, [Block([0], [1.0], out[0]), Block([0, 1], [1.0, 0.0], out[1])])
    assert math.isfinite(sums[0]) and torch.isfinite(out[0]).all()
    assert math.isnan(sums[1])  # a listed input counts even at weight 0: 0·NaN is NaN

"""The chunked weighted-sum kernel of linear merges, and the engine's use of it."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mergescale.engine import linear_fold
from mergescale.engine.linear_fold import fold_weighted


def _inputs(m: int, n: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g).to(dtype) for _ in range(m)]


def _reference(inputs, row, prior=None):
    acc = None if prior is None else prior.clone()
    for i, c in row:
        term = inputs[i].to(torch.float32) * c
        acc = term if acc is None else acc + term
    return acc


@pytest.mark.parametrize("workers", [1, 3])
def test_weighted_sums_equal_the_formula_across_chunks_and_workers(monkeypatch, workers):
    monkeypatch.setattr(linear_fold, "CPU_CHUNK", 1000)  # many chunks, a ragged last one
    monkeypatch.setattr(linear_fold, "_SPLIT_MIN", 0)
    xs = [x.view(50, 101) for x in _inputs(4, 5050)]
    rows = [[(0, 0.25), (1, 0.25), (2, 0.25), (3, 0.25)], [(3, 2.0), (1, -0.5)], [(2, 1.0)]]
    targets = [torch.empty(50, 101, dtype=torch.bfloat16), torch.empty(50, 101), torch.empty(50, 101)]
    with ThreadPoolExecutor(workers - 1 or 1) as pool:
        sums = fold_weighted(xs, rows, targets, [None] * 3, pool=pool, workers=workers)
    for row, target, total in zip(rows, targets, sums, strict=True):
        ref = _reference(xs, row)
        assert torch.allclose(target.float(), ref.to(target.dtype).float(), atol=0, rtol=0)
        assert math.isclose(total, float(ref.double().sum()), rel_tol=1e-4, abs_tol=1e-3)


def test_prior_continues_the_same_order_bit_for_bit(monkeypatch):
    """Folding inputs in two groups through a float32 partial sum gives the one-group result exactly."""
    monkeypatch.setattr(linear_fold, "CPU_CHUNK", 777)
    xs = _inputs(5, 4000)
    row = [(i, 0.1 * (i + 1)) for i in range(5)]
    whole = torch.empty(4000)
    fold_weighted(xs, [row], [whole], [None])
    acc = torch.empty(4000)
    fold_weighted(xs[:2], [row[:2]], [acc], [None])
    fold_weighted(xs[2:], [[(i - 2, c) for i, c in row[2:]]], [acc], [acc])
    assert torch.equal(acc, whole)


def test_an_output_is_independent_of_the_others_sharing_the_read():
    xs = _inputs(4, 3000)
    alone = torch.empty(3000)
    fold_weighted(xs[1:3], [[(0, 0.5), (1, 0.5)]], [alone], [None])
    shared = [torch.empty(3000), torch.empty(3000)]
    fold_weighted(xs, [[(1, 0.5), (2, 0.5)], [(0, 0.3), (3, 0.7)]], shared, [None, None])
    assert torch.equal(shared[0], alone)


def test_unused_nan_input_never_reaches_an_output_and_sums_flag_nan():
    xs = _inputs(2, 100, torch.float32)
    xs[1][7] = float("nan")
    out = [torch.empty(100), torch.empty(100)]
    sums = fold_weighted(xs, [[(0, 1.0)], [(0, 1.0), (1, 0.0)]], out, [None, None])
    assert math.isfinite(sums[0]) and torch.isfinite(out[0]).all()
    assert math.isnan(sums[1])  # a listed input counts even at weight 0: 0·NaN is NaN

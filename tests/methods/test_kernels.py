"""The fused numba loops give what the torch ops they replace give (bit for bit where they replace them on the
same definition, to float rounding where the definition of a sum changed), on edge values and odd lengths."""

from __future__ import annotations

import math

import pytest
import torch

from mergescale.methods import get_method, kernels
from mergescale.methods.base import MethodInputs
from mergescale.methods.blocked import GRID, AbsSum, GridSum, TensorMeta, run_in_memory
from mergescale.methods.random_masks import unpack_bits
from mergescale.methods.selection import TopKSearch, _bits, top_k_thresholds_
from mergescale.methods.sparsify import sparsifier
from mergescale.methods.task_arithmetic import _DisjointMerge


def test_numba_is_installed_so_the_fused_loops_are_what_runs():
    assert kernels.HAVE_NUMBA
    assert kernels.available(torch.zeros(3))
    assert not kernels.available(torch.zeros(4, 4).T)  # not contiguous


@pytest.fixture
def torch_ops(monkeypatch):
    """Switches the fused loops off for the code under test (the torch ops run instead)."""

    def off() -> None:
        monkeypatch.setattr(kernels, "ENABLED", False)

    return off


def _edge_values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()  # many equal magnitudes
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-40, -1e-40, 0.02, -0.02])[:n]
    if n:
        x[torch.randint(0, n, (specials.numel(),), generator=g)] = specials
    return x


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 1000, 4099])
@pytest.mark.parametrize("subtract", [False, True])
def test_band_sweep_counts_and_gathers_what_the_torch_ops_do(n, subtract):
    x = _edge_values(n, seed=n)
    sub = _edge_values(n, seed=n + 1) if subtract else None
    for lo, hi in [(0.0, math.inf), (0.01, 0.02), (0.02, 0.02), (0.5, 0.6), (0.0, 0.0)]:
        got = x.clone()
        values, positions = torch.empty(max(n, 1)), torch.empty(max(n, 1), dtype=torch.int64)
        n_above, m = kernels.band_sweep_(got, sub, _bits(lo), _bits(hi), values, positions, offset=5)
        want = x - sub if sub is not None else x.clone()
        bits = want.abs().view(torch.int32)
        inside = (bits >= _bits(lo)) & (bits <= _bits(hi))
        assert torch.equal(got, want)  # the subtraction landed in x, the same floats
        assert n_above == int((bits > _bits(hi)).sum())
        assert torch.equal(positions[:m], inside.nonzero().squeeze(1) + 5)
        assert torch.equal(values[:m], want.abs()[inside])


@pytest.mark.parametrize("n,density", [(1000, 0.3), (300_000, 0.05), (300_000, 0.5)])
def test_top_k_search_finds_the_same_thresholds_fused_or_not(n, density, torch_ops):
    x = _edge_values(n, seed=3)
    base = _edge_values(n, seed=4)
    k = int(density * n)

    def search() -> list:
        s = TopKSearch(n, [k, k // 3])
        positions = s.sample_positions()
        if positions is not None:
            s.take_sample(x[positions] - base[positions])
        while True:
            for lo in range(0, n, 7777):
                s.feed(x[lo : lo + 7777].clone(), lo, subtract=base[lo : lo + 7777])
            if s.resolve():
                return s.thresholds

    fused = search()
    whole_fused = top_k_thresholds_(x.clone(), [k], subtract=base)[0][0]
    torch_ops()
    assert search() == fused
    whole = top_k_thresholds_(x.clone(), [k], subtract=base)[0][0]
    assert (whole.value, whole.n_greater) == (whole_fused.value, whole_fused.n_greater)
    assert torch.equal(whole.equal_positions, whole_fused.equal_positions)


def _reference_merge(stack, coefs, weights, normalize, lam, out):
    """TIES' elect + disjoint merge in float64, straight from the formula."""
    s = stack.double()
    c = torch.tensor(coefs, dtype=torch.float64)[:, None]
    delta = c * s  # (k, c) δᵢ
    elected = torch.where(delta.sum(0) >= 0, 1.0, -1.0)
    agree = (delta * elected) > 0
    total = (delta * agree).sum(0)
    if normalize:
        div = (torch.tensor(weights, dtype=torch.float64)[:, None] * agree).sum(0)
        total = total / torch.where(div == 0, 1.0, div)
    return out.double() + lam * total


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("c", [1, 511, 512, 1300])
@pytest.mark.parametrize("coefs,weights", [([1.0, 0.5, 2.0], [1.0, 0.5, 2.0]), ([1.0, -0.5, 0.0], [1.0, 1.0, 0.0])])
def test_disjoint_merge_is_the_formula_and_close_to_the_torch_ops(normalize, c, coefs, weights):
    g = torch.Generator().manual_seed(c)
    wide = torch.randn(3, c + 9, generator=g)
    wide[wide.abs() < 0.7] = 0.0  # sparse task vectors: entries where no model agrees, divisors of 0
    stack = wide[:, 4 : 4 + c]  # rows contiguous, the row stride not c
    out = torch.randn(c, generator=g)
    merge = _DisjointMerge(coefs, weights, normalize, torch.device("cpu"))
    fused = out.clone()
    merge.add_to(stack, fused, 0.7, torch.empty(kernels.MERGE_SCRATCH))
    assert torch.equal(stack, wide[:, 4 : 4 + c])  # left as it was
    want = _reference_merge(stack, coefs, weights, normalize, 0.7, out)
    assert torch.allclose(fused.double(), want, rtol=1e-6, atol=1e-6)
    by_torch = out.clone().add_(merge(stack.clone()), alpha=0.7)
    assert torch.allclose(fused, by_torch, rtol=1e-6, atol=1e-6)


def test_disjoint_merge_elects_plus_on_a_tie_and_divides_by_the_agreeing_weights():
    stack = torch.tensor([[1.0, -2.0, 0.0], [-1.0, 3.0, 0.0]])  # column 0: Σ = 0 elects +
    merge = _DisjointMerge([1.0, 1.0], [1.0, 3.0], True, torch.device("cpu"))
    out = torch.zeros(3)
    merge.add_to(stack, out, 1.0, torch.empty(kernels.MERGE_SCRATCH))
    assert out.tolist() == [1.0, 3.0 / 3.0, 0.0]


def test_abs_sum_is_thirty_two_float64_lanes_in_order():
    x = _edge_values(1000, seed=9)
    x = x[x.isfinite()]
    lanes = [0.0] * 32
    for j, v in enumerate(x.tolist()):
        lanes[j % 32] += abs(v)
    want = 0.0
    for v in lanes:
        want += v
    assert kernels.abs_sum(x) == want
    big = torch.randn(GRID)
    assert kernels.abs_sum(big) == pytest.approx(math.fsum(big.abs().double().tolist()), rel=1e-12)
    assert AbsSum()(big.view(512, -1).T) == kernels.abs_sum(big.view(512, -1).T.contiguous())  # copied first


def _dare_state(rule) -> tuple:
    rule.end_pass()
    return (rule.bits.clone() if rule.bits is not None else None, rule.kept_pos, rule.kept_val, rule.scale,
            rule.before.value, rule.after.value)  # fmt: skip


@pytest.mark.parametrize("n,pieces", [(3 * GRID + 1001, GRID), (GRID + 100, 4097), (999, 999)])
def test_dare_sweep_keeps_what_the_torch_ops_keep(n, pieces, torch_ops):
    """Whole grid chunks take the fused sweep, others the torch ops; both, and the sums, are the same."""
    g = torch.Generator().manual_seed(n)
    # full float32 mantissas of mixed scales: float64 sums of them round, so the order of the sums shows
    x = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))
    base = torch.randn(n, generator=g)

    def run() -> tuple:
        rule = sparsifier(n, (n,), "random", 0.3, rescale=True, generator=torch.Generator().manual_seed(5))
        swept = x.clone()
        for lo in range(0, n, pieces):
            rule.feed(swept[lo : lo + pieces], base[lo : lo + pieces], lo)
        return swept, *_dare_state(rule)

    fused = run()
    torch_ops()
    by_torch = run()
    for a, b in zip(fused, by_torch, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("skip", range(8))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 100])
def test_dare_apply_unpacks_the_verdicts_where_the_chunk_starts(skip, n):
    g = torch.Generator().manual_seed(n + skip)
    flags = torch.randint(0, 2, (skip + n,), generator=g, dtype=torch.uint8)
    from mergescale.methods.random_masks import pack_bits

    packed = pack_bits(flags)
    x, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    got = x.clone()
    kernels.dare_apply_(got, b, packed, skip)
    assert torch.equal(got, (x - b) * unpack_bits(packed, skip + n)[skip:])


@pytest.mark.parametrize("method,mp", [("ties", {"density": 0.2}), ("dare_ties", {"density": 0.4})])
def test_merges_keep_the_same_entries_fused_or_not(method, mp, torch_ops):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(700, 400, generator=g).to(torch.bfloat16).float()
    stack = (base + 0.01 * torch.randn(3, 700, 400, generator=g)).to(torch.bfloat16).float()

    def merged() -> torch.Tensor:
        inputs = MethodInputs(name="w", tensors=stack.clone(), base=base.clone(),
                              model_params=[{"weight": 1.0 + i, **mp} for i in range(3)], params={}, seed=3)  # fmt: skip
        return run_in_memory(get_method(method).blocked(TensorMeta.of(inputs)), inputs, rows_per_block=97, lazy=True)

    fused = merged()
    torch_ops()
    by_torch = merged()
    assert torch.equal(fused != base, by_torch != base)  # the same entries survive
    assert torch.allclose(fused, by_torch, rtol=1e-6, atol=1e-7)


def test_grid_sum_takes_a_whole_chunk_computed_by_the_caller():
    x = torch.randn(2 * GRID + 5)
    fed, added = GridSum(x.numel(), AbsSum()), GridSum(x.numel(), AbsSum())
    fed.feed(x, 0)
    for lo in range(0, x.numel(), GRID):
        assert added.whole_chunk(lo, min(GRID, x.numel() - lo))
        added.add_chunk(lo, min(GRID, x.numel() - lo), kernels.abs_sum(x[lo : lo + GRID]))
    assert added.value == fed.value
    assert not added.whole_chunk(1, GRID) and not added.whole_chunk(0, 7)

"""The fast exact top-k selection equals a full stable sort, ties included, on every code path."""

from __future__ import annotations

import math

import pytest
import torch

from mergescale.methods import selection
from mergescale.methods.selection import (
    exact_threshold,
    naive_top_k_mask,
    nonzero_bytes,
    round8,
    top_k_mask,
    top_k_thresholds_,
    zero_positions_,
)


def _magnitudes(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "continuous":
        return torch.randn(n, generator=g).abs()
    if kind == "few_values":  # massive ties everywhere
        return torch.randint(0, 5, (n,), generator=g).float()
    if kind == "bf16_deltas":  # what task vectors of bf16 checkpoints look like: many exactly equal magnitudes
        a = torch.randn(n, generator=g).mul(0.02).bfloat16().float()
        b = (a + torch.randn(n, generator=g).mul(0.002)).bfloat16().float()
        return (b - a).abs()
    if kind == "mostly_zero":
        m = torch.zeros(n)
        m[torch.randint(0, n, (n // 10,), generator=g)] = torch.rand(n // 10, generator=g)
        return m
    if kind == "zeros":
        return torch.zeros(n)
    raise ValueError(kind)


# 1000: whole-tensor path; 200_000: sampled band, one chunk; 600_000: sampled band over several chunks
@pytest.mark.parametrize("n", [1000, 200_000, 600_000])
@pytest.mark.parametrize("kind", ["continuous", "few_values", "bf16_deltas", "mostly_zero", "zeros"])
def test_top_k_mask_equals_stable_sort(n, kind):
    g = torch.Generator().manual_seed(n)
    m = _magnitudes(kind, n, g)
    for density in (0.001, 0.2, 0.5, 0.9, 0.999):
        k = max(1, int(density * n))
        expected = naive_top_k_mask(m, k)
        got = top_k_mask(m, k)
        assert torch.equal(got, expected), (kind, n, density)
        assert int(got.sum()) == k
        assert torch.equal(top_k_mask(m, k, complement=True), ~expected)


def test_band_miss_falls_back_to_exact(monkeypatch):
    # A band of zero width around a poor estimate misses almost always: the counts must catch it.
    monkeypatch.setattr(selection, "_Z", 0.0)
    monkeypatch.setattr(selection, "_SAMPLE", 16)
    g = torch.Generator().manual_seed(3)
    m = torch.randn(300_000, generator=g).abs()
    for k in (1, 17, 150_000, 299_999):
        assert torch.equal(top_k_mask(m, k), naive_top_k_mask(m, k))


def test_threshold_describes_the_top_k_and_its_sum():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-6, 7, (400_000,), generator=g).float() * 0.5  # (n,) signed, heavy ties
    base = torch.randint(-8, 8, (400_000,), generator=g).float() * 0.25  # exact in float32 arithmetic
    tau = x.clone()
    theta = x + base
    (t,), total = top_k_thresholds_(theta, [123_456], subtract=base, with_sums=True)
    assert torch.equal(theta, tau)  # the sweep computed θ − base in place
    m = tau.abs()
    keep = naive_top_k_mask(m, 123_456)
    assert t.n_greater == int((m > t.value).sum())
    assert torch.equal(t.equal_positions, (m == t.value).nonzero().squeeze(1))
    assert keep[t.kept_equal].all() and not keep[t.surplus_equal].any()
    assert math.isclose(t.top_sum, float(m[keep].sum()), rel_tol=1e-6)
    assert math.isclose(total, float(m.sum()), rel_tol=1e-6)
    assert exact_threshold(m, 123_456).value == t.value


def test_below_with_hardshrink_keeps_exactly_values_at_or_above():
    t = exact_threshold(torch.tensor([0.1, 0.3, 0.5]), 2)
    v = torch.tensor(t.value)  # float32 0.3
    just_below = torch.nextafter(v, torch.tensor(0.0))
    just_above = torch.nextafter(v, torch.tensor(1.0))
    x = torch.stack([v, -v, just_below, -just_below, just_above, torch.tensor(0.0)])
    kept = torch.hardshrink(x, t.below)
    assert torch.equal(kept != 0, torch.tensor([True, True, False, False, True, False]))


def test_zero_positions_only_touches_its_chunk():
    x = torch.arange(1.0, 21.0)
    positions = torch.tensor([0, 4, 5, 9, 10, 19])
    zero_positions_(x[5:10], 5, positions)
    expected = torch.arange(1.0, 21.0)
    expected[[5, 9]] = 0
    assert torch.equal(x, expected)


@pytest.mark.parametrize("count", [0, 1, 7, 8, 13, 1000, 4099])
@pytest.mark.parametrize("density", [0.0, 0.004, 0.3, 1.0])
def test_nonzero_bytes_equals_nonzero(count, density):
    g = torch.Generator().manual_seed(count)
    buf = torch.full((round8(count) + 16,), 7, dtype=torch.uint8)  # stale bytes beyond count must not leak
    flags = (torch.rand(count, generator=g) < density).to(torch.uint8)
    buf[:count] = flags
    assert torch.equal(nonzero_bytes(buf, count), flags.nonzero().squeeze(1))

"""Blocked merging: every blocked method gives the whole-tensor result bit for bit, whatever the blocks."""

from __future__ import annotations

import pytest
import torch

import mergescale.methods.selection as selection
from mergescale.methods import METHODS, get_method
from mergescale.methods.base import MethodInputs
from mergescale.methods.blocked import GRID, GridSum, TensorMeta, abs_sum, block_bounds, run_in_memory
from mergescale.methods.random_masks import ByteStream, bernoulli_mask, random_bytes
from mergescale.methods.selection import BlockThreshold, TopKApply, TopKSearch, naive_top_k_mask


def _inputs(k: int, shape: tuple[int, ...], seed: int, *, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-valued inputs (task vectors with many equal magnitudes, as real ones have), or small integers
    (``ties``: most magnitudes tie at every threshold)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        base = torch.randint(-3, 4, shape, generator=g).float()
        return base + torch.randint(-2, 3, (k, *shape), generator=g).float(), base
    base = torch.randn(shape, generator=g).to(torch.bfloat16).float()
    return (base + 0.01 * torch.randn((k, *shape), generator=g)).to(torch.bfloat16).float(), base


def _make(method: str, stack: torch.Tensor, base: torch.Tensor, mp: dict, params: dict) -> MethodInputs:
    k = stack.shape[0]
    return MethodInputs(
        name="model.layers.3.mlp.up_proj.weight",
        tensors=stack.clone(),
        base=base.clone(),
        model_params=[{"weight": 0.5 + 0.3 * i, **mp} for i in range(k)],
        params=dict(params),
        seed=7,
    )


CASES = [
    ("ties", {"density": 0.2}, {}),
    ("ties", {"density": 0.3}, {"rescale": True}),  # L1 sums over the grid
    ("ties", {"density": 1.0}, {}),  # dense: elect and disjoint mean only
    ("dare_ties", {"density": 0.4}, {}),  # random masks, L1 rescale
    ("dare_linear", {"density": 0.5}, {"rescale_by_density": True}),
    ("dare_linear", {"density": 0.5}, {"rescale": False}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, {}),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.3}, {"rescale": True}),
    ("della", {"density": 0.4, "epsilon": 0.1}, {}),
    ("della_linear", {"density": 0.5}, {"rescale": False}),
    ("task_arithmetic", {}, {"lambda": 0.7}),
    ("ram", {}, {"epsilon": 0.004}),
    ("ramplus_tl", {}, {"epsilon": 0.004, "r": 0.3}),
    ("nearswap", {}, {"t": 0.005}),
]
MODELS: dict[str, int] = {"nearswap": 1}  # models per case where not 3
SHAPES = [
    ((300, 70), False),  # below the sampling threshold: every entry a candidate
    ((700, 400), False),  # 280,000 entries: the sampled band, and more than one grid chunk of sums
    ((60, 50), True),  # ties at every threshold
    ((300, 300), True),
    ((513,), False),  # 1-D (della: one row, one block)
]


@pytest.mark.parametrize("shape,ties", SHAPES, ids=[f"{s}{'-ties' if t else ''}" for s, t in SHAPES])
@pytest.mark.parametrize("method,mp,params", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_tiny_blocks_give_the_whole_tensor_result_bit_for_bit(method, mp, params, shape, ties):
    stack, base = _inputs(MODELS.get(method, 3), shape, seed=len(method) + shape[0], ties=ties)
    m = get_method(method)
    whole = m(_make(method, stack, base, mp, params))
    for rows in (1, 7, 64, None):
        for lazy in (False, True):  # blocks copied out in float32, or converted piece by piece as the engine does
            if rows is None and not lazy:
                continue
            inputs = _make(method, stack, base, mp, params)
            blocked = m.blocked(TensorMeta.of(inputs))
            got = run_in_memory(blocked, inputs, rows_per_block=rows, lazy=lazy)
            assert torch.equal(got, whole), (method, shape, rows, lazy)


@pytest.mark.parametrize("method,mp,params", [c for c in CASES if c[0] in ("ties", "dare_ties", "breadcrumbs_ties")])
def test_column_ranges_of_workers_and_odd_chunks_keep_the_result(method, mp, params):
    """Blocks of about 129 rows of 1,027 columns, combined in three column ranges (as three workers do), cut neither on
    bytes of DARE's packed verdicts nor on the grid; ties at the threshold walked across the cut."""
    stack, base = _inputs(3, (600, 1027), seed=5, ties=True)
    m = get_method(method)
    whole = m(_make(method, stack, base, mp, params))
    for lazy in (False, True):
        inputs = _make(method, stack, base, mp, params)
        got = run_in_memory(m.blocked(TensorMeta.of(inputs)), inputs, rows_per_block=129, lazy=lazy, workers=3)
        assert torch.equal(got, whole), (method, lazy)


def test_the_methods_that_declare_a_blocked_form():
    """The methods that declare a blocked form (the rest keep the whole-tensor path, docs/performance.md)."""
    assert {name for name in METHODS.names() if METHODS.get(name).blocked is not None} == {
        "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
        "della_linear", "ram", "ramplus_tl", "nearswap",
    }


def test_a_band_that_misses_is_found_again_exactly(monkeypatch):
    """A sample from the first rows only, where task vectors are 100x smaller than in the rest, puts the band
    far below the true threshold: the selection misses, recovers through the coarse histogram, and stays exact,
    blocked or not."""
    monkeypatch.setattr(selection, "_sample_indices", lambda n, device, size=selection._SAMPLE: torch.arange(size) % 3000)
    stack, base = _inputs(2, (400, 300), seed=3)
    scale = torch.ones(400, 1)
    scale[10:] = 100.0
    stack = (base + (stack - base) * scale).to(torch.bfloat16).float()
    mp, params = {"density": 0.3}, {"rescale": True}
    whole = get_method("ties")(_make("ties", stack, base, mp, params))
    inputs = _make("ties", stack, base, mp, params)
    got = run_in_memory(get_method("ties").blocked(TensorMeta.of(inputs)), inputs, rows_per_block=9)
    assert torch.equal(got, whole)
    # the selection itself, against a full sort
    tau = (stack[0] - base).reshape(-1)
    k = int(0.3 * tau.numel())
    search = TopKSearch(tau.numel(), [k])
    search.take_sample(tau[search.sample_positions()])
    passes = 0
    while True:
        for s in range(0, tau.numel(), 5000):
            search.feed(tau[s : s + 5000].clone(), s)
        passes += 1
        if search.resolve():
            break
    assert passes == 3  # the band pass, the coarse histogram, the band pass on the histogram's bin
    kept = _apply(search.thresholds[0], tau)
    assert torch.equal(kept != 0, naive_top_k_mask(tau.abs(), k) & (tau != 0))


def _apply(t: BlockThreshold, x: torch.Tensor, piece: int = 333) -> torch.Tensor:
    out = x.clone()
    rule = TopKApply(t)
    for s in range(0, out.numel(), piece):
        rule.keep_(out[s : s + piece], s)
    return out


@pytest.mark.parametrize("n,density", [(1000, 0.3), (100_000, 0.05), (300_000, 0.5)])
def test_top_k_search_selects_the_top_k_in_any_pieces(n, density):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-50, 51, (n,), generator=g).float()  # many ties at the threshold
    k = int(density * n)
    want = naive_top_k_mask(x.abs(), k)
    for piece in (997, GRID, n):
        search = TopKSearch(n, [k], with_sums=True)
        positions = search.sample_positions()
        if positions is not None:
            search.take_sample(x[positions])
        for s in range(0, n, piece):
            search.feed(x[s : s + piece].clone(), s)
        assert search.resolve()
        t = search.thresholds[0]
        assert t.n_greater + min(t.quota, t.n_equal) == k
        got = _apply(t, x, piece=4099)
        assert torch.equal(got != 0, want & (x != 0)), piece
        assert t.top_sum == pytest.approx(float(x.abs()[want].sum()), rel=1e-6)


def test_grid_sums_do_not_depend_on_the_pieces():
    x = torch.randn(3 * GRID + 12345)
    want = sum(abs_sum(x[s : s + GRID]) for s in range(0, x.numel(), GRID))
    for piece in (1000, GRID - 1, GRID, 2 * GRID + 7, x.numel()):
        sums = GridSum(x.numel(), abs_sum)
        for s in range(0, x.numel(), piece):
            sums.feed(x[s : s + piece], s)
        assert sums.value == want, piece


def test_random_bytes_taken_in_pieces_are_the_same_draw():
    """DARE's mask is keyed by position: the block size cannot change which entries are dropped."""
    whole = random_bytes(1001, torch.Generator().manual_seed(5))
    stream = ByteStream(torch.Generator().manual_seed(5))
    pieces = torch.cat([stream.take(n) for n in (1, 8, 16, 7, 500, 469)])
    assert torch.equal(whole, pieces)


def test_dare_drops_the_entries_the_whole_tensor_mask_drops():
    stack, base = _inputs(2, (400, 300), seed=11)
    mp, params = {"density": 0.3}, {"rescale": False}
    inputs = _make("dare_linear", stack, base, mp, params)
    merge = get_method("dare_linear").blocked(TensorMeta.of(inputs))
    blocked = run_in_memory(merge, inputs, rows_per_block=13)
    # with weights on one model only, what survives is that model's mask
    mask = bernoulli_mask((400, 300), 0.3, TensorMeta.of(inputs).generator(0))
    solo = _make("dare_linear", stack, base, mp, params)
    solo.model_params = [{"weight": 1.0, "density": 0.3}, {"weight": 0.0, "density": 0.3}]
    one = run_in_memory(get_method("dare_linear").blocked(TensorMeta.of(solo)), solo, rows_per_block=5)
    tau = stack[0] - base
    assert torch.equal(one - base, torch.where(mask, tau, torch.zeros_like(tau)))
    assert blocked.shape == base.shape


@pytest.mark.parametrize("rows,multiple", [(10, 1), (10, 3), (10, 10), (3, 5), (0, 1)])
def test_block_bounds_cover_the_rows_in_order(rows, multiple):
    for per in (1, 2, 4, 100):
        bounds = block_bounds(rows, per, multiple)
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(a == b for (_, a), (b, _) in zip(bounds, bounds[1:], strict=False))
        assert all(a % multiple == 0 for a, _ in bounds)

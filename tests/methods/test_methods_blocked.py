"""Blocked merging: every blocked method gives the whole-tensor result bit for bit, whatever the blocks."""

from __future__ import annotations

import pytest
import torch

import mergescale.methods.selection as selection
from mergescale.errors import ConfigError
from mergescale.methods import METHODS, get_method
from mergescale.methods.base import MethodInputs
from mergescale.methods.blocked import (
    GRID,
    AbsSum,
    GridSum,
    TensorMeta,
    block_bounds,
    gram_sum,
    run_in_memory,
    step_ranges,
)
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
    ("model_stock", {}, {}),  # one angle per tensor: Gram sums over the grid
    ("model_stock", {}, {"filter_wise": True}),  # one angle per row (1-D: per tensor)
    ("slerp", {}, {"t": 0.3}),
]
MODELS: dict[str, int] = {"nearswap": 1, "slerp": 1}  # models per case where not 3
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
        "della_linear", "ram", "ramplus_tl", "nearswap", "model_stock", "slerp", "sce", "arcee_fusion",
        "nuslerp", "multislerp", "karcher",
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
    want = sum(AbsSum()(x[s : s + GRID].clone()) for s in range(0, x.numel(), GRID))
    for piece in (1000, GRID - 1, GRID, 2 * GRID + 7, x.numel()):
        sums = GridSum(x.numel(), AbsSum())
        for s in range(0, x.numel(), piece):
            sums.feed(x[s : s + piece], s)
        assert sums.value == want, piece


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "into-a-buffer"])
def test_random_bytes_taken_in_pieces_are_the_same_draw(reuse):
    """DARE's mask is keyed by position: the block size cannot change which entries are dropped (nor drawing
    into a reused buffer, whose earlier bytes are overwritten: each piece is copied out before the next)."""
    whole = random_bytes(1001, torch.Generator().manual_seed(5))
    stream = ByteStream(torch.Generator().manual_seed(5))
    buffer = torch.full((64,), -1, dtype=torch.int64) if reuse else None
    pieces = torch.cat([stream.take(n, buffer).clone() for n in (1, 8, 16, 7, 500, 469)])
    assert torch.equal(whole, pieces)


def test_dare_appends_its_undecided_entries_in_order_past_its_first_capacity():
    from mergescale.methods.sparsify import _Appender

    appender = _Appender(3)
    pos = [torch.arange(s, s + m) for s, m in ((0, 2), (5, 4), (20, 1), (30, 9))]
    val = [p.float() * 0.5 for p in pos]
    for p, v in zip(pos, val, strict=True):
        appender.append(p, v)
    assert len(appender) == 16
    got_pos, got_val = appender.take()
    assert torch.equal(got_pos, torch.cat(pos)) and torch.equal(got_val, torch.cat(val))
    assert len(appender) == 0


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


def _geometric(method: str, stack: torch.Tensor, base: torch.Tensor, params: dict) -> MethodInputs:
    return MethodInputs(name="w", tensors=stack.clone(), base=base.clone(),
                        model_params=[{} for _ in range(stack.shape[0])], params=dict(params))  # fmt: skip


def _all_blockings_equal_whole(method: str, stack: torch.Tensor, base: torch.Tensor, params: dict) -> torch.Tensor:
    m = get_method(method)
    whole = m(_geometric(method, stack, base, params))
    rows = base.shape[0] if base.dim() else 1
    for per in sorted({1, 2, 3, max(1, rows // 2)}):
        for lazy in (False, True):
            inputs = _geometric(method, stack, base, params)
            got = run_in_memory(m.blocked(TensorMeta.of(inputs)), inputs, rows_per_block=per, lazy=lazy)
            assert torch.equal(got, whole), (method, params, tuple(base.shape), per, lazy)
    return whole


def _slerp_degenerate_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    v = torch.randn(40, 9, generator=g)
    return [
        ("parallel", v, 2.0 * v),
        ("antiparallel", v, -0.5 * v),
        ("zero base", torch.zeros(40, 9), v),
        ("both zero", torch.zeros(40, 9), torch.zeros(40, 9)),
        ("1-D", v[:, 0].clone(), torch.randn(40, generator=g)),
        ("0-dim", torch.tensor(1.5), torch.tensor(-0.5)),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _slerp_degenerate_cases()])
def test_slerp_degenerate_angles_are_blocked_bit_for_bit(case):
    """(Anti)parallel tensors take the lerp, zero tensors the norm floor: the same whatever the blocks."""
    name, v0, v1 = _slerp_degenerate_cases()[case]
    t = 0.3
    whole = _all_blockings_equal_whole("slerp", v1.unsqueeze(0), v0, {"t": t})
    if name in ("parallel", "antiparallel"):
        torch.testing.assert_close(whole, (1 - t) * v0 + t * v1)  # lerp
    if name == "zero base":
        torch.testing.assert_close(whole, torch.sin(torch.tensor(t * torch.pi / 2)) * v1)  # cos Ω = 0


def _model_stock_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, float | None]]:
    """(name, models, base, the expected t or None)."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 8, generator=g)
    d = torch.randn(30, 8, generator=g)
    return [
        ("equal offsets", torch.stack([base + d, base + d, base + d]), base, 1.0),  # cos = 1 → t = 1
        ("opposite offsets", torch.stack([base + d, base - d]), base, 0.0),  # 1 + cos = 0 → the base
        ("no offsets", torch.stack([base, base]), base, 0.0),  # zero norms: the 1e-6 floor, cos = 0
        ("3-D", base.reshape(5, 6, 8) + torch.randn(3, 5, 6, 8, generator=g), base.reshape(5, 6, 8), None),
        ("1-D", base[:, 0] + torch.randn(4, 30, generator=g), base[:, 0].clone(), None),
        ("0-dim", torch.tensor([0.5, -1.0, 2.0]), torch.tensor(0.25), None),
    ]


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _model_stock_cases()])
def test_model_stock_degenerate_angles_and_shapes_are_blocked_bit_for_bit(case, filter_wise):
    name, stack, base, t = _model_stock_cases()[case]
    whole = _all_blockings_equal_whole("model_stock", stack, base, {"filter_wise": filter_wise})
    if t is not None:
        torch.testing.assert_close(whole, base + t * (stack - base).mean(dim=0))


def test_model_stock_per_row_angles_differ_from_the_tensor_angle():
    """filter_wise: one t per row, computed within a block (rows 0-1 agree, rows 2-3 oppose)."""
    base = torch.zeros(4, 3)
    a = torch.tensor([[1.0, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 3]])
    b = torch.tensor([[1.0, 0, 0], [0, 2, 0], [-1, -1, 0], [0, 0, -3]])
    got = _all_blockings_equal_whole("model_stock", torch.stack([a, b]), base, {"filter_wise": True})
    torch.testing.assert_close(got, torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 0], [0, 0, 0]]))


def test_geometric_methods_do_not_block_what_they_cannot_merge():
    """Fewer than two models (model_stock) or not exactly one (slerp), or no base: no blocked form, and the
    whole-tensor function refuses with the method and tensor named."""
    one = _geometric("model_stock", torch.ones(1, 3), torch.zeros(3), {})
    assert get_method("model_stock").blocked(TensorMeta.of(one)) is None
    with pytest.raises(ConfigError, match="model_stock: tensor 'w'"):
        get_method("model_stock")(one)
    two = _geometric("slerp", torch.ones(2, 3), torch.zeros(3), {"t": 0.5})
    assert get_method("slerp").blocked(TensorMeta.of(two)) is None
    with pytest.raises(ConfigError, match="slerp: tensor 'w'"):
        get_method("slerp")(two)
    no_base = MethodInputs(name="w", tensors=torch.ones(2, 3), base=None, model_params=[{}, {}], params={})
    assert get_method("model_stock").blocked(TensorMeta.of(no_base)) is None


def test_grid_sums_take_pieces_with_leading_dimensions():
    x = torch.randn(3, 2 * GRID + 999)
    want = [0.0] * 6
    for s in range(0, x.shape[1], GRID):
        want = [a + b for a, b in zip(want, gram_sum(x[:, s : s + GRID]), strict=True)]
    for piece in (1000, GRID + 1, x.shape[1]):
        sums = GridSum(x.shape[1], gram_sum, width=6)
        for s in range(0, x.shape[1], piece):
            sums.feed(x[:, s : s + piece], s)
        assert sums.values == want, piece


@pytest.mark.parametrize("method,params,k", [("slerp", {"t": 0.3}, 1), ("model_stock", {}, 3)])
def test_geometric_statistics_are_the_same_float64_sums_whatever_the_blocks(method, params, k):
    """The float64 sums themselves, not only the float32 result (which rounds most of their last bits away)."""
    stack, base = _inputs(k, (700, 400), seed=9)  # more than one grid chunk
    m = get_method(method)
    want = None
    for rows, lazy in ((None, False), (1, False), (7, True), (333, True)):
        inputs = _geometric(method, stack, base, params)
        merge = m.blocked(TensorMeta.of(inputs))
        run_in_memory(merge, inputs, rows_per_block=rows, lazy=lazy)
        if want is None:
            want = list(merge.sums.values)
        assert merge.sums.values == want, (rows, lazy)


@pytest.mark.parametrize("n,step,workers", [(10, 3, 2), (9, 3, 2), (1000, 7, 2), (5, 10, 2), (0, 4, 2), (100, 10, 3)])
def test_step_ranges_cut_whole_pieces_in_order(n, step, workers):
    ranges = step_ranges(n, step, workers)
    assert ranges[0][0] == 0 and ranges[-1][1] == n and len(ranges) <= workers
    assert all(a == b for (_, a), (b, _) in zip(ranges[:-1], ranges[1:], strict=True))  # contiguous, in order
    assert all(a % step == 0 for a, _ in ranges)  # every range starts a piece of the whole

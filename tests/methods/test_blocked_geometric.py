"""Blocked nuslerp, multislerp and karcher (issue #17): the blocked form gives the method's result bit for bit,
whatever the row blocks, lazy or materialized, and whatever the workers; degenerate inputs included."""

from __future__ import annotations

import pytest
import torch

import mergescale.engine.memory as memory
from mergescale.methods import get_method
from mergescale.methods.base import MethodInputs
from mergescale.methods.blocked import GRID, TensorMeta, run_in_memory


@pytest.fixture(autouse=True)
def _whole_stacks_unless_forced(monkeypatch):
    """These tests compare blocked runs with whole-stack runs: stacks are whole here unless a test forces blocks
    (by default every product that can block does, :data:`mergescale.engine.memory.WHOLE_BYTES`)."""
    monkeypatch.setattr(memory, "WHOLE_BYTES", 1 << 62)



def _inputs(k: int, shape: tuple[int, ...], seed: int, noise: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-valued base and k models near it (as real fine-tunes are)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16).float()
    return (base + noise * torch.randn((k, *shape), generator=g)).to(torch.bfloat16).float(), base


def _make(stack: torch.Tensor, base: torch.Tensor | None, mp: list[dict], params: dict) -> MethodInputs:
    return MethodInputs(
        name="model.layers.3.mlp.up_proj.weight",
        tensors=stack.clone(),
        base=base.clone() if base is not None else None,
        model_params=[dict(p) for p in mp],
        params=dict(params),
    )


def _weights(k: int) -> list[dict]:
    return [{"weight": 0.5 + 0.3 * i} for i in range(k)]


def assert_blocks_match(method: str, stack, base, mp, params, rows=(1, 7, 64, None)) -> torch.Tensor:
    """The method's function against its blocked form over ``rows``-row blocks (None: the whole tensor, lazy),
    copied out or lazy (and lazy on two workers); returns the function's result."""
    m = get_method(method)
    whole = m(_make(stack, base, mp, params))
    assert torch.isfinite(whole).all()
    runs = [(r, lazy, 1) for r in rows for lazy in (False, True) if r is not None or lazy]
    runs.append((rows[1] if len(rows) > 1 else rows[0], True, 2))  # two workers' share of the work
    for r, lazy, workers in runs:
        inputs = _make(stack, base, mp, params)
        merge = m.blocked(TensorMeta.of(inputs))
        assert merge is not None
        got = run_in_memory(merge, inputs, rows_per_block=r, lazy=lazy, workers=workers)
        assert torch.equal(got, whole), (method, tuple(stack.shape), r, lazy, workers)
    return whole


SHAPES = [(300, 70), (700, 400), (513,), (6, 5, 7)]  # (700, 400): more than one grid chunk
NUSLERP = [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("params", NUSLERP, ids=["flat", "rows", "columns"])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_nuslerp_blocks_give_the_whole_tensor_result(shape, params, with_base):
    stack, base = _inputs(2, shape, seed=shape[0])
    assert_blocks_match("nuslerp", stack, base if with_base else None, _weights(2), params)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("params", [{}, {"normalize_weights": False, "eps": 1e-6}], ids=["default", "raw-weights"])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_multislerp_blocks_give_the_whole_tensor_result(shape, k, params, with_base):
    stack, base = _inputs(k, shape, seed=k + shape[0])
    assert_blocks_match("multislerp", stack, base if with_base else None, _weights(k), params)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k,with_base", [(1, True), (2, False), (2, True), (5, False), (5, True)])
@pytest.mark.parametrize("params", [{}, {"max_iter": 50, "tol": 1e-9}, {"max_iter": 0}], ids=["default", "long", "none"])
def test_karcher_blocks_give_the_whole_tensor_result(shape, k, with_base, params):
    """The base, when given, is merged as one more input (the last)."""
    stack, base = _inputs(k, shape, seed=3 * k + shape[0], noise=1.0)
    assert_blocks_match("karcher", stack, base if with_base else None, [{}] * k, params)


def test_a_zero_dim_tensor_and_blocks_cut_inside_grid_chunks():
    """A 0-dim tensor is one row; 257 rows of 1,021 columns put grid chunk boundaries inside rows and blocks."""
    stack, base = _inputs(2, (), seed=1)
    assert_blocks_match("nuslerp", stack, base, _weights(2), {}, rows=(1, None))
    stack, base = _inputs(3, (257, 1021), seed=2)
    assert_blocks_match("multislerp", stack, base, _weights(3), {}, rows=(13, 100))
    assert_blocks_match("karcher", stack, base, [{}] * 3, {}, rows=(13, 100))
    assert_blocks_match("nuslerp", stack[:2], base, _weights(2), {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                        rows=(13, 100))  # fmt: skip


@pytest.mark.parametrize("params", NUSLERP, ids=["flat", "rows", "columns"])
def test_nuslerp_degenerate_inputs(params):
    """Zero task vectors (norms clamped, the base comes back), identical and antiparallel task vectors (the
    lerp branch), and a zero vector beside a non-zero one."""
    _, base = _inputs(2, (40, 30), seed=4)
    tau = 0.01 * torch.randn(40, 30, generator=torch.Generator().manual_seed(5))
    mp = [{"weight": 1.0}, {"weight": 3.0}]  # t = 3/4
    zero = assert_blocks_match("nuslerp", torch.stack([base, base]), base, mp, params)
    assert torch.equal(zero, base)
    same = assert_blocks_match("nuslerp", torch.stack([base + tau] * 2), base, mp, params)
    torch.testing.assert_close(same, base + tau)
    anti = assert_blocks_match("nuslerp", torch.stack([base + tau, base - tau]), base, mp, params)
    torch.testing.assert_close(anti, base - 0.5 * tau)  # (1 − t)·τ − t·τ
    assert_blocks_match("nuslerp", torch.stack([base, base + tau]), base, mp, params)


def test_multislerp_degenerate_inputs():
    """Zero task vectors: two models fall back to the weighted sum (the base), more are an error, blocked or not;
    exactly antipodal models with balancing weights fall back too; identical models give that model."""
    from mergescale.errors import ConfigError

    _, base = _inputs(2, (50, 20), seed=6)
    tau = 0.01 * torch.randn(50, 20, generator=torch.Generator().manual_seed(7))
    ones = [{"weight": 1.0}] * 3
    assert torch.equal(assert_blocks_match("multislerp", torch.stack([base, base]), base, ones[:2], {}), base)
    anti = assert_blocks_match("multislerp", torch.stack([tau, -tau]), None, ones[:2], {})
    assert torch.equal(anti, torch.zeros_like(tau))  # ½τ − ½τ
    same = assert_blocks_match("multislerp", torch.stack([base + tau] * 3), base, ones, {})
    torch.testing.assert_close(same, base + tau)
    zeros = torch.stack([base] * 3)
    with pytest.raises(ConfigError, match="mean direction of the models is zero"):
        get_method("multislerp")(_make(zeros, base, ones, {}))
    inputs = _make(zeros, base, ones, {})
    with pytest.raises(ConfigError, match="mean direction of the models is zero"):
        run_in_memory(get_method("multislerp").blocked(TensorMeta.of(inputs)), inputs, rows_per_block=7, lazy=True)


def test_karcher_degenerate_inputs():
    """Every input zero: zero; a zero input beside others: left out of the direction, counted in the scale;
    identical inputs: that input."""
    x = torch.randn(30, 17, generator=torch.Generator().manual_seed(8))
    zeros = torch.zeros(3, 30, 17)
    assert torch.equal(assert_blocks_match("karcher", zeros, None, [{}] * 3, {}), torch.zeros(30, 17))
    one_zero = assert_blocks_match("karcher", torch.stack([x, torch.zeros_like(x), x]), None, [{}] * 3, {})
    torch.testing.assert_close(one_zero, x * (2 / 3))
    same = assert_blocks_match("karcher", torch.stack([x, x]), x, [{}] * 2, {})
    torch.testing.assert_close(same, x)


def test_the_sums_run_over_the_grid_not_the_blocks():
    """A tensor of more than one grid chunk whose blocks cut chunks: per-block sums would round differently."""
    assert GRID < 700 * 400
    stack, base = _inputs(4, (700, 400), seed=9, noise=0.5)
    for method, mp in (("multislerp", _weights(4)), ("karcher", [{}] * 4)):
        assert_blocks_match(method, stack, base, mp, {}, rows=(3, 333))


@pytest.mark.parametrize("block_bytes", [1, 5000])
def test_the_engine_runs_them_over_blocks_with_the_whole_stack_result(llama_models, monkeypatch, block_bytes):
    """End to end: nuslerp (flat, per row, per column), multislerp and karcher (the base merged in) over blocks
    of mapped inputs (one-row blocks, and a few rows) on two worker threads: every floating tensor goes through
    blocks, and every output equals the merge on whole stacks bit for bit. (A --max-memory cannot force blocks
    here: the test models' tensors are below one grid chunk, so a block's statistics state costs more than the
    whole stack; the engine's budget tests cover that arithmetic.)"""
    import mergescale.engine.memory as memory
    from mergescale.api import plan_merges
    from mergescale.config import load_config
    from mergescale.engine.stream import run_plan
    from mergescale.io.writer import MemorySink

    experts = [str(llama_models[f"expert{i}"]) for i in range(3)]
    base = str(llama_models["base"])

    def config(method: str, models: list[str], weights: bool = True, **params) -> object:
        mp = [{"model": m, **({"parameters": {"weight": 0.4 + 0.3 * i}} if weights else {})}
              for i, m in enumerate(models)]  # fmt: skip
        return load_config({"merge_method": method, "base_model": base, "parameters": params, "dtype": "bfloat16",
                            "models": mp})  # fmt: skip

    configs = [config("nuslerp", experts[:2]), config("nuslerp", experts[:2], nuslerp_flatten=False),
               config("nuslerp", experts[:2], nuslerp_flatten=False, nuslerp_row_wise=True),
               config("multislerp", experts), config("karcher", experts, weights=False, max_iter=20)]  # fmt: skip

    def run():
        sinks = [MemorySink() for _ in configs]
        stats = run_plan(plan_merges(list(zip(configs, sinks, strict=True))), progress=False, workers=2)
        return [s.state_dict for s in sinks], stats

    want, whole = run()
    assert whole.blocked == 0
    monkeypatch.setattr(memory, "WHOLE_BYTES", 0)
    monkeypatch.setattr(memory, "BLOCK_BYTES", block_bytes)
    got, stats = run()
    floats = sum(1 for t in want[0].values() if t.dtype.is_floating_point)
    assert stats.blocked == len(configs) * floats
    for g, w, c in zip(got, want, configs, strict=True):
        assert g.keys() == w.keys()
        for name in w:
            assert torch.equal(g[name], w[name]), (c.merge_method, c.parameters, name)

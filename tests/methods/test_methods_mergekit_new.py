"""Peer equivalence of the methods added for mergekit 0.1.5's full set: the same tensors through mergekit's own
method objects and ours (float32, same parameters)."""

from __future__ import annotations

import pytest
import torch
from methods_helpers import make_inputs

from mergescale.methods import get_method

mergekit_methods = pytest.importorskip("mergekit.merge_methods")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

SHAPES = [(48, 40), (64,)]


def _tensors(shape, k=3, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + noise * torch.randn(shape, generator=g) for _ in range(k)]


def _mergekit(name, base, tensors, params):
    if base is None:
        group = TensorGroup.from_tensors(tensors, ids=list(range(len(tensors))))
    else:
        group = TensorGroup.from_tensors([base, *tensors], ids=["base", *range(len(tensors))], base_index=0)
    (out,) = mergekit_methods.get(name)((group,), parameters=params)
    return out


def _close(ours, theirs):
    torch.testing.assert_close(ours, theirs.to(torch.float32), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("extra", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
def test_nuslerp(shape, with_base, extra):
    base, tensors = _tensors(shape, k=2)
    w = [0.3, 0.9]
    theirs = _mergekit("nuslerp", base if with_base else None, tensors, {"weight": dict(enumerate(w)), **extra})
    ours = get_method("nuslerp")(make_inputs(tensors, base if with_base else None, [{"weight": x} for x in w], extra))
    _close(ours, theirs)


def test_nuslerp_weights_summing_to_zero_interpolate_halfway_and_colinear_inputs_lerp():
    base, (a, _) = _tensors((10, 6), k=2)
    for tensors, w in (([a, 2 * a], [1.0, 1.0]), ([a, -a + 0.1], [1.0, -1.0])):
        theirs = _mergekit("nuslerp", None, tensors, {"weight": dict(enumerate(w))})
        _close(get_method("nuslerp")(make_inputs(tensors, None, [{"weight": x} for x in w], {})), theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("extra", [{}, {"normalize_weights": False, "eps": 1e-6}])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_multislerp(shape, with_base, extra, k):
    base, tensors = _tensors(shape, k=k, seed=k)
    w = [0.5, 1.5, 0.25, 1.0][:k]
    theirs = _mergekit("multislerp", base if with_base else None, tensors, {"weight": dict(enumerate(w)), **extra})
    ours = get_method("multislerp")(make_inputs(tensors, base if with_base else None, [{"weight": x} for x in w], extra))
    _close(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [{}, {"max_iter": 50, "tol": 1e-9}, {"max_iter": 0}])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_karcher(shape, params, k):
    _, tensors = _tensors(shape, k=k, seed=3, noise=1.0)
    theirs = _mergekit("karcher", None, tensors, params)
    _close(get_method("karcher")(make_inputs(tensors, None, None, params)), theirs)


def test_karcher_merges_the_base_as_one_more_input():
    base, tensors = _tensors((12, 8), k=2, noise=1.0)
    group = TensorGroup.from_tensors([*tensors, base], ids=[0, 1, "base"], base_index=2)
    (theirs,) = mergekit_methods.get("karcher")((group,), parameters={})
    _close(get_method("karcher")(make_inputs(tensors, base, None, {})), theirs)


def test_karcher_of_zero_tensors_is_zero():
    zeros = [torch.zeros(5, 4), torch.zeros(5, 4)]
    _close(get_method("karcher")(make_inputs(zeros, None, None, {})), _mergekit("karcher", None, zeros, {}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [{}, {"select_topk": 0.3}, {"select_topk": 0.0001}, {"select_topk": 0.8, "int8_mask": True}])
def test_sce(shape, params):
    base, tensors = _tensors(shape, k=3, seed=5)
    theirs = _mergekit("sce", base, tensors, params)
    _close(get_method("sce")(make_inputs(tensors, base, None, params)), theirs)


def test_sce_tiny_task_vectors_get_uniform_weights():
    base, tensors = _tensors((20, 10), k=3, seed=6, noise=1e-4)
    _close(get_method("sce")(make_inputs(tensors, base, None, {})), _mergekit("sce", base, tensors, {}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.1, 10.0])
def test_nearswap(shape, t):
    base, tensors = _tensors(shape, k=1, seed=7)
    _close(get_method("nearswap")(make_inputs(tensors, base, [{}], {"t": t})), _mergekit("nearswap", base, tensors, {"t": t}))


@pytest.mark.parametrize("shape", [(48, 40), (64,), (7, 3), (1000, 999)])
def test_arcee_fusion(shape):
    base, tensors = _tensors(shape, k=1, seed=8, noise=0.5)
    _close(get_method("arcee_fusion")(make_inputs(tensors, base, [{}], {})), _mergekit("arcee_fusion", base, tensors, {}))


@pytest.mark.parametrize("scale", [None, 0.0, 0.5])
def test_passthrough(scale):
    _, (x,) = _tensors((6, 5), k=1)
    theirs = _mergekit("passthrough", None, [x], {"scale": {0: scale}})
    params = [{}] if scale is None else [{"scale": scale}]
    _close(get_method("passthrough")(make_inputs([x], None, params, {})), theirs)


def _sparse_updates(shape, k, seed):
    """Task vectors that each touch a random subset of entries (so RAM's unique and shared counts both occur)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tensors = [base + torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.4) for _ in range(k)]
    return base, tensors


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("params", [{}, {"epsilon": 0.5}, {"r": 0.5, "alpha": 0.9}])
def test_ram(name, params):
    if name == "ram":
        params = {k: v for k, v in params.items() if k == "epsilon"}
    base, tensors = _sparse_updates((30, 20), 3, seed=9)
    _close(get_method(name)(make_inputs(tensors, base, None, params)), _mergekit(name, base, tensors, params))


def test_ramplus_with_a_model_of_no_unique_entries():
    base, (a, b) = _sparse_updates((10, 10), 2, seed=10)
    tensors = [a, a.clone()]  # every change shared: unique counts are 0 (divided by epsilon, as mergekit)
    _close(get_method("ramplus_tl")(make_inputs(tensors, base, None, {})), _mergekit("ramplus_tl", base, tensors, {}))

"""Peer equivalence: the same tensors through mergekit 0.1.5's own method implementations and ours.

Random masks cannot be drawn alike (mergekit uses the global torch RNG), so for DARE and DELLA mergekit's
``torch.bernoulli`` is replaced, for the duration of its call, by one returning the masks our implementation
draws from the per-(seed, tensor, model) generators; for DELLA the probabilities mergekit asks for are checked
against the rank formula on the way.
"""

from __future__ import annotations

import pytest
import torch
from methods_helpers import make_inputs

from mergescale.methods import METHODS, get_method
from mergescale.methods.random_masks import bernoulli_mask

mergekit_methods = pytest.importorskip("mergekit.merge_methods")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

GTA = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
SHAPES = [(64, 48), (700, 500)]  # whole-tensor path; sampled thresholds over several chunks
WEIGHTS = [1.0, 0.5, -0.3]
DENSITIES = [0.3, 0.55, 0.8]


def _tensors(shape, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(k)]


def _mergekit(name, base, tensors, params):
    if base is None:
        group = TensorGroup.from_tensors(tensors, ids=list(range(len(tensors))))
    else:
        group = TensorGroup.from_tensors([base, *tensors], ids=["base", *range(len(tensors))], base_index=0)
    (out,) = mergekit_methods.get(name)((group,), parameters=params)
    return out


def _per_model(**values):
    return {key: dict(enumerate(v)) for key, v in values.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "large"])
@pytest.mark.parametrize("extra", [{}, {"normalize": True, "rescale": True, "lambda": 0.7}, {"normalize": False}])
@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
def test_deterministic_task_arithmetic_family(name, extra, shape):
    base, tensors = _tensors(shape)
    model = {"weight": WEIGHTS, "density": DENSITIES}
    if name.startswith("breadcrumbs"):
        model["gamma"] = [0.05, 0.01, 0.1]
    theirs = _mergekit(name, base, tensors, {**_per_model(**model), **extra})
    mp = [{key: v[i] for key, v in model.items()} for i in range(3)]
    ours = get_method(name)(make_inputs(tensors, base, mp, extra))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


class _InjectedBernoulli:
    """Stands in for torch.bernoulli inside mergekit: returns given masks in call order."""

    def __init__(self, masks, expected_probs=None):
        self.masks = list(masks)
        self.expected = list(expected_probs) if expected_probs is not None else None
        self.calls = 0

    def __call__(self, probs, *args, **kwargs):
        if self.expected is not None:
            torch.testing.assert_close(probs.float(), self.expected[self.calls].reshape(probs.shape))
        mask = self.masks[self.calls].reshape(probs.shape).to(probs.dtype)
        self.calls += 1
        return mask


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "large"])
@pytest.mark.parametrize("extra", [{}, {"normalize": True, "rescale": False, "lambda": 1.4}])
@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_dare_with_identical_masks(name, extra, shape, monkeypatch):
    base, tensors = _tensors(shape, seed=1)
    mp = [{"weight": WEIGHTS[i], "density": DENSITIES[i]} for i in range(3)]
    inputs = make_inputs(tensors, base, mp, extra, seed=42)
    masks = [bernoulli_mask(shape, DENSITIES[i], inputs.generator(i)) for i in range(3)]
    ours = get_method(name)(inputs)
    fake = _InjectedBernoulli(masks)
    monkeypatch.setattr(torch, "bernoulli", fake)
    theirs = _mergekit(name, base, tensors, {**_per_model(weight=WEIGHTS, density=DENSITIES), **extra})
    monkeypatch.undo()
    assert fake.calls == 3
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_with_identical_masks(name, monkeypatch):
    shape = (40, 30)
    base, tensors = _tensors(shape, seed=2)
    eps = [0.1, 0.2, 0.15]
    mp = [{"weight": WEIGHTS[i], "density": DENSITIES[i], "epsilon": eps[i]} for i in range(3)]
    inputs = make_inputs(tensors, base, mp, {}, seed=7)
    probs, masks = [], []
    for i, t in enumerate(tensors):
        # the rank formula, written out: rank 0…C-1 of |τ| within each row
        ranks = (t - base).abs().argsort(dim=1).argsort(dim=1).float()
        p = DENSITIES[i] - eps[i] + ranks / (shape[1] - 1) * 2 * eps[i]
        probs.append(p)
        masks.append(torch.rand(shape, generator=inputs.generator(i)) < p)
    ours = get_method(name)(inputs)
    fake = _InjectedBernoulli(masks, probs)
    monkeypatch.setattr(torch, "bernoulli", fake)
    theirs = _mergekit(name, base, tensors, _per_model(weight=WEIGHTS, density=DENSITIES, epsilon=eps))
    monkeypatch.undo()
    assert fake.calls == 3
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize):
    _, tensors = _tensors((33, 17))
    w = [0.2, 1.0, 0.7]
    theirs = _mergekit("linear", None, tensors, {"weight": dict(enumerate(w)), "normalize": normalize})
    ours = get_method("linear")(make_inputs(tensors, None, [{"weight": x} for x in w], {"normalize": normalize}))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_linear_with_the_base_among_the_models():
    base, tensors = _tensors((20, 10))
    group = TensorGroup.from_tensors([base, *tensors], ids=["base", 0, 1, 2], base_index=0)
    w = {"base": 0.5, 0: 1.0, 1: 2.0, 2: 0.25}
    (theirs,) = mergekit_methods.get("linear")((group,), parameters={"weight": w})
    mp = [{"weight": w[i]} for i in range(3)]
    ours = get_method("linear")(make_inputs(tensors, base, mp, {}, base_params={"weight": 0.5}))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(t):
    base, (other,) = _tensors((50, 20), k=1)
    theirs = _mergekit("slerp", base, [other], {"t": t})
    ours = get_method("slerp")(make_inputs([other], base, [{}], {"t": t}))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(30, 20), (50,)])
def test_model_stock(filter_wise, shape):
    base, tensors = _tensors(shape, k=4)
    theirs = _mergekit("model_stock", base, tensors, {"filter_wise": filter_wise})
    ours = get_method("model_stock")(make_inputs(tensors, base, None, {"filter_wise": filter_wise}))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


OUR_EXTENSIONS = {"rescale_by_density"}
OUR_METHODS = {"lore", "fisher", "regmean"}  # not in mergekit
# mergekit's optional-without-default parameters, and the default that means the same here
SAME_AS_ABSENT = {("passthrough", "scale"): 1.0}


@pytest.mark.parametrize("name", sorted(set(METHODS.names()) - OUR_METHODS))
def test_same_parameters_and_defaults_as_mergekit(name):
    spec = mergekit_methods.get(name).spec
    theirs = {
        p.name: SAME_AS_ABSENT.get((name, p.name), None if p.required else p.default) for p in spec.parameters
    }
    method = get_method(name)
    ours = {p.name: p.default for p in (*method.model_params, *method.global_params)}
    assert {k: v for k, v in ours.items() if k not in OUR_EXTENSIONS} == theirs
    assert (method.reference or None) == spec.reference_url


def test_every_mergekit_method_is_registered():
    assert {m.spec.name for m in mergekit_methods.registered_methods()} <= set(METHODS.names())

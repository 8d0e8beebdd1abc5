"""Parameter combinations a method cannot use are refused by the plan, for every tensor, before anything is read
or written (house item 4): a combination that only some tensors get (a filter) used to fail halfway through."""

from __future__ import annotations

import pytest

from mergescale.api import merge, plan_merges
from mergescale.config import load_config
from mergescale.errors import ConfigError
from mergescale.io.writer import MemorySink
from mergescale.methods import get_method
from mergescale.methods.base import TensorMeta


def _config(m, method, model_params, params=None):
    return load_config({
        "merge_method": method,
        "base_model": str(m["base"]),
        "models": [{"model": str(m[f"expert{i}"]), "parameters": p} for i, p in enumerate(model_params)],
        "parameters": params or {},
    })


# density 0.9 ± epsilon 0.15 leaves (0, 1) on the MLP tensors only, which stream after the attention ones
DELLA_MLP = [{"weight": 1.0, "density": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}], "epsilon": 0.15}] * 2


@pytest.mark.parametrize(
    ("method", "model_params", "params", "message"),
    [
        ("della", DELLA_MLP, None, r"della: tensor 'model\.layers\.0\.mlp\.\w+\.weight', model 0: .*epsilon=0\.15"),
        ("della_linear", DELLA_MLP, None, r"della_linear: tensor '.*mlp.*', model 0: della needs density"),
        # no consensus: the merged task vector is divided by Σw, which is zero
        ("dare_linear", [{"weight": 1.0, "density": 0.5}, {"weight": -1.0, "density": 0.5}], {"normalize": True},
         r"dare_linear: tensor '.*': weights sum to 0 with normalize: true"),
        ("breadcrumbs", [{"weight": 0.5, "density": 0.9}, {"weight": -0.5, "density": 0.9}], {"normalize": True},
         r"breadcrumbs: tensor '.*': weights sum to 0"),
    ],
)
def test_bad_combinations_are_refused_at_plan_time(llama_models, tmp_path, method, model_params, params, message):
    cfg = _config(llama_models, method, model_params, params)
    with pytest.raises(ConfigError, match=message):
        plan_merges([(cfg, MemorySink())])  # builds the plan only: no tensor is read
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        merge(cfg, out, progress=False)
    assert not out.exists()


def test_the_same_combinations_within_range_plan(llama_models):
    ok = [{"weight": 1.0, "density": [{"filter": "mlp", "value": 0.8}, {"value": 0.5}], "epsilon": 0.15}] * 2
    plan_merges([(_config(llama_models, "della", ok), MemorySink())])
    # with consensus (TIES) the divisor is the agreeing weights' sum per entry: opposite weights are allowed
    opposite = [{"weight": 1.0, "density": 0.5}, {"weight": -1.0, "density": 0.5}]
    plan_merges([(_config(llama_models, "ties", opposite, {"normalize": True}), MemorySink())])


def test_fisher_without_statistics_needs_a_weight_sum():
    check = get_method("fisher").check_params
    params = [{"weight": 1.0}, {"weight": -1.0}]
    with pytest.raises(ConfigError, match=r"fisher: tensor 'w': model weights sum to 0"):
        check(TensorMeta("w", (3,), 2, False, params, {}))
    check(TensorMeta("w", (3,), 2, False, params, {}, statistics=frozenset({"fisher"})))  # Fisher-weighted: no Σw

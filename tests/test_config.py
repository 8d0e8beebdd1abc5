import pytest
import yaml

from mergescale.config import ConditionalParameter, evaluate_setting, layer_fraction, load_config
from mergescale.errors import ConfigError


def _cfg(**over):
    cfg = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "b", "parameters": {"weight": [0.0, 1.0], "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}},
        ],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    cfg.update(over)
    return cfg


def test_mergekit_yaml_loads_and_roundtrips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg(seed=3)))
    cfg = load_config(path)
    assert cfg.merge_method == "ties" and cfg.seed == 3 and len(cfg.merged_models()) == 2
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_per_tensor_resolution_filters_and_gradients():
    from mergescale.config import model_resolver

    cfg = load_config(_cfg())
    b = model_resolver(cfg, cfg.models[1], n_layers=5)
    assert b("model.layers.0.self_attn.q_proj.weight") == {"weight": 0.0, "density": 0.3}
    assert b("model.layers.4.mlp.up_proj.weight") == {"weight": 1.0, "density": 0.7}
    assert b("model.layers.2.mlp.up_proj.weight")["weight"] == pytest.approx(0.5)
    assert b("model.embed_tokens.weight")["weight"] == 0.0  # outside the layers: t = 0, as mergekit


def test_top_level_parameters_are_model_defaults():
    from mergescale.config import model_resolver

    cfg = load_config(_cfg(models=[{"model": "a", "parameters": {"weight": 2.0}}], parameters={"density": 0.25}))
    assert model_resolver(cfg, cfg.models[0], 2)("x.weight") == {"weight": 2.0, "density": 0.25}


def test_layer_fraction():
    assert layer_fraction("model.layers.3.mlp.w", 4) == 1.0
    assert layer_fraction("transformer.h.1.attn.c_attn.weight", 3) == 0.5
    assert layer_fraction("lm_head.weight", 4) == 0.0


@pytest.mark.parametrize(
    "setting",
    [0.5, [0.0, 1.0], [0.0, 0.5, 1.0, 0.2], [{"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.3}],
     [{"filter": "attn", "value": 0.9}], True, [True, False]],
)
def test_setting_resolution_matches_mergekit(setting):
    mk = pytest.importorskip("mergekit.config")
    ours_setting = (
        [ConditionalParameter.model_validate(s) for s in setting]
        if isinstance(setting, list) and setting and isinstance(setting[0], dict) else setting
    )
    theirs_setting = (
        [mk.ConditionalParameter.model_validate(s) for s in setting]
        if isinstance(setting, list) and setting and isinstance(setting[0], dict) else setting
    )
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        for t in (0.0, 0.25, 1 / 3, 0.5, 0.9, 1.0):
            theirs = mk.evaluate_setting(name, theirs_setting, t, validate=lambda v: v)
            assert evaluate_setting(ours_setting, name, t) == pytest.approx(theirs)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"merge_methd": "ties"}, "unknown key 'merge_methd'"),
        ({"slices": []}, "'slices' and 'modules' are not supported"),
        ({"merge_method": "nope"}, "unknown merge method 'nope'; available: .*linear"),
        ({"parameters": {"normalise": True}}, r"parameters.normalise: unknown parameter for 'ties'"),
        ({"models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.0}}]}, r"models\[0\] \(a\).parameters.density: density must be > 0"),
        ({"models": [{"model": "a", "parameters": {"weight": 1.0, "density": 1.5}}]}, "density must be <= 1"),
        ({"models": [{"model": "a", "parameters": {"weight": "x"}}]}, "models.0.parameters.weight"),
        ({"dtype": "float8"}, "dtype: unknown dtype 'float8'"),
        ({"tokenizer_source": "union"}, "tokenizer_source 'union' is not supported"),
        ({"base_model": None}, "'ties' needs base_model"),
        ({"models": []}, "needs at least 1 models"),
    ],
)
def test_bad_configs_name_the_key(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_cfg(**over))


def test_linear_needs_weights_and_slerp_two_models():
    with pytest.raises(ConfigError, match=r"models\[0\] \(a\): missing required parameter 'weight'"):
        load_config({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]})
    with pytest.raises(ConfigError, match="at most 1 models"):
        load_config({"merge_method": "slerp", "base_model": "a", "models": [{"model": "b"}, {"model": "c"}],
                     "parameters": {"t": 0.5}})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_linear_with_base_needs_its_weight():
    with pytest.raises(ConfigError, match=r"base_model \(base\) is merged like the other models by 'linear' and needs 'weight'"):
        load_config({"merge_method": "linear", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": 1}}]})
    load_config({"merge_method": "linear", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": 1}}],
                 "parameters": {"weight": 0.5}})

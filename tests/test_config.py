import pytest
import yaml

from mergescale.config import (
    ConditionalParameter,
    ConfigWarning,
    evaluate_setting,
    global_resolver,
    layer_fraction,
    load_config,
)
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
        ({"merge_method": "nope"}, "unknown merge method 'nope'; available: .*linear"),
        ({"models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.0}}]}, r"models\[0\] \(a\).parameters.density: density must be > 0"),
        ({"models": [{"model": "a", "parameters": {"weight": 1.0, "density": 1.5}}]}, "density must be <= 1"),
        ({"models": [{"model": "a", "parameters": {"weight": "x"}}]}, r"models\[0\] \(a\).parameters.weight: weight must be a number, got 'x'"),
        ({"dtype": "float8"}, "dtype: unknown dtype 'float8'"),
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "give 'tokenizer_source' or 'tokenizer', not both"),
        ({"base_model": None}, "'ties' needs base_model"),
        ({"models": []}, "exactly one of 'models', 'slices' or 'modules' must be given"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "exactly one of .* \\(got models, slices\\)"),
        ({"chat_template": "chatmlx"}, "chat_template: 'chatmlx' is neither a template name"),
        ({"modules": {"vision": {"models": [{"model": "a"}]}}, "models": None}, "whose one module mergekit calls 'default'"),
    ],
)
def test_bad_configs_name_the_key(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_cfg(**over))


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"merge_methd": "ties"}, "unknown key 'merge_methd' \\(did you mean 'merge_method'\\?\\)"),
        ({"dype": "float32"}, "unknown key 'dype' \\(did you mean 'dtype'\\?\\)"),
        ({"parameters": {"normalise": True}}, r"parameters.normalise: unknown parameter for 'ties' \(did you mean 'normalize'\?\)"),
        ({"parameters": {"density": [{"pattern": "mlp", "value": 0.5}]}}, r"unknown key 'parameters.density\[0\].pattern' \(did you mean 'filter'\?\)"),
        ({"models": [{"model": "a", "parameters": {"weight": 1.0, "lambda": 0.5}}]}, "'lambda' is a global parameter of 'ties'"),
        ({"pad_to_multiple_of": 8}, "unknown key 'pad_to_multiple_of' \\(did you mean 'tokenizer.pad_to_multiple_of'\\?\\)"),
    ],
)
def test_keys_mergekit_ignores_warn_and_strict_refuses(over, message):
    cfg = _cfg(**over)
    if "merge_methd" in over:
        cfg["merge_method"] = "ties"
    with pytest.warns(ConfigWarning, match=message):
        loaded = load_config(cfg)
    assert loaded.merge_method == "ties"
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, strict=True)


def test_a_method_parameter_at_the_top_level_points_to_parameters():
    cfg = {"merge_method": "sce", "base_model": "b", "models": [{"model": "a"}], "select_topk": 0.15}
    with pytest.warns(ConfigWarning, match="top-level key 'select_topk' is not a parameter there .*'parameters.select_topk'"):
        loaded = load_config(cfg)
    assert loaded.parameters is None  # ignored, as mergekit ignores it


def test_name_chat_template_and_numeric_strings_are_accepted(recwarn):
    cfg = load_config(_cfg(name="merge-1", chat_template="chatml", parameters={"normalize": True, "lambda": "1e-1"}))
    assert cfg.name == "merge-1" and not [w for w in recwarn if issubclass(w.category, ConfigWarning)]
    params = global_resolver(cfg, 2)("model.layers.0.mlp.up_proj.weight")
    assert params["lambda"] == pytest.approx(0.1)  # YAML reads 1e-1 as a string; mergekit converts it too


def test_slices_validation():
    def slices(*sources, method="slerp", **extra):
        return {"merge_method": method, "slices": [{"sources": list(sources)}], **extra}

    a = {"model": "a", "layer_range": [0, 4]}
    b = {"model": "b", "layer_range": [2, 6]}
    cfg = load_config(slices(a, b, base_model="a", parameters={"t": [0, 1]}))
    assert [s.model for s in cfg.slice_list()[0].sources] == ["a", "b"] and cfg.referenced_models() == ["a", "b"]
    with pytest.raises(ConfigError, match=r"slices\[0\]: every source of a slice must have as many layers; got \[2, 4\]"):
        load_config(slices(a, {"model": "b", "layer_range": [0, 2]}, base_model="a", parameters={"t": 0.5}))
    with pytest.raises(ConfigError, match=r"base_model 'c' is not among the slice's sources"):
        load_config(slices(a, b, base_model="c", parameters={"t": 0.5}))
    with pytest.raises(ConfigError, match=r"slices\[0\].sources\[0\] \(a\): layer_range \[3, 3\] is empty"):
        load_config(slices({"model": "a", "layer_range": [3, 3]}, method="passthrough"))
    with pytest.raises(ConfigError, match=r"'passthrough' takes at most 1 models, got 2"):
        load_config(slices(a, b, method="passthrough"))
    with pytest.raises(ConfigError, match=r"sources\[1\] \(b\): missing required parameter 'weight'"):
        load_config(slices(a, b, method="ties", base_model="a"))
    load_config(slices(a, b, method="linear", parameters={"weight": 1.0}))  # no base role: every source merged
    modules = {"merge_method": "passthrough", "modules": {"default": {"slices": [{"sources": [a]}]}}}
    assert load_config(modules).slice_list()[0].sources[0].model == "a"


def test_data_aware_methods_need_calibration():
    cfg = {"merge_method": "regmean", "models": [{"model": "a"}, {"model": "b"}]}
    with pytest.raises(ConfigError, match="'regmean' needs calibration data"):
        load_config(cfg)
    loaded = load_config({**cfg, "calibration": {"data": {"a": "a.jsonl", "default": {"tasks": "suite", "task": "mc"}}}})
    assert loaded.calibration.source_for("a") == "a.jsonl"
    assert loaded.calibration.source_for("b").task == "mc"


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

"""Whole merges of tiny transformers models: outputs load and run, equal their formulas, match mergekit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_reference import assert_merged, method_on_stacks
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergescale.api import merge, merge_to_memory, plan_merges
from mergescale.engine.stream import run_plan
from mergescale.errors import (
    ConfigError,
    InputModelError,
    NonFiniteError,
    OutputError,
    TensorMismatchError,
)
from mergescale.io.checkpoint import iter_tensors, open_checkpoint
from mergescale.io.writer import MemorySink


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(open_checkpoint(folder)))


def cfg(method: str, models: list[Path], base: Path | None = None, params=None, model_params=None, **extra):
    """A config dict; ``model_params`` is one mapping for every model, or a list with one per model."""
    model_params = {"weight": 1.0} if model_params is None else model_params
    per_model = model_params if isinstance(model_params, list) else [model_params] * len(models)
    c = {
        "merge_method": method,
        "models": [{"model": str(m), **({"parameters": dict(p)} if p else {})}
                   for m, p in zip(models, per_model, strict=True)],
        "parameters": dict(params or {}),
    }
    if base is not None:
        c["base_model"] = str(base)
    c.update(extra)
    return c


def assert_loads_and_runs(folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape[-1] == 128 and torch.isfinite(logits).all()


def no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}.*")]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "mixtral"])
def test_linear_merge_of_each_architecture_equals_formula(model_factory, tmp_path, arch):
    m = model_factory(arch, n_experts=2)
    out = tmp_path / "out"
    merge(cfg("linear", [m["expert0"], m["expert1"]], model_params={"weight": 1.0}), out, progress=False)
    assert_loads_and_runs(out)
    a, b, got = tensors(m["expert0"]), tensors(m["expert1"]), tensors(out)
    assert got.keys() == a.keys()
    for name, t in got.items():
        torch.testing.assert_close(t, (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
    saved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert saved["merge_method"] == "linear"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_tied_embeddings_write_no_lm_head(model_factory, tmp_path):
    m = model_factory("gpt2", n_experts=2)
    base_st = tensors(m["base"])
    # a checkpoint that stores the tied head anyway must not make us write it twice
    st = load_file(m["expert1"] / "model.safetensors")
    assert "lm_head.weight" not in base_st and "lm_head.weight" not in st
    out = tmp_path / "out"
    merge(cfg("linear", [m["expert0"], m["expert1"]]), out, progress=False)
    assert "lm_head.weight" not in tensors(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_identical_models_average_to_the_model_and_dtypes_are_kept(model_factory, tmp_path, dtype):
    m = model_factory("llama", n_experts=1, dtype=dtype, shard="20KB")
    out = tmp_path / "out"
    merge(cfg("linear", [m["base"], m["base"], m["base"]], model_params={"weight": 0.7}), out,
          max_shard_size="30KB", progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    ref, got = tensors(m["base"]), tensors(out)
    for name, t in ref.items():
        assert got[name].dtype == dtype
        assert torch.equal(got[name], t), name
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).split(".")[-1]
    assert_loads_and_runs(out)


def test_output_dtype_is_cast(model_factory, tmp_path):
    m = model_factory("llama", n_experts=2)
    out = tmp_path / "out"
    merge(cfg("linear", [m["expert0"], m["expert1"]], dtype="bfloat16"), out, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in tensors(out).values())
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def per_model(**lists: list[float]) -> list[dict[str, float]]:
    """``per_model(weight=[1, 2])`` -> ``[{"weight": 1}, {"weight": 2}]``."""
    return [dict(zip(lists, values, strict=True)) for values in zip(*lists.values(), strict=True)]


# each model its own parameters, so a model paired with another's parameters shows
METHOD_CASES = {
    "task_arithmetic": (per_model(weight=[0.6, 1.0, 0.3]), {"lambda": 0.8}),
    "ties": (per_model(weight=[1.0, 0.5, 0.8], density=[0.3, 0.5, 0.2]), {}),
    "dare_linear": (per_model(weight=[0.5, 0.7, 0.2], density=[0.6, 0.5, 0.8]), {}),
    "dare_ties": (per_model(weight=[1.0, 0.5, 0.8], density=[0.6, 0.4, 0.7]), {}),
    "breadcrumbs": (per_model(weight=[1.0, 0.5, 0.8], density=[0.8, 0.7, 0.9], gamma=[0.05, 0.1, 0.02]), {}),
    "model_stock": ({}, {}),
}


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_each_method_merges_a_real_model(llama_models, tmp_path, method):
    """The whole merge (config, plan, streamed engine, sink) equals the method on the stacked tensors: the
    models in config order, each with its own parameters, the base, the seed."""
    model_params, params = METHOD_CASES[method]
    experts = [llama_models["expert0"], llama_models["expert1"], llama_models["expert2"]]
    out = tmp_path / "out"
    merge(cfg(method, experts, base=llama_models["base"], params=params, model_params=model_params, seed=5),
          out, progress=False)
    assert_loads_and_runs(out)
    assert_merged(out, method_on_stacks(method, experts, llama_models["base"], model_params, params, seed=5))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_merges_two_models(llama_models, tmp_path, t):
    out = tmp_path / "out"
    c = cfg("slerp", [llama_models["expert0"]], base=llama_models["base"], params={"t": t}, model_params={})
    merge(c, out, progress=False)
    assert_loads_and_runs(out)
    expected = method_on_stacks("slerp", [llama_models["expert0"]], llama_models["base"], params={"t": t})
    assert_merged(out, expected)
    # t = 0 gives the base and t = 1 the other model: the reference is not the output read back
    ends = {0.0: llama_models["base"], 1.0: llama_models["expert0"]}
    if t in ends:
        assert_merged(out, tensors(ends[t]))


def test_dare_is_reproducible_from_seed_only(llama_models, tmp_path):
    experts = [llama_models["expert0"], llama_models["expert1"]]
    c = cfg("dare_ties", experts, base=llama_models["base"], model_params={"weight": 1.0, "density": 0.5}, seed=7)
    one = merge_to_memory(c).state_dict
    two = merge_to_memory(c).state_dict
    other = merge_to_memory({**c, "seed": 8}).state_dict
    for name in one:
        assert torch.equal(one[name], two[name])
    assert any(not torch.equal(one[n], other[n]) for n in one if one[n].dim() > 1)


def test_one_read_feeds_several_merges(llama_models):
    experts = [llama_models["expert0"], llama_models["expert1"], llama_models["expert2"]]
    configs = [
        cfg("linear", experts[:2]),
        cfg("ties", experts, base=llama_models["base"], model_params={"weight": 1.0, "density": 0.5}),
        cfg("task_arithmetic", experts[1:], base=llama_models["base"], params={"lambda": 0.5}),
    ]
    from mergescale.config import load_config

    sinks = [MemorySink() for _ in configs]
    plan = plan_merges([(load_config(c), s) for c, s in zip(configs, sinks, strict=True)])
    assert len(plan.sources) == 4  # each model opened once
    stats = run_plan(plan, progress=False)
    single_read = sum(t.numel() * t.element_size() for m in (*experts, llama_models["base"]) for t in tensors(m).values())
    assert stats.bytes_read == single_read
    for c, sink in zip(configs, sinks, strict=True):
        separate = merge_to_memory(c).state_dict
        for name, t in separate.items():
            assert torch.equal(sink.state_dict[name], t), name


def test_merge_to_memory_equals_folder(llama_models, tmp_path):
    c = cfg("ties", [llama_models["expert0"], llama_models["expert1"]], base=llama_models["base"],
            model_params={"weight": 1.0, "density": 0.4})
    merge(c, tmp_path / "out", progress=False)
    mem = merge_to_memory(c).state_dict
    for name, t in tensors(tmp_path / "out").items():
        assert torch.equal(mem[name], t)


def test_bin_inputs_merge(model_factory, tmp_path):
    m = model_factory("llama", n_experts=2)
    binned = []
    for key in ("expert0", "expert1"):
        d = tmp_path / key
        d.mkdir()
        torch.save(load_file(m[key] / "model.safetensors"), d / "pytorch_model.bin")
        (d / "config.json").write_text((m[key] / "config.json").read_text())
        binned.append(d)
    merge(cfg("linear", binned), tmp_path / "out", progress=False)
    merge(cfg("linear", [m["expert0"], m["expert1"]]), tmp_path / "ref", progress=False)
    ref = tensors(tmp_path / "ref")
    for name, t in tensors(tmp_path / "out").items():
        assert torch.equal(t, ref[name])


# --------------------------------------------------------------------------------------------- bad input


def _copy_model(src: Path, dst: Path, edit=None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if edit is not None:
        st = load_file(dst / "model.safetensors")
        edit(st)
        save_file(st, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture()
def good(llama_models):
    return llama_models


def test_different_architectures(model_factory, good, tmp_path):
    other = model_factory("qwen2", n_experts=1)["base"]
    out = tmp_path / "out"
    with pytest.raises(InputModelError, match=r"is qwen2/Qwen2ForCausalLM but .* is llama/LlamaForCausalLM"):
        merge(cfg("task_arithmetic", [good["expert0"], other], base=good["base"]), out, progress=False)
    no_leftovers(out)


def test_shape_mismatch_names_model_and_tensor(good, tmp_path):
    def grow(st):
        st["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)

    bad = _copy_model(good["expert1"], tmp_path / "bad", grow)
    out = tmp_path / "out"
    with pytest.raises(TensorMismatchError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(65, 32\) in model '.*bad'"):
        merge(cfg("linear", [good["expert0"], bad]), out, progress=False)
    no_leftovers(out)


def test_missing_tensor_names_model_and_tensor(good, tmp_path):
    bad = _copy_model(good["expert1"], tmp_path / "bad", lambda st: st.pop("model.norm.weight"))
    out = tmp_path / "out"
    with pytest.raises(TensorMismatchError, match=r"model '.*bad' is missing tensor 'model.norm.weight'"):
        merge(cfg("ties", [good["expert0"], bad], base=good["base"], model_params={"weight": 1, "density": 0.5}),
              out, progress=False)
    no_leftovers(out)


def test_corrupt_and_truncated_inputs(good, tmp_path):
    corrupt = _copy_model(good["expert1"], tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"garbage" * 10)
    out = tmp_path / "out"
    with pytest.raises(InputModelError, match=r"corrupt/model.safetensors: not a valid safetensors file"):
        merge(cfg("linear", [good["expert0"], corrupt]), out, progress=False)
    no_leftovers(out)
    trunc = _copy_model(good["expert1"], tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputModelError, match=r"trunc/model.safetensors"):
        merge(cfg("linear", [good["expert0"], trunc]), out, progress=False)
    no_leftovers(out)


def test_nan_input_is_refused_unless_allowed(good, tmp_path):
    def poison(st):
        st["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")

    bad = _copy_model(good["expert1"], tmp_path / "nan", poison)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"model '.*nan': tensor 'model.layers.1.self_attn.v_proj.weight' contains NaN") as raised:
        merge(cfg("linear", [good["expert0"], bad]), out, progress=False)
    # the fact travels as a field; the remedy is the caller's to word (the CLI names its flag, PMA refuses)
    assert raised.value.in_input and "--allow-nonfinite" not in str(raised.value)
    no_leftovers(out)
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(cfg("linear", [good["expert0"], bad])))
    err = subprocess.run([sys.executable, "-m", "mergescale", "merge", str(config), str(out), "-q"],
                         capture_output=True, text=True)  # fmt: skip
    assert err.returncode != 0 and "Traceback" not in err.stderr
    assert "contains NaN values (pass --allow-nonfinite to merge anyway)" in err.stderr
    no_leftovers(out)
    merge(cfg("linear", [good["expert0"], bad]), out, progress=False, allow_nonfinite=True)
    assert out.is_dir()


def test_missing_model_path(good, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputModelError, match="model path .*nowhere does not exist"):
        merge(cfg("linear", [good["expert0"], tmp_path / "nowhere"]), out, progress=False)
    no_leftovers(out)


def test_weights_summing_to_zero(good, tmp_path):
    c = cfg("linear", [good["expert0"], good["expert1"]])
    c["models"][0]["parameters"]["weight"] = 1.0
    c["models"][1]["parameters"]["weight"] = -1.0
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"linear: tensor '[\w.]+': weights sum to 0"):
        merge(c, out, progress=False)
    no_leftovers(out)


def test_density_out_of_range(good, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="density must be"):
        merge(cfg("ties", [good["expert0"]], base=good["base"], model_params={"weight": 1.0, "density": 1.2}),
              out, progress=False)
    no_leftovers(out)


def test_non_empty_output_needs_overwrite(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        merge(cfg("linear", [good["expert0"], good["expert1"]]), out, progress=False)
    assert (out / "keep.txt").is_file()
    merge(cfg("linear", [good["expert0"], good["expert1"]]), out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_interrupt_mid_merge_leaves_nothing(good, tmp_path, monkeypatch):
    from mergescale.io import writer

    calls = {"n": 0}
    real = writer.ShardedSafetensorsWriter.write

    def flaky(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, name, tensor)

    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "write", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge(cfg("linear", [good["expert0"], good["expert1"]]), out, progress=False)
    no_leftovers(out)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_merge_and_one_line_error(good, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg("linear", [good["expert0"], good["expert1"]])))
    ok = subprocess.run([sys.executable, "-m", "mergescale", "merge", str(config), str(tmp_path / "out"), "-q"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "merged" in ok.stdout and (tmp_path / "out" / "config.json").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg("linear", [good["expert0"]]), "merge_method": "avg"}))
    err = subprocess.run([sys.executable, "-m", "mergescale", "merge", str(bad), str(tmp_path / "out2")],
                         capture_output=True, text=True)
    assert err.returncode == 1
    assert "unknown merge method 'avg'" in err.stderr and "Traceback" not in err.stderr
    assert len(err.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()


def test_cli_warns_about_ignored_keys_and_strict_refuses_them(good, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**cfg("linear", [good["expert0"], good["expert1"]]), "dype": "float16"}))
    ok = subprocess.run([sys.executable, "-m", "mergescale", "merge", str(config), str(tmp_path / "out"), "-q"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "warning:" in ok.stderr and "unknown key 'dype' (did you mean 'dtype'?)" in ok.stderr
    assert "Traceback" not in ok.stderr and "ConfigWarning" not in ok.stderr
    strict = subprocess.run([sys.executable, "-m", "mergescale", "merge", str(config), str(tmp_path / "out2"),
                             "--strict"], capture_output=True, text=True)
    assert strict.returncode == 1 and len(strict.stderr.strip().splitlines()) == 1
    assert "unknown key 'dype' (did you mean 'dtype'?)" in strict.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_cuda_merge_equals_cpu(llama_models, method):
    experts = [llama_models["expert0"], llama_models["expert1"]]
    c = cfg(method, experts, base=llama_models["base"], model_params={"weight": 1.0, "density": 0.5},
            seed=3) if method != "linear" else cfg("linear", experts)
    cpu = merge_to_memory(c, device="cpu").state_dict
    gpu = merge_to_memory(c, device="cuda").state_dict
    for name, t in cpu.items():
        torch.testing.assert_close(gpu[name].cpu(), t, rtol=1e-5, atol=1e-6)

"""Calibration (statistics of data-aware merges) and the merges that read them like tensors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from merge_reference import assert_merged, method_on_stacks

from mergescale.api import merge, merge_to_memory, plan_merges
from mergescale.calibration import (
    Example,
    StatisticsCheckpoint,
    calibrate,
    compute_fisher,
    compute_grams,
    load_examples,
    statistics_path,
)
from mergescale.config import CalibrationSettings, TaskData, load_config
from mergescale.errors import ConfigError
from mergescale.io.checkpoint import open_checkpoint
from mergescale.io.writer import MemorySink
from mergescale.methods.regmean import regmean_solve


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(100)}" for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two tasks in our format (multiple choice; text), a suite holding both, and loose JSONL / text files."""
    root = tmp_path_factory.mktemp("calib-tasks")
    rng = random.Random(0)
    for name, kind in (("mc", "multiple_choice"), ("lm", "perplexity")):
        folder = root / name
        folder.mkdir()
        for split, n in (("train", 12), ("test", 4)):
            if kind == "multiple_choice":
                rows = [{"context": _words(rng, 5), "choices": [_words(rng, 2), _words(rng, 2)], "gold": rng.randrange(2)}
                        for _ in range(n)]
            else:
                rows = [{"text": _words(rng, 9)} for _ in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {"name": name, "kind": kind, "data": {"train": "train.jsonl", "test": "test.jsonl"}}
        (folder / "task.yaml").write_text(yaml.safe_dump(spec))
    (root / "suite.yaml").write_text(yaml.safe_dump({"name": "s", "held_in": ["mc/task.yaml"], "held_out": ["lm/task.yaml"]}))
    (root / "texts.txt").write_text("\n".join(_words(rng, 7) for _ in range(5)) + "\n\n")
    return root


def test_examples_from_each_source(task_dir):
    settings = CalibrationSettings(data="unused", examples=100)
    mc = load_examples(str(task_dir / "mc" / "task.yaml"), settings)
    assert len(mc) == 12 and all(e.answer.startswith(" ") and e.context for e in mc)  # delimiter + gold choice
    assert len(load_examples(TaskData(tasks=str(task_dir / "suite.yaml"), task="lm"), settings)) == 12
    assert [e.context for e in load_examples(str(task_dir / "texts.txt"), settings)] == [""] * 5
    assert len(load_examples(str(task_dir / "mc" / "train.jsonl"), settings)) == 12
    few = load_examples(str(task_dir / "mc" / "task.yaml"), CalibrationSettings(data="x", examples=5, seed=1))
    assert len(few) == 5 and few == load_examples(str(task_dir / "mc" / "task.yaml"),
                                                    CalibrationSettings(data="x", examples=5, seed=1))
    with pytest.raises(ConfigError, match="holds 2 tasks; write"):
        load_examples(str(task_dir), settings)
    with pytest.raises(ConfigError, match="has no validation split"):
        load_examples(str(task_dir / "mc" / "task.yaml"), CalibrationSettings(data="x", split="validation"))


def _model(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def test_gram_matrices_are_the_inputs_of_each_linear_layer(llama_models):
    model, tok = _model(llama_models["expert0"])
    examples = [Example("", "w1 w2 w3 w4"), Example("w5 w6", " w7"), Example("", "w8 w9 w10 w11 w12 w13")]
    grams, aliases = compute_grams(model, tok, examples, max_length=64, batch_size=2)
    # the same inputs captured independently, one example at a time (no padding at all)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ex in examples:
            ids = tok(ex.context + ex.answer, return_tensors="pt")["input_ids"]
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert aliases["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert aliases["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    for name, xs in seen.items():
        x = torch.cat(xs)
        stored = aliases.get(f"{name}.weight", f"{name}.weight")
        torch.testing.assert_close(grams[stored], x.T @ x, atol=1e-4, rtol=1e-4, msg=name)


def test_fisher_is_the_mean_squared_gradient_of_each_examples_answer(llama_models):
    model, tok = _model(llama_models["expert1"])
    examples = [Example("w1 w2 w3", " w4 w5"), Example("", "w6 w7 w8 w9")]
    fisher = compute_fisher(model, tok, examples, max_length=64)
    # independently: transformers' own loss with the context masked out (-100), times the answer's length
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for ex in examples:
        ctx = tok(ex.context)["input_ids"] if ex.context else []
        ids = torch.tensor([ctx + tok(ex.answer, add_special_tokens=not ex.context)["input_ids"]])
        labels = ids.clone()
        labels[0, : max(len(ctx), 1)] = -100
        model.zero_grad()
        out = model(input_ids=ids, labels=labels)
        (out.loss * int((labels[0, 1:] != -100).sum())).backward()
        for n, p in params.items():
            expected[n] += p.grad.square() / len(examples)
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n], atol=1e-7, rtol=1e-4, msg=n)


def _regmean_config(models, task_dir, **extra):
    return {
        "merge_method": "regmean",
        "models": [{"model": str(models["expert0"])}, {"model": str(models["expert1"])}],
        "parameters": {"alpha": 0.8},
        "calibration": {"data": {str(models["expert0"]): str(task_dir / "mc" / "task.yaml"),
                                 "default": {"tasks": str(task_dir / "suite.yaml"), "task": "lm"}},
                        "examples": 6, "batch_size": 4, **extra},
        "dtype": "float32",
    }


def test_statistics_are_found_from_the_config_alone_and_read_like_tensors(llama_models, task_dir, tmp_path):
    cfg = load_config(_regmean_config(llama_models, task_dir, statistics_dir=str(tmp_path / "stats")))
    with pytest.raises(ConfigError, match=r"no gram statistics for model .*mergescale calibrate CONFIG"):
        plan_merges([(cfg, MemorySink())])
    paths = calibrate(cfg, progress=False)
    gram0 = paths[str(llama_models["expert0"])]["gram"]
    assert gram0 == statistics_path(cfg, str(llama_models["expert0"]), "gram") and gram0.is_file()
    assert gram0.parent.parent == tmp_path / "stats" and not list(gram0.parent.glob(".*tmp*"))
    mtime = gram0.stat().st_mtime_ns
    calibrate(cfg, progress=False)  # present: not recomputed
    assert gram0.stat().st_mtime_ns == mtime
    # the merge through the engine (one plan, statistics as extra sources) = the formula on the stored Gram matrices
    merged = merge_to_memory(cfg).state_dict
    name = "model.layers.1.self_attn.v_proj.weight"  # an alias of q_proj's input
    stats = [StatisticsCheckpoint(p["gram"]) for p in paths.values()]
    weights = [open_checkpoint(llama_models[e]).read(name) for e in ("expert0", "expert1")]
    expected = regmean_solve(torch.stack(weights), torch.stack([s.read(name) for s in stats]), 0.8)
    torch.testing.assert_close(merged[name], expected)
    emb = "model.embed_tokens.weight"  # no Gram matrix: the average
    torch.testing.assert_close(merged[emb], sum(open_checkpoint(llama_models[e]).read(emb) for e in ("expert0", "expert1")) / 2)


def test_other_settings_are_other_statistics(llama_models, task_dir):
    a = load_config(_regmean_config(llama_models, task_dir))
    b = load_config(_regmean_config(llama_models, task_dir, examples=7))
    m = str(llama_models["expert0"])
    pa, pb = statistics_path(a, m, "gram"), statistics_path(b, m, "gram")
    assert pa != pb and pa.parent == llama_models["expert0"] / "mergescale_statistics"


def test_merge_calibrates_first_then_merges(llama_models, task_dir, tmp_path):
    cfg = {
        "merge_method": "fisher",
        "models": [{"model": str(llama_models["expert1"]), "parameters": {"weight": 1.0}},
                   {"model": str(llama_models["expert2"]), "parameters": {"weight": 2.0}}],
        "calibration": {"data": str(task_dir / "mc" / "task.yaml"), "examples": 4,
                        "statistics_dir": str(tmp_path / "stats")},
    }
    merge(cfg, tmp_path / "out", progress=False)
    assert len(list((tmp_path / "stats").rglob("fisher-*.safetensors"))) == 2
    # the merge equals fisher on the stacked weights and the statistics it computed (read back like tensors)
    experts = [llama_models["expert1"], llama_models["expert2"]]
    stats = []
    for model in experts:
        source = StatisticsCheckpoint(statistics_path(load_config(cfg), str(model), "fisher"))
        stats.append({name: source.read(name) for name in source.info()})
        source.close()
    assert stats[0]  # statistics for some tensors, so they take part
    model_params = [{"weight": 1.0}, {"weight": 2.0}]
    assert_merged(tmp_path / "out", method_on_stacks("fisher", experts, None, model_params, statistics={"fisher": stats}))

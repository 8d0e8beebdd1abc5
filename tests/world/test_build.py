"""The build pipeline on the micro preset: layout, caching, changed stages, interrupted stages, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mergescale.cli import app
from mergescale.errors import ConfigError, OutputError
from mergescale.world import train
from mergescale.world.build import BuildResult, build_world, plan
from mergescale.world.layout import WorldLayout
from mergescale.world.presets import MICRO
from mergescale.world.tasks import HELD_IN, HELD_OUT

pytestmark = pytest.mark.slow  # the session's micro build takes ~20 s on 2 cores


def _copy(result: BuildResult, tmp_path: Path) -> Path:
    dst = tmp_path / "world"
    shutil.copytree(result.root, dst, symlinks=True)
    return dst


def test_layout_is_complete_and_loadable(micro_build: BuildResult) -> None:
    lay = WorldLayout(micro_build.root)
    assert lay.suite.is_file() and lay.pretrain_val.is_file()
    folders = []
    for size in MICRO.sizes:
        run = lay.run(size.name)
        ckpts = sorted(run.glob("checkpoint-*"))
        assert len(ckpts) == MICRO.stable_checkpoints
        for ckpt in ckpts:  # Trainer layout with the tokenizer saved in each checkpoint
            assert (ckpt / "trainer_state.json").is_file() and (ckpt / "tokenizer.json").is_file()
        folders += [lay.annealed(size.name)]
        for kind in ("pt", "it"):
            folders += [lay.base(size.name, kind), lay.multitask(size.name, kind)]
            folders += [lay.expert(size.name, kind, t) for t in HELD_IN]
    for folder in folders:
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), folder
        assert not (folder / "_trainer").exists()
    for folder in (folders[0], folders[-1]):  # ordinary Hugging Face folders
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size == len(tok)
    assert not list(micro_build.root.rglob("*.tmp-*"))


def test_scores_and_world_json(micro_build: BuildResult) -> None:
    scores = json.loads((micro_build.root / "scores.json").read_text())
    world = json.loads((micro_build.root / "world.json").read_text())
    n_models = len(MICRO.sizes) * 2 * (2 + len(HELD_IN))
    assert len(scores["models"]) == n_models
    for entry in scores["models"].values():
        assert set(entry["scores"]) >= set(HELD_IN) | set(HELD_OUT)
        assert (micro_build.root / entry["path"] / "config.json").is_file()
        if entry["role"] == "base":
            assert entry["scores"]["pretrain_val"]["loss"] > 0
    for size in MICRO.sizes:
        pre = scores["pretrain"][size.name]
        assert len(pre["checkpoints"]) == MICRO.stable_checkpoints
        assert pre["sma"]["window"] == MICRO.pretrain.pma_window
    assert world["seed"] == 0 and world["preset"] == "micro"
    assert all(v["parameters"] > 0 for v in world["sizes"].values())
    assert "world" in world["stages"] and world["mergescale_version"]
    expert = world["stages"]["expert/s/pt/topic"]  # selected on validation: the step it kept is recorded
    assert expert["best_step"] <= expert["steps"] == MICRO.expert.steps


def test_rerun_with_nothing_changed_skips_every_stage(micro_build: BuildResult) -> None:
    again = build_world(micro_build.root, "micro", seed=0, workers=1)
    assert again.ran == []
    assert sorted(again.skipped) == sorted(micro_build.ran)
    assert again.scores["models"] == micro_build.scores["models"]


def test_a_changed_stage_reruns_itself_and_its_dependents_only(
    micro_build: BuildResult, tmp_path: Path
) -> None:
    root = _copy(micro_build, tmp_path)
    changed = MICRO.model_copy(update={"multitask": MICRO.multitask.model_copy(update={"steps": 3})})
    result = build_world(root, changed, seed=0, workers=2)  # the process pool's path, on 8 stages
    expected = {
        name
        for s in MICRO.sizes
        for k in ("pt", "it")
        for name in (f"multitask/{s.name}/{k}", f"eval/{s.name}/{k}/multitask")
    }
    assert set(result.ran) == expected
    assert len(result.skipped) == len(micro_build.ran) - len(expected)


def test_an_interrupted_stage_is_redone_not_trusted(
    micro_build: BuildResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(micro_build, tmp_path)
    lay = WorldLayout(root)
    victim = lay.expert("s", "it", "topic")
    shutil.rmtree(victim)
    (root / ".stages" / "expert__s__it__topic.json").unlink()  # as if the stage had never finished
    real = train.finetune

    def killed(base, tokenizer, data, settings, out, **kw):
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"half-written")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "finetune", killed)
    with pytest.raises(KeyboardInterrupt):
        build_world(root, "micro", seed=0, workers=1)
    assert not victim.exists()  # no half-written model where a model belongs
    assert not (root / ".stages" / "expert__s__it__topic.json").exists()
    (victim.parent / f".{victim.name}.tmp-99999").mkdir()  # debris of a killed process
    monkeypatch.setattr(train, "finetune", real)
    result = build_world(root, "micro", seed=0, workers=1)
    assert result.ran == ["expert/s/it/topic"]  # same inputs, same key: its cached evaluation still applies
    AutoModelForCausalLM.from_pretrained(victim)
    assert not list(victim.parent.glob(".*tmp-*"))


def test_a_record_without_its_output_is_not_trusted(micro_build: BuildResult, tmp_path: Path) -> None:
    root = _copy(micro_build, tmp_path)
    shutil.rmtree(WorldLayout(root).multitask("xs", "pt"))
    result = build_world(root, "micro", seed=0, workers=1)
    assert result.ran == ["multitask/xs/pt"]  # same key: its cached evaluation still applies


def test_build_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        build_world(tmp_path, "micro")
    with pytest.raises(ConfigError, match="available: micro, quick, full"):
        build_world(tmp_path / "new", "huge")


def test_cli_show_and_errors(micro_build: BuildResult, tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["world", "show", str(micro_build.root)])
    assert shown.exit_code == 0, shown.output
    assert "quality checks" in shown.output and "xs / pt" in shown.output
    missing = runner.invoke(app, ["world", "show", str(tmp_path)])
    assert isinstance(missing.exception, OutputError)
    built = runner.invoke(
        app, ["world", "build", "-o", str(micro_build.root), "--preset", "micro", "-q", "--workers", "1"]
    )
    assert built.exit_code == 0, built.output
    n_stages = len(plan(micro_build.root, MICRO, 0))  # every stage of the plan, each cached
    assert f"0 stages ran, {n_stages} cached" in " ".join(built.output.split())


def _changed_keys(preset_a, preset_b, tmp_path: Path) -> set[str]:
    a, b = plan(tmp_path, preset_a, 0), plan(tmp_path, preset_b, 0)
    assert a.keys() == b.keys()
    return {name for name in a if a[name].key != b[name].key}


def test_keys_change_downstream_of_a_setting_only(tmp_path: Path) -> None:
    """The plan alone (nothing runs): each setting reaches exactly the stages that read it, and what follows."""
    anneal = MICRO.model_copy(update={"pretrain": MICRO.pretrain.model_copy(update={"anneal_steps": 3})})
    changed = _changed_keys(MICRO, anneal, tmp_path)
    assert not any(n == "world" or n.startswith("pretrain/") for n in changed)
    assert {"anneal/xs", "instruct/s", "expert/s/it/topic", "eval/xs/pt/base", "pretrain-checks/s"} <= changed
    experts = MICRO.model_copy(update={"expert": MICRO.expert.model_copy(update={"lr": 2e-3})})
    changed = _changed_keys(MICRO, experts, tmp_path)
    n_experts = len(MICRO.sizes) * 2 * len(HELD_IN)
    assert len(changed) == 2 * n_experts  # each expert and its evaluation
    assert all(n.startswith("expert/") or "/experts/" in n for n in changed)
    assert _changed_keys(MICRO, MICRO, tmp_path) == set()
    assert len(
        _changed_keys(
            MICRO,
            MICRO.model_copy(update={"data": MICRO.data.model_copy(update={"instruct_rows": 41})}),
            tmp_path,
        )
    ) == len(plan(tmp_path, MICRO, 0))  # the world feeds everything

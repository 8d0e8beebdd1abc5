"""Finding and ordering the checkpoints of a run, and reading its loss log."""

from __future__ import annotations

import json

import pytest
import torch
from pma_helpers import STEPS, TOKENS_PER_STEP

from mergescale.errors import ConfigError, InputModelError
from mergescale.io.discover import (
    checkpoints_from_paths,
    discover_run,
    read_loss_log,
    step_from_name,
)


def test_step_names():
    assert step_from_name("checkpoint-100") == 100
    assert step_from_name("step_7") == 7 and step_from_name("step-7") == 7 and step_from_name("step7") == 7
    assert step_from_name("iter_0000300") == 300 and step_from_name("global_step42") == 42
    assert step_from_name("pma-100") is None and step_from_name("checkpoint-final") is None


def test_hf_trainer_layout_with_tokens_and_loss_log(run_factory):
    losses = {s: 3.0 - s / 1000 for s in range(10, 610, 10)}
    run = run_factory("hf", losses=losses)
    (run / "pma-600").mkdir()  # our own output folders are not checkpoints
    info = discover_run(run)
    assert info.steps == list(STEPS)
    assert [c.tokens for c in info.checkpoints] == [s * TOKENS_PER_STEP for s in STEPS]
    assert all(c.kind == "hf" and c.path == run / f"checkpoint-{c.step}" for c in info.checkpoints)
    # the newest trainer_state.json holds the whole log
    assert info.loss_log_source == run / "checkpoint-600" / "trainer_state.json"
    assert [p.step for p in info.loss_log] == sorted(losses)
    assert info.loss_log[0].loss == pytest.approx(losses[10])


def test_step_named_folders_are_ordered_by_step(run_factory):
    run = run_factory("named")
    info = discover_run(run)
    assert info.steps == list(STEPS)
    assert [c.name for c in info.checkpoints][:4] == ["step_100", "step200", "iter_0000300", "global_step400"]


def test_tokens_unknown_unless_tokens_per_step(run_factory):
    run = run_factory("hf", tokens=False)
    assert [c.tokens for c in discover_run(run).checkpoints] == [None] * len(STEPS)
    assert [c.tokens for c in discover_run(run, tokens_per_step=10).checkpoints] == [s * 10 for s in STEPS]


def test_nested_checkpoints_folder_and_olmo_core_layout(tmp_path):
    import torch.distributed.checkpoint as dcp

    for step in (10, 20):
        dcp.save(
            {"model": {"w": torch.full((2,), float(step))}, "optim": {"m": torch.zeros(2)}},
            checkpoint_id=str(tmp_path / "checkpoints" / f"step{step}" / "model_and_optim"),
            no_dist=True,
        )
    info = discover_run(tmp_path)
    assert info.steps == [10, 20]
    assert info.checkpoints[0].kind == "dcp"
    assert info.checkpoints[0].path == tmp_path / "checkpoints" / "step10" / "model_and_optim"
    assert info.checkpoints[0].folder == tmp_path / "checkpoints" / "step10"


def test_empty_run_single_model_and_duplicate_steps(tmp_path, hf_run):
    with pytest.raises(InputModelError, match="no checkpoints found in .*looked for checkpoint-<step>/"):
        discover_run(tmp_path)
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(InputModelError, match=r"skipped checkpoint-5 \(no model weights"):
        discover_run(tmp_path)
    with pytest.raises(InputModelError, match="is a single model folder, not a run"):
        discover_run(hf_run / "checkpoint-100")
    with pytest.raises(InputModelError, match="does not exist"):
        discover_run(tmp_path / "nope")
    dup = tmp_path / "dup"
    for name in ("checkpoint-100", "step_100"):
        (dup / name).mkdir(parents=True)
        (dup / name / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputModelError, match="both claim step 100"):
        discover_run(dup)


def test_explicit_list_is_ordered_by_step(hf_run):
    paths = [hf_run / "checkpoint-500", hf_run / "checkpoint-200", hf_run / "checkpoint-300"]
    info = checkpoints_from_paths(paths)
    assert info.steps == [200, 300, 500]
    with pytest.raises(ConfigError, match="listed twice"):
        checkpoints_from_paths([paths[0], paths[0]])
    with pytest.raises(InputModelError, match="does not exist"):
        checkpoints_from_paths([hf_run / "checkpoint-999"])


def test_loss_logs_in_three_formats(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("step,loss,lr\n10,3.5,1e-3\n20,,1e-3\n30,nan,1e-3\n")
    points = read_loss_log(csv)
    assert [p.step for p in points] == [10, 30] and points[0].loss == 3.5 and points[1].loss != points[1].loss
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text('{"step": 20, "loss": 2.0}\n\n{"step": 10, "loss": 3.0}\n{"step": 30, "eval_loss": 1}\n')
    assert [(p.step, p.loss) for p in read_loss_log(jsonl)] == [(10, 3.0), (20, 2.0)]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"step": 5, "loss": 1.5}, {"step": 5, "eval_loss": 9.0}]}))
    assert [(p.step, p.loss) for p in read_loss_log(state)] == [(5, 1.5)]
    bad = tmp_path / "bad.csv"
    bad.write_text("iteration,value\n1,2\n")
    with pytest.raises(InputModelError, match="needs 'step' and 'loss' columns"):
        read_loss_log(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 2}\n{oops\n')
    with pytest.raises(InputModelError, match="line 2: not valid JSON"):
        read_loss_log(broken)

"""`mergescale pma recover`: spike found in the run's log, the K checkpoints before it averaged."""

from __future__ import annotations

import math

import pytest
import torch
from pma_helpers import load_weights
from typer.testing import CliRunner

from mergescale.cli import app
from mergescale.errors import InputModelError
from mergescale.pma import recover

runner = CliRunner()


def falling(steps, collapse_at: int | None = None, bump_at: int | None = None) -> dict[int, float]:
    """A smooth falling loss logged every 10 steps, with an optional collapse or a recovered bump."""
    out = {}
    for s in steps:
        loss = 2.5 + 2.0 * math.exp(-s / 150) + 0.01 * math.sin(s)
        if collapse_at is not None and s >= collapse_at:
            loss = 8.0
        if bump_at is not None and bump_at <= s < bump_at + 20:
            loss += 2.0
        out[s] = loss
    return out


LOG_STEPS = range(10, 610, 10)


@pytest.fixture(scope="module")
def collapsed_run(run_factory):
    return run_factory("hf", losses=falling(LOG_STEPS, collapse_at=460))


def test_recover_averages_the_k_checkpoints_before_the_collapse(collapsed_run, tmp_path):
    texts = tmp_path / "heldout.txt"
    texts.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(12)) for i in range(6)) + "\n")
    res = recover(collapsed_run, tmp_path / "out", k=3, eval_data=texts, progress=False)
    assert res.spike is not None and res.spike.step == 460 and res.spike.last_good_step == 450
    assert res.averaged.steps == [200, 300, 400] and res.rollback.step == 400
    got = load_weights(tmp_path / "out")
    for name, t in got.items():
        want = (
            sum(load_weights(collapsed_run / f"checkpoint-{s}")[name].double() for s in (200, 300, 400)) / 3
        )
        assert (t.double() - want).abs().max() < 1e-6, name
    assert set(res.eval_losses) == {"average", "rollback"}
    assert all(math.isfinite(v) and v > 0 for v in res.eval_losses.values())
    assert res.recommendation in ("average", "rollback")


def test_recover_cli_reports_spikes_and_the_rollback(collapsed_run, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["pma", "recover", str(collapsed_run), "-o", str(out), "-k", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert "460" in res.output and "no" in res.output
    assert "roll back to" in res.output and "checkpoint-400" in res.output
    assert (out / "pma.json").is_file()
    dry = runner.invoke(app, ["pma", "recover", str(collapsed_run), "--dry-run"])
    assert dry.exit_code == 0 and "dry run" in dry.output


def test_a_recovered_run_writes_nothing(run_factory, tmp_path):
    run = run_factory("hf", losses=falling(LOG_STEPS, bump_at=300))
    res = recover(run, tmp_path / "out", progress=False)
    assert len(res.spikes) == 1 and res.spikes[0].recovered and res.spike is None
    assert res.averaged is None and not (tmp_path / "out").exists()


def test_loss_log_file_and_dcp_run(run_factory, tmp_path):
    run = run_factory("dcp")
    log = tmp_path / "loss.csv"
    log.write_text(
        "step,loss\n" + "".join(f"{s},{v}\n" for s, v in falling(LOG_STEPS, collapse_at=560).items())
    )
    texts = tmp_path / "heldout.jsonl"
    texts.write_text('{"text": "w1 w2 w3 w4 w5"}\n{"text": "w9 w8 w7 w6"}\n')
    res = recover(run, tmp_path / "out", loss_log=log, k=2, eval_data=texts, progress=False)
    assert res.averaged.steps == [400, 500] and res.rollback.kind == "dcp"
    assert all(math.isfinite(v) for v in res.eval_losses.values())


def test_no_loss_log_or_no_checkpoint_before(run_factory, tmp_path):
    with pytest.raises(InputModelError, match="no loss log"):
        recover(run_factory("hf"), tmp_path / "out", progress=False)
    early = run_factory("hf", losses=falling(LOG_STEPS, collapse_at=90))
    with pytest.raises(InputModelError, match="no checkpoint before it"):
        recover(early, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_heldout_loss_is_the_mean_token_nll_with_the_prefix_token(collapsed_run):
    """The recovery comparison's number, recomputed by hand: every token predicted, the first from the
    prefix token (eos here), averaged over all tokens of all documents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergescale.pma.heldout import folder_loss

    folder = collapsed_run / "checkpoint-400"
    texts = ["w1 w2 w3 w4 w5", "w9 w8 w7 w6 w5 w4 w3"]
    got = folder_loss(folder, texts, tokenizer_folder=folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        inp = torch.tensor([[prefix, *ids]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0, :-1].double(), dim=-1)  # (T, V)
        total -= float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
        count += len(ids)
    assert math.isclose(got, total / count, rel_tol=1e-5)


def test_recover_eval_refuses_a_model_with_its_own_code_before_writing(collapsed_run, tmp_path, monkeypatch):
    """--eval-data loads models: a checkpoint whose config.json names code of its own (auto_map) is refused
    up front, before the average is written, unless --trust-remote-code; its code never runs."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(collapsed_run, run)
    marker = tmp_path / "MARKER"
    for ckpt in run.glob("checkpoint-*"):
        config = json.loads((ckpt / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
        (ckpt / "config.json").write_text(json.dumps(config))
        (ckpt / "evil.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from transformers import LlamaForCausalLM\n"
            "class EvilModel(LlamaForCausalLM):\n    pass\n"  # a subclass: loading registers it, not Llama
        )
    texts = tmp_path / "heldout.txt"
    texts.write_text("w1 w2 w3 w4\nw5 w6 w7\n")
    out = tmp_path / "out"
    res = runner.invoke(app, ["pma", "recover", str(run), "-o", str(out), "--eval-data", str(texts), "-q"])
    assert isinstance(res.exception, InputModelError), res.output
    assert "--trust-remote-code" in str(res.exception) and "\n" not in str(res.exception)
    assert not out.exists() and not marker.exists()
    # trusted: the flag reaches the loader, and transformers runs the model's code as asked
    from mergescale.pma.heldout import folder_loss

    loss = folder_loss(
        run / "checkpoint-400", ["w1 w2 w3"], tokenizer_folder=run / "checkpoint-400", trust_remote_code=True
    )
    assert math.isfinite(loss) and marker.exists()
    from transformers import LlamaForCausalLM

    assert getattr(LlamaForCausalLM, "_auto_class", None) is None  # the model's code changed nothing else here
    seen = {}

    def fake_recover(*args, **kwargs):
        seen.update(kwargs)
        raise InputModelError("stop here")

    import mergescale.pma.recovery

    monkeypatch.setattr(mergescale.pma.recovery, "recover", fake_recover)
    runner.invoke(app, ["pma", "recover", str(run), "-o", str(out), "--eval-data", str(texts), "--trust-remote-code"])
    assert seen["trust_remote_code"] is True


def test_recover_refuses_an_incomplete_checkpoint_among_the_k(collapsed_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(collapsed_run, run)
    for f in (run / "checkpoint-300").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(InputModelError, match="checkpoint-300: checkpoint folder has no model weights"):
        recover(run, tmp_path / "out", k=3, progress=False)
    assert not (tmp_path / "out").exists()
    res = recover(run, tmp_path / "out", k=3, progress=False, skip_incomplete=True)
    assert res.averaged.steps == [100, 200, 400] and [p.name for p in res.averaged.skipped] == ["checkpoint-300"]
    # a folder after the last normal loss (here the collapsed checkpoint-500) is outside the span: no error
    shutil.rmtree(run)
    shutil.copytree(collapsed_run, run)
    for f in (run / "checkpoint-500").glob("*.safetensors"):
        f.unlink()
    assert recover(run, tmp_path / "dry", k=2, dry_run=True).averaged.steps == [300, 400]

"""Offline averaging end to end: formulas, output folder, CLI, sweeps, and bad input (nothing written)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pma_helpers import STEPS, TOKENS_PER_STEP, load_weights
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergescale import __version__
from mergescale.cli import app
from mergescale.errors import ConfigError, InputModelError, NonFiniteError, OutputError, TensorMismatchError
from mergescale.pma import average_checkpoints, sweep_checkpoints

runner = CliRunner()

# The formulas for a window of 4 (oldest first), α = 0.2, written out by hand
EXPECTED = {
    "sma": [0.25, 0.25, 0.25, 0.25],
    "ema": [0.8**3, 0.2 * 0.8**2, 0.2 * 0.8, 0.2],
    "wma": [0.1, 0.2, 0.3, 0.4],
}


def weighted_sum(run, steps, weights, name="checkpoint-{}") -> dict[str, torch.Tensor]:
    """Σ wᵢ·Mᵢ in float64, straight from the checkpoint files."""
    out: dict[str, torch.Tensor] = {}
    for step, w in zip(steps, weights, strict=True):
        for k, t in load_weights(run / name.format(step)).items():
            out[k] = out.get(k, 0) + w * t.double()
    return out


def assert_matches(folder, expected: dict[str, torch.Tensor], dtype=torch.float32, atol=1e-6):
    """The average equals the float64 formula up to the output dtype's rounding: float32 accumulation costs a few
    ulps relative to the values (rtol 1e-6, ~8 ulps), bf16 output one bf16 ulp (2**-7 relative)."""
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-6
    got = load_weights(folder)
    assert got.keys() == expected.keys()
    for k, t in got.items():
        assert t.dtype == dtype, k
        torch.testing.assert_close(t.double(), expected[k].to(dtype).double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("strategy", ["sma", "ema", "wma"])
def test_acceptance_window_of_four_on_a_trainer_run(hf_run, tmp_path, strategy):
    out = tmp_path / "out"
    res = runner.invoke(app, ["pma", str(hf_run), "-o", str(out), "--strategy", strategy, "--window", "4",
                              "--alpha", "0.2", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert_matches(out, weighted_sum(hf_run, [300, 400, 500, 600], EXPECTED[strategy]))
    record = json.loads((out / "pma.json").read_text())
    assert record["strategy"] == strategy and record["mergescale_version"] == __version__
    assert [c["step"] for c in record["checkpoints"]] == [300, 400, 500, 600]
    assert [c["tokens"] for c in record["checkpoints"]] == [s * TOKENS_PER_STEP for s in (300, 400, 500, 600)]
    assert [c["weight"] for c in record["checkpoints"]] == pytest.approx(EXPECTED[strategy])
    assert record["alpha"] == (0.2 if strategy == "ema" else None)


def test_output_is_an_ordinary_model_folder(hf_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = average_checkpoints(hf_run, tmp_path / "out", window=3, progress=False)
    assert res.steps == [400, 500, 600] and res.out_dir == tmp_path / "out"
    assert res.stats is not None and res.stats.bytes_read > 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "pma.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not names & {"optimizer.pt", "trainer_state.json", "rng_state.pth"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("w1 w2")["input_ids"] == [5, 6]
    expected = weighted_sum(hf_run, [400, 500, 600], [1 / 3] * 3)
    torch.testing.assert_close(
        model.state_dict()["lm_head.weight"].double(), expected["lm_head.weight"], atol=1e-6, rtol=1e-6
    )


def test_input_dtype_kept_unless_dtype(run_factory, tmp_path):
    run = run_factory("hf", dtype=torch.bfloat16)
    average_checkpoints(run, tmp_path / "bf16", strategy="ema", window=4, progress=False)
    expected = weighted_sum(run, [300, 400, 500, 600], EXPECTED["ema"])
    assert_matches(tmp_path / "bf16", expected, dtype=torch.bfloat16, atol=1e-2)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    average_checkpoints(run, tmp_path / "fp32", strategy="ema", window=4, dtype="float32", progress=False)
    assert_matches(tmp_path / "fp32", expected, dtype=torch.float32, atol=1e-6)


def test_average_of_one_checkpoint_is_that_checkpoint(hf_run, tmp_path):
    average_checkpoints(hf_run, tmp_path / "one", window=1, end=450, progress=False)
    want = load_weights(hf_run / "checkpoint-400")
    got = load_weights(tmp_path / "one")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_interval_end_custom_weights_and_explicit_list(hf_run, tmp_path):
    res = average_checkpoints(hf_run, tmp_path / "a", window=3, interval=200, end=550, progress=False)
    assert res.steps == [100, 300, 500] and res.label == "sma-N3-V200-end550"
    assert_matches(tmp_path / "a", weighted_sum(hf_run, [100, 300, 500], [1 / 3] * 3))
    res = average_checkpoints(hf_run, tmp_path / "b", window=3, weights=[1, 1, 2], progress=False)
    assert res.record.strategy == "custom" and res.record.raw_weights == [1, 1, 2]
    assert_matches(tmp_path / "b", weighted_sum(hf_run, [400, 500, 600], [0.25, 0.25, 0.5]))
    listed = [hf_run / "checkpoint-200", hf_run / "checkpoint-100"]
    res = runner.invoke(
        app, ["pma", "--checkpoints", *map(str, listed), "-o", str(tmp_path / "c"), "--strategy", "wma", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert_matches(tmp_path / "c", weighted_sum(hf_run, [100, 200], [1 / 3, 2 / 3]))


def test_step_named_and_dcp_runs(run_factory, tmp_path):
    named = run_factory("named")
    average_checkpoints(named, tmp_path / "named", strategy="wma", window=4, progress=False)
    names = {300: "iter_0000300", 400: "global_step400", 500: "step-500", 600: "step-600"}
    expected: dict[str, torch.Tensor] = {}
    for step, w in zip((300, 400, 500, 600), EXPECTED["wma"], strict=True):
        for k, t in load_weights(named / names[step]).items():
            expected[k] = expected.get(k, 0) + w * t.double()
    assert_matches(tmp_path / "named", expected)

    dcp_run = run_factory("dcp")
    hf = run_factory("hf")  # the same weights, saved the Hugging Face way
    res = average_checkpoints(dcp_run, tmp_path / "dcp", strategy="ema", window=4, progress=False)
    assert all(c.kind == "dcp" for c in res.checkpoints)
    assert_matches(tmp_path / "dcp", weighted_sum(hf, [300, 400, 500, 600], EXPECTED["ema"]))
    # config and tokenizer come from the run folder: the result loads as a model
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "dcp")
    assert (tmp_path / "dcp" / "tokenizer.json").is_file()


def test_dry_run_prints_the_table_and_writes_nothing(hf_run, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["pma", str(hf_run), "-o", str(out), "--strategy", "ema", "--window", "4", "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    assert "checkpoint-300" in res.output and "0.512000" in res.output and "dry run" in res.output
    assert not out.exists()


def test_nothing_is_ever_unpickled(hf_run, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    average_checkpoints(hf_run, tmp_path / "out", window=6, progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


# -- bad input: a clear error, and no OUT afterwards --------------------------------------------------------


@pytest.fixture
def broken_run(hf_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_run, run)
    return run


def _rewrite(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_nan_checkpoint_is_refused(broken_run, tmp_path):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")

    _rewrite(broken_run / "checkpoint-500", poison)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as err:
        average_checkpoints(broken_run, out, window=3, progress=False)
    msg = str(err.value)
    assert "checkpoint-500" in msg and "'model.layers.1.mlp.up_proj.weight' contains NaN" in msg
    assert "--allow-nonfinite" not in msg and "--end STEP" in msg
    assert not out.exists()
    # a window that ends before the spiked checkpoint is fine
    average_checkpoints(broken_run, out, window=3, end=400, progress=False)


def test_shape_mismatch_names_checkpoint_and_tensor(broken_run, tmp_path):
    def widen(t):
        t["model.norm.weight"] = torch.zeros(33)

    _rewrite(broken_run / "checkpoint-400", widen)
    msg = r"checkpoint-400: tensor 'model.norm.weight' has shape \(33,\) but \(32,\) in 2 other checkpoints"
    with pytest.raises(TensorMismatchError, match=msg):
        average_checkpoints(broken_run, tmp_path / "out", window=3, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_truncated_shard(broken_run, tmp_path):
    _rewrite(broken_run / "checkpoint-600", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(
        TensorMismatchError, match=r"checkpoint-600 is missing tensor 'model.norm.weight' that 2 other"
    ):
        average_checkpoints(broken_run, tmp_path / "out", window=3, progress=False)
    shard = broken_run / "checkpoint-300" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(
        InputModelError, match=r"checkpoint-300/model.safetensors: not a valid safetensors file"
    ):
        average_checkpoints(broken_run, tmp_path / "out", window=3, end=500, progress=False)
    assert not (tmp_path / "out").exists()


def test_config_errors(hf_run, tmp_path):
    with pytest.raises(ConfigError, match=r"asked for 7 checkpoints, but only 6 fit.*try --window 6"):
        average_checkpoints(hf_run, tmp_path / "out", window=7, progress=False)
    with pytest.raises(ConfigError, match="must sum to a positive number"):
        average_checkpoints(hf_run, tmp_path / "out", window=2, weights=[1, -1], progress=False)
    with pytest.raises(InputModelError, match="no checkpoints found"):
        average_checkpoints(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(OutputError, match="is not empty"):
        average_checkpoints(hf_run, tmp_path / "full", window=2, progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line(hf_run, tmp_path, capsys):
    import sys

    from mergescale.cli import main

    argv = sys.argv
    sys.argv = ["mergescale", "pma", str(hf_run), "-o", str(tmp_path / "o"), "--window", "9"]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: asked for 9 checkpoints") and "Traceback" not in err


# -- sweeps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sweep_equals_the_single_averages_from_one_read(run_factory, tmp_path, dtype):
    run = run_factory("hf", dtype=dtype)
    grid = {"strategy": ["sma", "ema", "wma"], "window": [2, 4]}
    results = sweep_checkpoints(run, tmp_path / "sweep", grid, alpha=0.2, progress=False)
    assert sorted(r.label for r in results) == sorted(
        ["sma-N2", "sma-N4", "ema0.2-N2", "ema0.2-N4", "wma-N2", "wma-N4"]
    )
    # one read: every checkpoint of the union (300 ... 600) read exactly once
    one_checkpoint = sum(t.numel() * t.element_size() for t in load_weights(run / "checkpoint-600").values())
    assert results[0].stats.bytes_read == 4 * one_checkpoint
    for r in results:
        single = tmp_path / "single" / r.label
        average_checkpoints(
            run, single, strategy=r.settings.strategy, window=r.settings.window, progress=False
        )
        a, b = load_weights(tmp_path / "sweep" / r.label), load_weights(single)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), r.label
        assert json.loads((tmp_path / "sweep" / r.label / "pma.json").read_text())["label"] == r.label
    index = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(index["outputs"]) == {r.label for r in results}
    assert [p.rsplit("-", 1)[1] for p in index["checkpoints_read"]] == ["300", "400", "500", "600"]


def test_sweep_cli_syntax_and_nothing_written_on_error(hf_run, broken_run, tmp_path):
    out = tmp_path / "sweep"
    res = runner.invoke(app, ["pma", str(hf_run), "-o", str(out), "--sweep", "strategy=sma,ema", "window=2,3",
                              "alpha=0.1,0.2", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    # alpha only multiplies the EMA averages: 2 SMA + 4 EMA
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["sma-N2", "sma-N3", "ema0.1-N2", "ema0.1-N3", "ema0.2-N2", "ema0.2-N3", "sweep.json"]
    )
    _rewrite(broken_run / "checkpoint-600", lambda t: t["lm_head.weight"].fill_(float("inf")))
    with pytest.raises(NonFiniteError, match="checkpoint-600.*'lm_head.weight' contains Inf"):
        sweep_checkpoints(broken_run, tmp_path / "bad", {"window": [2, 3]}, progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="cannot sweep 'weights'"):
        runner.invoke(
            app, ["pma", str(hf_run), "-o", str(out), "--sweep", "weights=1,2"], catch_exceptions=False
        )
    assert STEPS[-1] == 600


def test_a_step_folder_without_weights_inside_the_window_is_an_error(hf_run, tmp_path):
    """It used to be skipped silently, and the window slid to an older checkpoint than asked."""
    run = tmp_path / "run"
    shutil.copytree(hf_run, run)
    for f in (run / "checkpoint-500").glob("*.safetensors"):
        f.unlink()  # a checkpoint whose weights are missing (being written, or deleted)
    out = tmp_path / "out"
    with pytest.raises(InputModelError, match=r"checkpoint-500: checkpoint folder has no model weights .*--skip-incomplete"):
        average_checkpoints(run, out, window=3, progress=False)
    with pytest.raises(InputModelError, match="checkpoint-500"):
        sweep_checkpoints(run, out, {"window": [2, 3]}, progress=False)
    assert not out.exists()
    # outside the window's span it changes nothing, so it is no error
    assert average_checkpoints(run, out / "end", window=2, end=400, dry_run=True).steps == [300, 400]
    assert average_checkpoints(run, out / "one", window=1, dry_run=True).steps == [600]
    assert not out.exists()

    res = runner.invoke(app, ["pma", str(run), "-o", str(out), "--window", "3", "--skip-incomplete", "-q"])
    assert res.exit_code == 0, res.output
    assert "skipped checkpoint-500 (no model weights)" in res.output and "steps 300, 400, 600" in res.output
    record = json.loads((out / "pma.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [300, 400, 600]
    assert record["skipped_incomplete"] == ["checkpoint-500"]
    res = runner.invoke(app, ["pma", str(run), "-o", str(tmp_path / "o2"), "--window", "3", "-q"])
    assert isinstance(res.exception, InputModelError) and "checkpoint-500" in str(res.exception)

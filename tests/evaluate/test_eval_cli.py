"""The `mergescale eval` and `mergescale tasks` commands (through typer's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from mergescale.cli import app
from mergescale.errors import TaskError

runner = CliRunner()


def test_eval_writes_results_and_samples(word_model: Path, suite_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = runner.invoke(
        app, ["eval", str(word_model), "--tasks", str(suite_dir / "suite.yaml"), "--output", str(out),
              "--limit", "4", "--batch-size", "3", "--log-samples", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"mc_a", "gen", "mc_b", "ppl"} and data["settings"]["batch_size"] == 3
    assert all(t["n"] == 4 for t in data["tasks"].values())
    assert (tmp_path / "samples.jsonl").is_file()
    assert "mc_a" in result.output and "acc=" in result.output


def test_tasks_validate_reports_counts_and_errors(suite_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tasks", "validate", str(suite_dir)])
    assert result.exit_code == 0, result.output
    assert "4 valid task(s) in suite 'tiny'" in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"context": "a", "choices": ["x"], "gold": 3}\n')
    (bad / "task.yaml").write_text("name: bad\ndata: {test: test.jsonl}\n")
    result = runner.invoke(app, ["tasks", "validate", str(bad)])
    assert isinstance(result.exception, TaskError)  # main() prints it as one red line, exit code 1
    assert "test.jsonl:1: field '(row)': gold 3 is out of range for 1 choices" in str(result.exception)


def test_export_lm_eval_writes_harness_yamls(suite_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["tasks", "export-lm-eval", str(suite_dir), str(tmp_path / "lm"), "--prefix", "ms_"]
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "lm").iterdir())
    assert names == ["mergescale_metrics.py", "ms_gen.yaml", "ms_mc_a.yaml", "ms_mc_b.yaml", "ms_ppl.yaml"]
    text = (tmp_path / "lm" / "ms_gen.yaml").read_text()
    assert "process_results: !function 'mergescale_metrics.process_results'" in text
    mc_b = yaml.safe_load((tmp_path / "lm" / "ms_mc_b.yaml").read_text())
    assert mc_b["task"] == "ms_mc_b" and mc_b["output_type"] == "multiple_choice"
    assert mc_b["num_fewshot"] == 2 and mc_b["fewshot_split"] == "train" and mc_b["target_delimiter"] == " "
    assert mc_b["dataset_kwargs"]["data_files"]["test"] == str((suite_dir / "mc_b" / "test.jsonl").resolve())
    assert [m["metric"] for m in mc_b["metric_list"]] == ["acc_norm", "acc"]


def test_exported_metrics_run_without_mergescale(suite_dir: Path, tmp_path: Path) -> None:
    """The harness imports mergescale_metrics.py from the export folder: it must need nothing but Python (run
    with site-packages off, so mergescale cannot be imported) and score as mergescale does."""
    import json
    import subprocess
    import sys

    from mergescale.evaluate.metrics import GENERATION_METRICS

    out = tmp_path / "lm"
    assert runner.invoke(app, ["tasks", "export-lm-eval", str(suite_dir), str(out)]).exit_code == 0
    cases = [("The cat sat.", ["the cat sat", "a dog"]), ("Paris, France", ["paris"]), ("", ["x y"])]
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import mergescale_metrics as m; "
        "assert not any(k.startswith('mergescale.') or k == 'mergescale' for k in sys.modules); "
        "print(json.dumps([m.process_results({'references': r}, [o]) for o, r in json.loads(sys.argv[2])]))"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-I", "-c", script, str(out), json.dumps(cases)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    want = [{name: fn(o, r) for name, fn in GENERATION_METRICS.items()} for o, r in cases]
    assert got == want


def test_bad_task_file_is_one_red_line_and_exit_code_1(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "test.jsonl").write_text('{"context": "a", "choices": ["x"], "gold": 0}\n{"context": "b"\n')
    (tmp_path / "task.yaml").write_text("name: t\ndata: {test: test.jsonl}\n")
    err = _main_error(monkeypatch, capsys, "tasks", "validate", str(tmp_path / "task.yaml"))
    assert "test.jsonl:2: invalid JSON" in err


def _main_error(monkeypatch, capsys, *args: str) -> str:
    """Run ``main()`` as the console script does; return its one error line (exit code 1 asserted)."""
    from mergescale.cli import main

    monkeypatch.setattr("sys.argv", ["mergescale", *args])
    try:
        main()
    except SystemExit as exc:
        assert exc.code == 1
    else:
        raise AssertionError("main() did not exit")
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_missing_local_model_path_says_it_does_not_exist(
    suite_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Not "Repo id must be in the form ..." (transformers' answer to a path it takes for a Hub id)."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for ref in ("./missing/model", str(tmp_path / "missing" / "model"), "models/base"):
        err = _main_error(monkeypatch, capsys, "eval", ref, "--tasks", str(suite_dir), "-o", "r.json")
        assert f"model path {ref} does not exist" in err and "Repo id" not in err, err
    assert "models has no 'base'" in err
    assert not (tmp_path / "r.json").exists()


def _model_with_its_own_code(word_model: Path, folder: Path, marker: Path, model_type: str) -> Path:
    """A copy of ``word_model`` whose config.json maps the Auto classes to a .py file beside it that writes
    ``marker`` when imported (what a malicious Hub repository would ship)."""
    import shutil

    shutil.copytree(word_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return folder


def test_model_code_never_runs_without_trust_remote_code(word_model: Path, suite_dir: Path, tmp_path: Path) -> None:
    """Through the console script with ``y`` on stdin (transformers used to prompt, and ran the code on a y):
    one line naming --trust-remote-code, exit code 1, and the model's code never ran. Both an unknown
    model_type and a known one (which transformers would load as a plain Llama, ignoring the auto_map)."""
    import subprocess
    import sys

    marker = tmp_path / "MARKER"
    for model_type in ("evil_llama", "llama"):
        model = _model_with_its_own_code(word_model, tmp_path / model_type, marker, model_type)
        for extra in ([], ["--backend", "lm-eval", "--tasks", "x"]):
            args = ["eval", str(model), "--tasks", str(suite_dir), "-o", str(tmp_path / "r.json"), "--limit", "2"]
            done = subprocess.run(
                [sys.executable, "-m", "mergescale", *args, *extra], input="y\ny\n", capture_output=True,
                text=True, timeout=300,
            )  # fmt: skip
            assert done.returncode == 1, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "--trust-remote-code" in lines[0] and "auto_map" in lines[0], done.stderr
            assert not marker.exists() and not (tmp_path / "r.json").exists()


def test_trust_remote_code_is_passed_on_and_off_by_default(word_model: Path, suite_dir: Path, tmp_path: Path) -> None:
    """The Python API: refused by default (no prompt, code not run); with trust_remote_code=True transformers
    runs the model's code (the marker appears), as asked."""
    from mergescale.errors import InputModelError
    from mergescale.evaluate import evaluate

    marker = tmp_path / "MARKER"
    model = _model_with_its_own_code(word_model, tmp_path / "evil", marker, "evil_llama_api")
    task = str(suite_dir / "ppl" / "task.yaml")
    try:
        evaluate(str(model), task, limit=1, progress=False)
    except InputModelError as exc:
        assert "--trust-remote-code" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("a model with its own code was evaluated without trust_remote_code")
    assert not marker.exists()
    results = evaluate(str(model), task, limit=1, progress=False, trust_remote_code=True)
    assert marker.exists() and results.tasks["ppl"].n == 1

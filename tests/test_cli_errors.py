"""The `mergescale` command on careless input: usage errors are one line and exit code 2, failures one line and
exit code 1, never a traceback. Usage errors run the real command in a subprocess (it starts in half a second:
no torch); failures that need torch run ``main()`` in this process, and the read-only file system case runs
in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mergescale.cli import main


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergescale", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def call_main(monkeypatch, capsys, *args: str | Path) -> tuple[int, str]:
    """``main()`` as the console script runs it: (exit code, stderr). A successful merge or pma ends its process
    on purpose (``_exit_now``, see ``_FAST_EXIT_COMMANDS``); here it exits like any other command."""
    import mergescale.cli

    def exit_now(code: int) -> None:
        sys.exit(code)

    monkeypatch.setattr(mergescale.cli, "_exit_now", exit_now)
    monkeypatch.setattr(sys, "argv", ["mergescale", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    return int(exited.value.code or 0), capsys.readouterr().err


def assert_one_line(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), stderr


@pytest.fixture
def config(llama_models, tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump({
            "merge_method": "linear",
            "models": [{"model": str(llama_models[m]), "parameters": {"weight": 1.0}} for m in ("expert0", "expert1")],
        })
    )
    return path


@pytest.fixture
def run_dir(llama_models, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for step, name in ((100, "base"), (200, "expert0"), (300, "expert1")):
        shutil.copytree(llama_models[name], run / f"checkpoint-{step}")
    return run


# --------------------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["merge"], "Missing argument"),
        (["merge", "a.yaml", "out", "--bogus"], "No such option: --bogus"),
        (["pma", "run", "-o", "out", "--window", "0"], "--window"),
        (["eval", "model", "--tasks", "t.yaml", "-o", "r.json", "--batch-size", "abc"], "--batch-size"),
        (["world", "build"], "Missing option '--out'"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_usage_errors_are_one_line_and_exit_code_2(args, needle, tmp_path):
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert_one_line(res.stderr, needle)
    assert not list(tmp_path.iterdir())


def test_bare_command_prints_its_help_and_exits_2():
    res = run_cli()
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "Usage" in res.stdout + res.stderr


# --------------------------------------------------------------------------------------------- failures


def test_a_failure_is_one_line_and_exit_code_1_through_the_console_script(config, tmp_path):
    res = run_cli("merge", config, tmp_path / "out", "--device", "tpu")
    assert res.returncode == 1
    assert_one_line(res.stderr, "device 'tpu'")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machines without CUDA")
def test_device_without_cuda_is_refused_up_front_everywhere(config, run_dir, tmp_path, monkeypatch, capsys):
    cases = [
        ["merge", config, tmp_path / "out", "--device", "cuda"],
        ["pma", run_dir, "-o", tmp_path / "out", "--device", "cuda:1"],
        ["pma", "recover", run_dir, "-o", tmp_path / "out", "--device", "cuda"],
        ["eval", run_dir / "checkpoint-100", "--tasks", "missing.yaml", "-o", tmp_path / "r.json", "--device", "cuda"],
    ]
    for args in cases:
        code, err = call_main(monkeypatch, capsys, *args)
        assert code == 1, (args, err)
        assert_one_line(err, "CUDA is not available")
    code, err = call_main(monkeypatch, capsys, "pma", run_dir, "-o", tmp_path / "out", "--device", "tpu")
    assert code == 1
    assert_one_line(err, "device 'tpu': unknown device type")
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_output_under_proc_is_one_line(config, run_dir, tmp_path, monkeypatch, capsys):
    if not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc")
    for args in (
        ["merge", config, "/proc/mergescale-test/out"],
        ["pma", run_dir, "-o", "/proc/mergescale-test/out", "-q"],
        ["world", "build", "-o", "/proc/mergescale-test/world", "--preset", "micro", "-q"],
    ):
        code, err = call_main(monkeypatch, capsys, *args)
        assert code == 1, (args, err)
        assert_one_line(err, "/proc/mergescale-test")


def _read_only_mount_works() -> bool:
    if shutil.which("unshare") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _read_only_mount_works(), reason="needs root and mount namespaces (unshare -m)")
def test_read_only_file_system_is_one_line(config, run_dir, tmp_path):
    """merge, pma and world build onto a read-only tmpfs, mounted in a private mount namespace (invisible to any
    other process, gone with the shell)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    commands = [
        f"merge {config} {ro}/out -q",
        f"pma {run_dir} -o {ro}/out -q",
        f"world build -o {ro}/world --preset micro -q",
    ]
    script = f"mount -t tmpfs -o ro tmpfs {ro} || exit 99\n" + "".join(
        f"{sys.executable} -m mergescale {c} 2>{tmp_path}/err{i}; echo $? > {tmp_path}/rc{i}\n"
        for i, c in enumerate(commands)
    )
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for i, command in enumerate(commands):
        err = (tmp_path / f"err{i}").read_text()
        assert (tmp_path / f"rc{i}").read_text().strip() == "1", (command, err)
        assert_one_line(err, "read-only file system")


def test_binary_loss_log_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    for suffix in (".json", ".csv", ".jsonl"):
        log = tmp_path / f"loss{suffix}"
        log.write_bytes(bytes(range(256)) * 8)
        code, err = call_main(monkeypatch, capsys, "pma", "recover", run_dir, "-o", tmp_path / "out", "--loss-log", log)
        assert code == 1, err
        assert_one_line(err, f"loss{suffix}: not a text loss log")
    assert not (tmp_path / "out").exists()


def test_interrupt_exits_130(monkeypatch, capsys):
    """typer turns Ctrl-C into Exit(130) before main() sees it: the code must survive, not become 0."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mergescale.api.merge", interrupted)
    code, err = call_main(monkeypatch, capsys, "merge", "cfg.yaml", "out")
    assert code == 130 and "interrupted" in err


# --------------------------------------------------------------------------------------------- inputs are safe


def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_output_that_is_inside_or_contains_an_input_is_refused(llama_models, tmp_path, monkeypatch, capsys):
    """`mergescale merge cfg.yaml m/base --overwrite` replaced the base model with the merge."""
    models = tmp_path / "m"
    for name in ("base", "expert0", "expert1"):
        shutil.copytree(llama_models[name], models / name)
    cfg = tmp_path / "ta.yaml"
    cfg.write_text(
        yaml.safe_dump({
            "merge_method": "task_arithmetic",
            "base_model": str(models / "base"),
            "models": [{"model": str(models / m), "parameters": {"weight": 1.0}} for m in ("expert0", "expert1")],
        })
    )
    before = _fingerprint(models)
    monkeypatch.chdir(tmp_path)
    for out, how in (
        ("m/base", "is the input base model"),
        (str(models / "expert1"), "is the input model"),
        ("m/base/../expert0/merged", "is inside the input model"),
        ("m", "contains the input base model"),
        (".", "contains the input base model"),
    ):
        code, err = call_main(monkeypatch, capsys, "merge", cfg, out, "--overwrite", "-q")
        assert code == 1, (out, err)
        assert_one_line(err, f"output folder {out} {how}")
    assert _fingerprint(models) == before
    assert not [p for p in models.rglob(".*tmp*")]


def test_pma_output_inside_a_checkpoint_of_the_run_is_refused(run_dir, tmp_path, monkeypatch, capsys):
    before = _fingerprint(run_dir)
    # checkpoint-100 is no input of a window of 2, but a checkpoint of the run all the same
    for out in (run_dir / "checkpoint-300", run_dir / "checkpoint-200" / "avg", run_dir / "checkpoint-100", run_dir):
        code, err = call_main(monkeypatch, capsys, "pma", run_dir, "-o", out, "--window", "2", "--overwrite", "-q")
        assert code == 1, (out, err)
        assert_one_line(err, f"output folder {out}", "the input checkpoint")
        code, err = call_main(
            monkeypatch, capsys, "pma", run_dir, "-o", out, "--sweep", "window=1,2", "--overwrite", "-q"
        )
        assert code == 1 and "the input checkpoint" in err, (out, err)
    assert _fingerprint(run_dir) == before
    from mergescale.errors import OutputError
    from mergescale.pma import recover

    with pytest.raises(OutputError, match="the input checkpoint"):
        recover(run_dir, run_dir / "checkpoint-100", k=1, overwrite=True, loss_log=_spiky_log(tmp_path))
    assert _fingerprint(run_dir) == before


def _spiky_log(tmp_path: Path) -> Path:
    log = tmp_path / "loss.csv"
    log.write_text("step,loss\n" + "".join(f"{s},{3.0 if s < 250 else 9.0}\n" for s in range(10, 400, 10)))
    return log


def test_eval_output_that_is_a_folder_is_refused_before_evaluating(llama_models, tmp_path, monkeypatch, capsys):
    """It used to evaluate, then fail to rename its temporary file onto the folder and leave it behind."""
    results = tmp_path / "results"
    results.mkdir()
    tasks = tmp_path / "t"
    tasks.mkdir()
    (tasks / "task.yaml").write_text("name: t\nkind: perplexity\ndata: {test: test.jsonl}\n")
    (tasks / "test.jsonl").write_text('{"text": "w1 w2 w3"}\n')
    code, err = call_main(monkeypatch, capsys, "eval", llama_models["base"], "--tasks", tasks, "-o", results, "-q")
    assert code == 1
    assert_one_line(err, f"{results}: is a folder")
    assert not list(results.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["results", "t"]


def test_results_save_leaves_no_temporary_on_failure(tmp_path):
    from mergescale.errors import OutputError
    from mergescale.evaluate.results import EvalResults, ModelIdentity, _atomic_write

    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError):
        _atomic_write(tmp_path / "taken", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    results = EvalResults(mergescale_version="0", model=ModelIdentity(source="memory", hash="0"), tasks={})
    with pytest.raises(OutputError, match="is a folder"):
        results.save(tmp_path / "taken")

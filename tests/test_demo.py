"""`mergescale demo` end to end on the micro preset: world → both studies → report, then a cached rerun."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergescale.cli import app

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_reruns_cached(micro_build, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".demo.json").write_text("{}")
    shutil.copytree(micro_build.root, out / "world", symlinks=True)  # the world build is the world tests' job
    runner = CliRunner()
    first = runner.invoke(app, ["demo", "--preset", "micro", "-o", str(out), "--workers", "1", "-q"], terminal_width=80)
    assert first.exit_code == 0, first.output
    html = out / "report" / "report.html"
    assert html.is_file() and (out / "report" / "report.md").is_file()
    text = html.read_text()
    for section in ("Setup", "Figures", "Findings", "Cost"):
        assert section in text, section
    figures = {p.stem for p in (out / "report" / "figures").glob("*.png")}
    assert len(figures) >= 7, figures  # the merging figures 1-6 and the PMA curves (8) at least
    assert any("pma" in f for f in figures), figures
    for claim in ("S1", "S6", "P1", "P6"):
        assert claim in first.output
    assert "report: " in first.output and "merges and" in first.output
    # 80 columns, cells never cut (lines naming the temporary folder are as long as its path)
    assert all(len(line) <= 80 for line in first.output.splitlines() if str(tmp_path) not in line), first.output
    assert "…" not in first.output
    again = runner.invoke(app, ["demo", "--preset", "micro", "-o", str(out), "--workers", "1", "-q"], terminal_width=80)
    assert again.exit_code == 0, again.output
    phases = [line.split() for line in again.output.splitlines() if line.startswith("│")]
    assert {row[1]: row[-2] for row in phases if row[1] in ("world", "study", "report")} == dict.fromkeys(
        ("world", "study", "report"), "cached"
    )  # all three answered from what is there


def test_demo_refuses_a_foreign_folder_and_an_unknown_preset(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "-o", str(tmp_path), "--preset", "micro", "-q"])
    assert result.exit_code != 0 and "holds no demo" in str(result.exception)
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "new"), "--preset", "huge", "-q"])
    assert "unknown demo preset 'huge'" in str(result.exception) and not (tmp_path / "new").exists()

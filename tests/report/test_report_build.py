"""The report end to end: a real study on the micro world plus a PMA study folder, through ``build_report`` and
``mergescale report``; atomic output and the folders it refuses."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergescale.cli import app
from mergescale.errors import OutputError
from mergescale.report import Verdict, build_report
from mergescale.report.figures import FIGURES
from mergescale.study.results import load_study

SECTIONS = ("setup", "figures", "tables", "findings", "cost")


@pytest.mark.slow  # the micro world and a study on it: ~1 min on 2 shared cores, once per session
def test_the_report_of_a_micro_study_and_a_pma_study(built_report, report_study: Path) -> None:
    out = built_report.out_dir
    assert built_report.html == out / "report.html" and built_report.html.is_file()
    assert built_report.missing_figures == ()
    for spec in FIGURES:
        for ext in ("png", "svg"):
            path = out / "figures" / f"{spec.name}.{ext}"
            assert path in built_report.figures and path.stat().st_size > 5_000, path
    html = built_report.html.read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html
    for spec in FIGURES:
        assert f'src="figures/{spec.name}.png"' in html
    assert "<script" not in html and "http://" not in html and "https://" not in html

    results = load_study(report_study)
    with (out / "tables" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    # 2 sizes x 2 base kinds x 4 methods x 2 k
    assert len(rows) == len(results.groups) * 4 * 2 == 32
    first = results.summary()[0]
    assert float(rows[0]["held_in_mean"]) == pytest.approx(first.held_in.mean, abs=5e-4)

    findings = {f.id: f for f in built_report.findings}
    assert len(findings) == 16
    for f in findings.values():
        assert f.verdict in Verdict
        if f.verdict is not Verdict.NOT_MEASURABLE:
            assert f.comparisons and str(len(f.comparisons)) in f.measured
    # the synthetic PMA rows make every PMA claim hold
    assert all(findings[i].verdict is Verdict.REPRODUCED for i in ("P1", "P2", "P3a", "P3b", "P4a", "P4b", "P5", "P6"))
    # every merging claim is measurable: two sizes, both kinds, two k, a multitask model
    assert all(findings[f"S{i}"].verdict is not Verdict.NOT_MEASURABLE for i in ("1", "2", "3a", "3b", "4a", "4b", "5", "6"))

    summary = json.loads((out / "report.json").read_text())
    assert summary["format"] == "mergescale-report/1"
    assert [f["id"] for f in summary["findings"]] == list(findings)
    md = built_report.markdown.read_text()
    assert "## Findings" in md and "| S1 |" in md and "![Figure 1." in md
    with (out / "tables" / "comparisons.csv").open() as f:
        assert len(list(csv.DictReader(f))) == sum(len(f.comparisons) for f in built_report.findings)
    cost = {r["quantity"]: r["value"] for r in csv.DictReader((out / "tables" / "cost.csv").open())}
    assert int(cost["merges evaluated"]) == len(results.merges)
    assert int(cost["reads (draws; one read feeds every method's merge)"]) == len(results.draws)


def test_a_merging_study_alone_says_what_it_did_not_measure(tiny_store: Path, tmp_path: Path) -> None:
    result = build_report(tiny_store, tmp_path / "r")
    # one group of one kind, no diagnostics: neither the PMA figures nor IT vs PT nor the diagnostics
    assert set(result.missing_figures) == {
        "pma_loss_curve", "pma_ablation", "pma_spike", "pma_init", "it_vs_pt", "diagnostics_vs_retention",
    }  # fmt: skip
    html = result.html.read_text()
    assert html.count("Not measured in this study") == len(result.missing_figures)
    assert all(f.verdict is Verdict.NOT_MEASURABLE for f in result.findings if f.paper == "pma")
    assert not (tmp_path / "r" / "figures" / "pma_spike.png").exists()


def test_a_pma_study_alone_renders_without_merges(pma_store: Path, tmp_path: Path) -> None:
    result = build_report([pma_store], tmp_path / "r")
    assert {p.stem for p in result.figures} == {"pma_loss_curve", "pma_ablation", "pma_spike", "pma_init"}
    html = result.html.read_text()
    assert "Merging tables: not measured in this study" in html
    assert all(f.verdict is Verdict.NOT_MEASURABLE for f in result.findings if f.paper == "merging")


def test_the_command_prints_findings_that_fit_80_columns(tiny_store: Path, pma_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(tiny_store), str(pma_store), "-o", str(out), "-q"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    for verdict in ("reproduced",):
        assert verdict in result.output
    assert "P6" in result.output and str(out / "report.html") in result.output.replace("\n", "")
    assert (out / "report.html").is_file()


def test_output_is_atomic_and_refuses_what_is_not_a_report(tiny_store: Path, tmp_path: Path) -> None:
    report_study = tiny_store
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and holds no report"):
        build_report(report_study, other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    runner = CliRunner()
    refused = runner.invoke(app, ["report", str(report_study), "-o", str(other), "-q"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output

    # a report folder is replaced whole by a rerun, without --overwrite
    first = build_report(report_study, tmp_path / "r")
    (first.out_dir / "figures" / "stale.png").write_bytes(b"old")
    second = build_report(report_study, tmp_path / "r")
    assert not (second.out_dir / "figures" / "stale.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind

    # --overwrite replaces a folder that is not a report
    build_report(report_study, other, overwrite=True)
    assert not (other / "keep.txt").exists() and (other / "report.html").is_file()

    # never inside, or over, a study folder
    with pytest.raises(OutputError, match="must not be, contain or lie inside the study folder"):
        build_report(report_study, report_study / "report", overwrite=True)
    with pytest.raises(OutputError, match="must not be"):
        build_report(report_study, report_study, overwrite=True)
    with pytest.raises(OutputError, match="not a study folder"):
        build_report(tmp_path / "missing", tmp_path / "r2")


def test_a_failure_while_writing_leaves_the_previous_report(tiny_store: Path, tmp_path: Path, monkeypatch) -> None:
    report_study = tiny_store
    first = build_report(report_study, tmp_path / "r")
    before = first.html.read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("mergescale.report.build.render_markdown", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(report_study, tmp_path / "r")
    assert first.html.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]

"""``build_report``: study folders in, a report folder out — written into a temporary sibling folder and renamed
into place, so a crash never leaves half a report and an earlier report is replaced whole.

The report folder holds ``report.html``, ``report.md``, ``report.json`` (the findings as data; it also marks the
folder as a report, which a rerun may replace without ``overwrite``), ``figures/*.png`` + ``*.svg`` and
``tables/*.csv``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from mergescale.errors import ConfigError, OutputError
from mergescale.io.atomic import AtomicFolder  # imports no torch (2.7 s of a report's ~12)
from mergescale.report.data import ReportData, load, prepare
from mergescale.report.figures import FIGURES, save
from mergescale.report.findings import Finding, Rules, evaluate_findings
from mergescale.report.html import Page, RenderedFigure, render_html, render_markdown
from mergescale.report.tables import cost_table, paper_tables, pma_tables, report_tables, setup_tables
from mergescale.study.store import STORE_FILE

REPORT_MARKER = "report.json"
REPORT_FORMAT = "mergescale-report/1"

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote (paths in their final place) and the findings it reached."""

    out_dir: Path
    html: Path
    markdown: Path
    figures: tuple[Path, ...]  # PNG and SVG of each figure drawn
    tables: tuple[Path, ...]
    findings: tuple[Finding, ...]
    missing_figures: tuple[str, ...]  # figures the study holds no data for
    seconds: float

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.html, self.markdown, self.out_dir / REPORT_MARKER, *self.figures, *self.tables)


def _is_report(folder: Path) -> bool:
    try:
        return json.loads((folder / REPORT_MARKER).read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out_dir: Path, study_dirs: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse an output that would destroy an input, or replace a folder that is not a report (an empty folder
    or an earlier report is replaced; anything else only with ``overwrite``)."""
    out = out_dir.resolve()
    for s in study_dirs:
        src = s.resolve()
        if out == src or out in src.parents or src in out.parents:
            raise OutputError(f"{out_dir}: the report folder must not be, contain or lie inside the study folder {s}")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if any(out_dir.iterdir()) and not _is_report(out_dir) and not overwrite:
        raise OutputError(f"{out_dir}: folder is not empty and holds no report; choose another or pass --overwrite")


def build_report(
    study_dirs: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    rules: Rules = Rules(),
    progress: Progress | None = None,
) -> ReportResult:
    """Read the study folders, draw the figures, judge the findings, write the report folder atomically.

    Several folders are reported together (e.g. a merging study and a PMA study): see
    :func:`mergescale.report.data.combine`. Every part renders what the folders hold; a figure or finding
    without data says "not measured in this study".
    """
    start = time.perf_counter()
    dirs = [Path(study_dirs)] if isinstance(study_dirs, str | Path) else [Path(d) for d in study_dirs]
    if not dirs:
        raise ConfigError("give at least one study folder")
    for d in dirs:
        if not (d / STORE_FILE).is_file():
            raise OutputError(f"{d}: not a study folder (no {STORE_FILE}); run `mergescale study run` first")
    out = Path(out_dir)
    check_output(out, dirs, overwrite=overwrite)
    tick = progress or (lambda what, done, total: None)

    tick("reading the studies", 0, len(dirs))
    loaded = []
    for i, d in enumerate(dirs):
        loaded.append(load(d))
        tick("reading the studies", i + 1, len(dirs))
    data = prepare(loaded)
    findings = evaluate_findings(data, rules)

    folder = AtomicFolder(out, overwrite=True)  # check_output decided what may be replaced
    tmp = folder.create()
    try:
        figures, rendered, missing = _draw(data, tmp, tick)
        tick("writing tables and pages", 0, 1)
        tables = report_tables(data, findings)
        (tmp / "tables").mkdir()
        table_paths = [t.write_csv(tmp / "tables") for t in tables]
        page = _page(data, findings, rules, rendered, [t.name for t in tables])
        (tmp / "report.html").write_text(render_html(page), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(page), encoding="utf-8")
        (tmp / REPORT_MARKER).write_text(json.dumps(_summary(data, findings, rendered, rules), indent=1), encoding="utf-8")
        tick("writing tables and pages", 1, 1)
        folder.commit()
    except BaseException:
        folder.abort()
        raise
    final = [out / p.relative_to(tmp) for p in figures]
    return ReportResult(
        out_dir=out,
        html=out / "report.html",
        markdown=out / "report.md",
        figures=tuple(final),
        tables=tuple(out / p.relative_to(tmp) for p in table_paths),
        findings=tuple(findings),
        missing_figures=tuple(missing),
        seconds=time.perf_counter() - start,
    )


def _draw(data: ReportData, tmp: Path, tick: Progress) -> tuple[list[Path], list[RenderedFigure], list[str]]:
    paths: list[Path] = []
    rendered: list[RenderedFigure] = []
    missing: list[str] = []
    for i, spec in enumerate(FIGURES):
        tick("drawing figures", i, len(FIGURES))
        fig = spec.make(data)
        if fig is None:
            rendered.append(RenderedFigure(spec, None, None))
            missing.append(spec.name)
            continue
        png, svg = save(fig, tmp / "figures", spec.name)
        paths += [png, svg]
        rendered.append(RenderedFigure(spec, f"figures/{png.name}", f"figures/{svg.name}"))
    tick("drawing figures", len(FIGURES), len(FIGURES))
    return paths, rendered, missing


def _page(data: ReportData, findings: list[Finding], rules: Rules, rendered: list[RenderedFigure], csv_names: list[str]) -> Page:
    from mergescale.report.tables import baselines_table

    other = []
    if data.results.groups:
        other.append(baselines_table(data))
    other += [t for t in pma_tables(data) if t.name != "pma_curves"]
    names = [s.results.name for s in data.studies] or [data.results.name]
    return Page(
        title=f"Study report: {', '.join(names)}",
        data=data,
        findings=findings,
        rules=rules,
        figures=rendered,
        setup=setup_tables(data),
        paper=paper_tables(data) if data.has_merges else [],
        other=other,
        cost=cost_table(data),
        csv_names=csv_names,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _summary(data: ReportData, findings: list[Finding], rendered: list[RenderedFigure], rules: Rules) -> dict:
    return {
        "format": REPORT_FORMAT,
        "studies": [str(s.provenance.study_dir) for s in data.studies],
        "figures": {f.spec.name: f.png for f in rendered},
        "findings": [
            {
                "id": f.id,
                "paper": f.paper,
                "claim": f.claim,
                "verdict": f.verdict.value,
                "measured": f.measured,
                "rule": f.rule,
                "counts": dict(zip(("for", "against", "within_spread"), f.counts, strict=True)),
            }
            for f in findings
        ],
        "rules": asdict(rules),
    }

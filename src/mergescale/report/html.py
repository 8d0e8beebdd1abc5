"""``report.html`` (one self-contained page: inline CSS, no JavaScript, no network; figures as files beside it,
referenced relatively) and ``report.md`` (the same tables and findings as text), from what :mod:`.build`
computed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from mergescale.report.data import ReportData, human_bytes
from mergescale.report.figures import FigureSpec
from mergescale.report.findings import Finding, Rules, Verdict
from mergescale.report.tables import Table

SECTIONS = (
    ("setup", "Setup"),
    ("figures", "Figures"),
    ("tables", "Tables"),
    ("findings", "Findings"),
    ("cost", "Cost"),
)

_VERDICT_CLASS = {
    Verdict.REPRODUCED: "ok",
    Verdict.NOT_REPRODUCED: "no",
    Verdict.INCONCLUSIVE: "maybe",
    Verdict.NOT_MEASURABLE: "na",
}

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       max-width: 1180px; margin: 0 auto; padding: 0 20px 60px; }
h1 { font-size: 1.6em; margin: 1.2em 0 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
nav { margin: 0.6em 0 1em; } nav a { margin-right: 1.1em; }
.lead { color: #555; }
table { border-collapse: collapse; margin: 0.4em 0 1em; font-size: 13.5px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
figure { margin: 1.2em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 14px; color: #333; max-width: 60em; }
.absent { color: #777; font-style: italic; }
.verdict { font-weight: 600; white-space: nowrap; padding: 1px 6px; border-radius: 4px; }
.ok { background: #d8f0d8; color: #175e17; } .no { background: #f7d9d9; color: #8a1f1f; }
.maybe { background: #fbf0c9; color: #6b5200; } .na { background: #eee; color: #555; }
.note { font-size: 13px; color: #555; max-width: 70em; }
code { font-size: 0.92em; background: #f6f6f6; padding: 0 3px; }
"""


@dataclass(frozen=True)
class RenderedFigure:
    spec: FigureSpec
    png: str | None  # path relative to the report folder; None when the study holds nothing to draw
    svg: str | None


@dataclass(frozen=True)
class Page:
    """Everything the page shows."""

    title: str
    data: ReportData
    findings: Sequence[Finding]
    rules: Rules
    figures: Sequence[RenderedFigure]
    setup: Sequence[Table]
    paper: Sequence[Table]  # compact method × k tables per group
    other: Sequence[Table]  # shown in the Tables section (baselines, PMA, ...)
    cost: Table
    csv_names: Sequence[str]
    generated: str


def verdict_counts(findings: Sequence[Finding]) -> str:
    counts = Counter(f.verdict for f in findings)
    return ", ".join(f"{counts[v]} {v.value}" for v in Verdict if counts[v])


# -- HTML ------------------------------------------------------------------------------------------------------
def _html_table(t: Table, *, title: bool = True, limit: int | None = None) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in t.columns)
    rows = t.rows if limit is None else t.rows[:limit]
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = escape("" if v is None else str(v))
            cells.append(f'<td class="num">{text}</td>' if i in t.numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = ""
    if limit is not None and len(t.rows) > limit:
        more = f'<p class="note">First {limit} of {len(t.rows)} rows; all in <a href="tables/{t.name}.csv">tables/{t.name}.csv</a>.</p>'
    caption = f"<h3>{escape(t.title)}</h3>" if title else ""
    note = f'<p class="note">{escape(t.note)}</p>' if t.note else ""
    return f'{caption}<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>{note}{more}'


def _findings_html(findings: Sequence[Finding], rules: Rules) -> str:
    out = [f'<p class="note"><b>Rule.</b> {escape(rules.describe())}</p>']
    for paper, title in (("merging", "What Matters for Model Merging at Scale? (Yadav et al., 2024)"),
                         ("pma", "Model Merging in Pre-training of LLMs (Li et al., 2025)")):  # fmt: skip
        mine = [f for f in findings if f.paper == paper]
        if not mine:
            continue
        rows = []
        for f in mine:
            cls = _VERDICT_CLASS[f.verdict]
            rows.append(
                f"<tr><td>{escape(f.id)}</td><td>{escape(f.claim)}</td><td>{escape(f.measured)}</td>"
                f'<td><span class="verdict {cls}">{escape(f.verdict.value)}</span></td>'
                f"<td>{escape(f.rule)}<br><i>{escape(f.tally)}</i></td></tr>"
            )
        out.append(
            f"<h3>{escape(title)}</h3><div class=\"scroll\"><table><tr><th>#</th><th>claim</th><th>measured here</th>"
            f"<th>verdict</th><th>comparisons counted</th></tr>{''.join(rows)}</table></div>"
        )
    out.append('<p class="note">Every comparison: <a href="tables/comparisons.csv">tables/comparisons.csv</a>.</p>')
    return "".join(out)


def render_html(page: Page) -> str:
    nav = "".join(f'<a href="#{sid}">{escape(name)}</a>' for sid, name in SECTIONS)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(page.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(page.title)}</h1>",
        f'<p class="lead">Findings: {escape(verdict_counts(page.findings))}. Generated {escape(page.generated)} by '
        "<code>mergescale report</code>.</p>",
        f"<nav>{nav}</nav>",
    ]
    # setup
    parts.append('<section id="setup"><h2>Setup</h2>')
    parts += [_html_table(t) for t in page.setup]
    if not page.setup:
        parts.append('<p class="absent">The study folders hold no setup records.</p>')
    parts.append("</section>")
    # figures
    parts.append('<section id="figures"><h2>Figures</h2>')
    for f in page.figures:
        head = f"Figure {f.spec.number}. {f.spec.title}."
        if f.png is None:
            parts.append(
                f'<p class="absent"><b>{escape(head)}</b> Not measured in this study (needs {escape(f.spec.needs)}).</p>'
            )
            continue
        links = f' <a href="{escape(f.png)}">PNG</a> · <a href="{escape(f.svg or "")}">SVG</a>'
        parts.append(
            f'<figure id="fig-{escape(f.spec.name)}"><img src="{escape(f.png)}" alt="{escape(head)}">'
            f"<figcaption><b>{escape(head)}</b> {escape(f.spec.caption)}{links}</figcaption></figure>"
        )
    parts.append("</section>")
    # tables
    parts.append('<section id="tables"><h2>Tables</h2>')
    if page.paper:
        parts.append(
            '<p class="note">Normalised scores, mean ± sample std over seeds (task → category → mean over categories). '
            "The multitask model is scored on the same held-in tasks as the merges at each k.</p>"
        )
        parts += [_html_table(t) for t in page.paper]
    else:
        parts.append('<p class="absent">Merging tables: not measured in this study (no evaluated merge).</p>')
    for t in page.other:
        parts.append(_html_table(t, limit=60))
    csvs = " · ".join(f'<a href="tables/{escape(n)}.csv">{escape(n)}.csv</a>' for n in page.csv_names)
    parts.append(f'<p class="note">All tables as CSV: {csvs}.</p></section>')
    # findings
    parts.append(f'<section id="findings"><h2>Findings</h2>{_findings_html(page.findings, page.rules)}</section>')
    # cost
    parts.append(f'<section id="cost"><h2>Cost</h2>{_html_table(page.cost, title=False)}</section>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -- Markdown --------------------------------------------------------------------------------------------------
def _md_cell(v: object) -> str:
    return ("" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table, *, title: bool = True, limit: int | None = None) -> str:
    rows = t.rows if limit is None else t.rows[:limit]
    lines = [f"### {t.title}", ""] if title else []
    lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    lines.append("|" + "|".join("---:" if i in t.numeric else "---" for i in range(len(t.columns))) + "|")
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    if limit is not None and len(t.rows) > limit:
        lines += ["", f"(first {limit} of {len(t.rows)} rows; all in `tables/{t.name}.csv`)"]
    if t.note:
        lines += ["", t.note]
    return "\n".join(lines) + "\n"


def render_markdown(page: Page) -> str:
    out = [f"# {page.title}", "", f"Findings: {verdict_counts(page.findings)}. Generated {page.generated}.", ""]
    out += ["## Setup", ""] + [_md_table(t) for t in page.setup]
    out += ["## Figures", ""]
    for f in page.figures:
        head = f"Figure {f.spec.number}. {f.spec.title}."
        if f.png is None:
            out += [f"**{head}** Not measured in this study (needs {f.spec.needs}).", ""]
        else:
            out += [f"![{head}]({f.png})", "", f"**{head}** {f.spec.caption}", ""]
    out += ["## Tables", ""]
    out += [_md_table(t) for t in page.paper] or ["Merging tables: not measured in this study.", ""]
    out += [_md_table(t, limit=60) for t in page.other]
    out += ["## Findings", "", f"**Rule.** {page.rules.describe()}", ""]
    out.append("| # | claim | measured here | verdict | comparisons counted |")
    out.append("|---|---|---|---|---|")
    for f in page.findings:
        out.append(
            f"| {f.id} | {_md_cell(f.claim)} | {_md_cell(f.measured)} | **{f.verdict.value}** | "
            f"{_md_cell(f.rule)}; {_md_cell(f.tally)} |"
        )
    out += ["", "## Cost", "", _md_table(page.cost, title=False)]
    return "\n".join(out).rstrip() + "\n"


def cost_line(data: ReportData) -> str:
    c = data.cost
    return (
        f"{c.merges} merges from {c.reads} reads, {c.evaluations} evaluations, "
        f"{human_bytes(c.bytes_read_mean)} read per draw, peak RSS {human_bytes(c.peak_rss)}"
    )

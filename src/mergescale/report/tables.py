"""The report's tables, built once as rows and written three ways: CSV (``tables/*.csv``), HTML and Markdown.

A :class:`Table` is plain text cells with a name (its CSV file), a title and a note; :func:`report_tables` builds
every table the study's records allow, :func:`paper_tables` the compact per-group tables of the paper (method ×
k, mean ± std) shown in the page.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergescale.report.data import ReportData, human_bytes, human_count, kind_name
from mergescale.report.findings import Finding, Rules


@dataclass
class Table:
    name: str  # file stem of the CSV
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""
    numeric: set[int] = field(default_factory=set)  # columns right-aligned in HTML

    def write_csv(self, folder: Path) -> Path:
        path = folder / f"{self.name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            for row in self.rows:
                writer.writerow(["" if v is None else v for v in row])
        return path


def fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


# -- the paper's tables ----------------------------------------------------------------------------------------
def paper_tables(data: ReportData) -> list[Table]:
    """Per group and split: method × k, mean ± std over seeds, with the multitask model's row."""
    out = []
    for g in data.groups:
        params = f", {human_count(g.parameters)} parameters" if g.parameters else ""
        for split, what in (("held_in", "held-in ÷ expert"), ("held_out", "held-out ÷ base")):
            rows = []
            for label in data.labels:
                rows.append([label] + [pm(*(_ms(getattr(r, split)) if (r := data.row(g.name, label, k)) else (None, None))) for k in data.ks])
            mt = []
            for k in data.ks:
                r = next((r for r in data.rows_of(g.name) if r.k == k), None)
                value = (r.multitask_held_in.mean if split == "held_in" else r.multitask_held_out) if r else None
                mt.append(pm(value, None))
            rows.append(["multitask model"] + mt)
            if split == "held_in":
                rows.append(["base model"] + [pm(_ms(data.base_held_in[(g.name, k)])[0], None) if (g.name, k) in data.base_held_in else "–" for k in data.ks])
            out.append(
                Table(
                    f"paper_{g.name}_{split}".replace("/", "_"),
                    f"{g.name} ({g.size or '?'}, {kind_name(g.base_kind)} base{params}): {what}",
                    ["method"] + [f"k={k}" for k in data.ks],
                    rows,
                    numeric=set(range(1, len(data.ks) + 1)),
                )
            )
    return out


def _ms(s: Any) -> tuple[float | None, float | None]:
    return s.mean, s.std


# -- every table -----------------------------------------------------------------------------------------------
def summary_table(data: ReportData) -> Table:
    rows = []
    for r in data.rows:
        rows.append([
            r.group, r.base_kind, r.size, r.parameters, r.label, r.method, r.k, r.held_in.n,
            fmt(r.held_in.mean), fmt(r.held_in.std), fmt(r.held_out.mean), fmt(r.held_out.std),
            fmt(r.multitask_held_in.mean), fmt(r.multitask_held_out), fmt(r.delta_held_in), fmt(r.delta_held_out),
            fmt(r.beats_multitask_held_out, 2), f"{r.below_threshold:.2f}", r.worst_category,
            json.dumps([v for v in r.held_in.values]), json.dumps([v for v in r.held_out.values]),
        ])  # fmt: skip
    return Table(
        "summary", "The paper's table: per group, method and k, over seeds",
        ["group", "base_kind", "size", "parameters", "method_label", "method", "k", "seeds", "held_in_mean",
         "held_in_std", "held_out_mean", "held_out_std", "multitask_held_in", "multitask_held_out", "delta_held_in",
         "delta_held_out", "beats_multitask_held_out_share", "tasks_below_0.9", "worst_category", "held_in_per_seed",
         "held_out_per_seed"],
        rows,
        "Normalised scores: held-in ÷ each task's expert, held-out ÷ the base; task → category → mean over "
        "categories, then mean and sample std over seeds (per-seed values kept). delta: merged − multitask.",
    )  # fmt: skip


def baselines_table(data: ReportData) -> Table:
    rows = []
    r = data.results
    for g in data.groups or r.groups:
        b = r.baseline_summary(g.name)
        rows.append([g.name, g.base_kind, g.size, g.parameters, fmt(b.get("base_held_in")), fmt(b.get("base_held_out")),
                     fmt(b.get("multitask_held_in")), fmt(b.get("multitask_held_out"))])  # fmt: skip
    return Table(
        "baselines", "Baselines on the normalised scale (all held-in tasks)",
        ["group", "base_kind", "size", "parameters", "base_held_in", "base_held_out", "multitask_held_in",
         "multitask_held_out"],
        rows, "The base's held-out score is 1 by definition; the experts' held-in score is 1 by definition.",
        numeric={3, 4, 5, 6, 7},
    )  # fmt: skip


def baseline_scores_table(data: ReportData) -> Table:
    r = data.results
    rows = []
    for cell in r.cells:
        if cell.kind == "merge":
            continue
        for task, s in sorted(r.primary(cell.key).items()):
            rows.append([cell.group, cell.kind, cell.task or "", task, s.split, s.metric, fmt(s.score, 4), fmt(s.normalised)])
    return Table(
        "baseline_scores", "Raw test scores of the base, expert and multitask models (primary metric)",
        ["group", "model", "expert_task", "task", "split", "metric", "score", "normalised"], rows,
    )  # fmt: skip


def retention_table(data: ReportData) -> Table:
    rows = [[r.group, r.label, r.k, r.task, fmt(r.retention.mean), fmt(r.retention.std), r.retention.n] for r in data.retention]
    return Table(
        "retention", "Per-task retention (merged ÷ expert) at each group's largest k",
        ["group", "method_label", "k", "task", "retention_mean", "retention_std", "seeds"], rows,
    )  # fmt: skip


def diagnostics_table(data: ReportData) -> Table:
    r = data.results
    rows = []
    for d in r.draws:
        stats = r.diagnostics.get(d.key, {})
        rows.append([
            d.group, d.k, d.seed, ",".join(d.experts), fmt(stats.get(("mean_cosine", "", "")), 4),
            fmt(stats.get(("mean_sign_agreement", "", "")), 4), fmt(stats.get(("mean_relative_distance", "", "")), 4),
            d.bytes_read, fmt(d.merge_s, 3), d.peak_rss,
        ])  # fmt: skip
    return Table(
        "draws", "Draws: experts read once per (group, k, seed), their task-vector diagnostics and cost",
        ["group", "k", "seed", "experts", "mean_cosine", "mean_sign_agreement", "mean_relative_distance", "bytes_read",
         "merge_s", "peak_rss"], rows,
    )  # fmt: skip


def selection_table(data: ReportData) -> Table:
    rows = []
    for c in data.results.merges:
        if not c.selection:
            continue
        chosen = c.selection.get("chosen")
        candidates = c.selection.get("candidates", [])
        val = c.selection.get("validation", [])
        rows.append([c.group, c.label, c.k, c.seed, json.dumps(c.params, sort_keys=True), json.dumps(candidates),
                     json.dumps([round(v, 4) if isinstance(v, float) else v for v in val]),
                     chosen])  # fmt: skip
    return Table(
        "selection", "Hyperparameters selected on validation data, per merge",
        ["group", "method_label", "k", "seed", "chosen_params", "candidates", "validation_scores", "chosen_index"], rows,
    )  # fmt: skip


def findings_table(findings: Sequence[Finding]) -> Table:
    rows = [[f.id, f.paper, f.claim, f.verdict.value, f.measured, f.rule, f.tally] for f in findings]
    return Table("findings", "Findings", ["id", "paper", "claim", "verdict", "measured", "comparisons", "tally"], rows)


def comparisons_table(findings: Sequence[Finding]) -> Table:
    rows = []
    for f in findings:
        for c in f.comparisons:
            rows.append([f.id, c.label, fmt(c.value.mean, 4), fmt(c.value.std, 4), fmt(c.reference.mean, 4),
                         fmt(c.reference.std, 4), fmt(c.delta, 4), fmt(c.threshold, 4), c.outcome_text])  # fmt: skip
    return Table(
        "comparisons", "Every comparison behind the verdicts",
        ["finding", "comparison", "value", "value_std", "reference", "reference_std", "delta_for_claim", "threshold",
         "outcome"], rows,
    )  # fmt: skip


def cost_table(data: ReportData) -> Table:
    c = data.cost
    rows = [
        ["merges evaluated", c.merges, ""],
        ["baseline models evaluated (base, experts, multitask)", c.baselines, ""],
        ["reads (draws; one read feeds every method's merge)", c.reads, ""],
        ["evaluations (model × task × split)", c.evaluations, ""],
        ["bytes read per draw (mean)", fmt(c.bytes_read_mean, 0), human_bytes(c.bytes_read_mean)],
        ["bytes read per draw (largest)", c.bytes_read_max, human_bytes(c.bytes_read_max)],
        ["bytes read in all", c.bytes_read_total, human_bytes(c.bytes_read_total)],
        ["merge time, all draws (s)", fmt(c.merge_s_total, 1), ""],
        ["evaluation time, all models (s)", fmt(c.eval_s_total, 1), ""],
        ["work time, all cells (s; merge share + evaluation, summed over workers)", fmt(c.wall_s_total, 1), ""],
        ["wall time, first to last finished cell (s)", fmt(c.span_s, 0), "per run of the study, summed"],
        ["peak resident memory of a worker", c.peak_rss, human_bytes(c.peak_rss)],
    ]
    return Table("cost", "Cost, from the store", ["quantity", "value", "readable"], rows, numeric={1})


def groups_table(data: ReportData) -> Table:
    rows = [[g.name, kind_name(g.base_kind), g.size, g.parameters, human_count(g.parameters)] for g in data.results.groups]
    return Table("groups", "Models: one group per base (its experts and multitask model)",
                 ["group", "base kind", "size", "parameters", "readable"], rows, numeric={3})  # fmt: skip


def tasks_table(data: ReportData) -> Table:
    rows = [[t.name, t.split.replace("_", "-"), t.category, t.primary_metric or ""] for t in data.results.tasks.values()]
    return Table("tasks", "Tasks", ["task", "split", "category", "primary metric"], rows)


def methods_table(data: ReportData) -> Table:
    """Every method entry of every study's spec, with what validation chose where it chose."""
    chosen: dict[str, Counter] = defaultdict(Counter)
    for c in data.results.merges:
        if c.selection:
            chosen[c.label or c.method or "?"][json.dumps(c.params, sort_keys=True)] += 1
    rows = []
    for study, spec in _specs(data):
        for entry in spec.get("methods", []):
            params = {k: v for k, v in entry.items() if k not in ("method", "select", "label")}
            label = entry.get("label") or _default_label(entry, params)
            picks = ", ".join(f"{p} ×{n}" for p, n in chosen.get(label, Counter()).most_common())
            rows.append([study, entry.get("method"), label, json.dumps(params, sort_keys=True), entry.get("select", "cells"), picks])
    return Table("methods", "Methods and hyperparameters (lists are sweeps)",
                 ["study", "method", "label", "parameters", "select", "chosen on validation (merges)"], rows)  # fmt: skip


def _default_label(entry: dict, params: dict) -> str:
    swept = [k for k, v in params.items() if isinstance(v, list)]
    if entry.get("select") == "validation" and swept:
        return f"{entry.get('method')} ({', '.join(swept)} by validation)"
    return str(entry.get("method"))


def _specs(data: ReportData) -> list[tuple[str, dict]]:
    if data.studies:
        return [(s.results.name, s.results.spec) for s in data.studies]
    return [(data.results.name, data.results.spec)]


def grid_table(data: ReportData) -> Table:
    rows = []
    for study, spec in _specs(data):
        if not spec:
            continue
        source = spec.get("world") or ", ".join(g.get("name", "?") for g in spec.get("groups") or [])
        ev = spec.get("eval") or {}
        rows.append([
            study, source, ", ".join(str(k) for k in spec.get("num_experts", [])),
            ", ".join(str(s) for s in spec.get("seeds", [])), len(spec.get("methods", [])),
            "all" if ev.get("limit") is None else ev.get("limit"), ev.get("backend", ""), ev.get("device", ""),
            "yes" if spec.get("diagnostics", True) else "no",
        ])  # fmt: skip
    return Table("grid", "The grid", ["study", "models from", "k (experts merged)", "seeds", "method entries",
                                      "examples per task", "scorer", "device", "diagnostics"], rows)  # fmt: skip


def studies_table(data: ReportData) -> Table:
    rows = []
    for s in data.studies:
        p = s.provenance
        versions = "; ".join(", ".join(f"{k} {v}" for k, v in sorted(v.items())) for v in p.versions) or "–"
        rows.append([p.name, str(p.study_dir), p.created or "", p.last_finished or "", versions])
    return Table("studies", "Study folders", ["study", "folder", "created", "last cell finished", "versions"], rows)


def pma_tables(data: ReportData) -> list[Table]:
    r = data.results
    out = []
    if r.pma_points:
        rows = [[p.run, p.kind, p.strategy, fmt(p.alpha, 2), p.n, p.interval, p.end_step, fmt(p.loss, 5),
                 fmt(p.last_loss, 5), fmt(p.annealed_loss, 5), fmt(p.recovered, 3), json.dumps(p.scores, sort_keys=True)]
                for p in r.pma_points]  # fmt: skip
        out.append(Table("pma_points", "PMA averages: validation loss beside the last checkpoint and the anneal",
                         ["run", "kind", "strategy", "alpha", "N", "interval", "end_step", "loss", "last_loss",
                          "annealed_loss", "recovered_share", "scores"], rows))  # fmt: skip
    if r.pma_results:
        rows = [[run, e, v, m, fmt(x, 5)] for (run, e, v, m), x in sorted(r.pma_results.items())]
        out.append(Table("pma_results", "PMA-init and spike recovery: final numbers",
                         ["run", "experiment", "variant", "metric", "value"], rows))  # fmt: skip
    if r.pma_curves:
        rows = [[c.run, c.experiment, c.variant, c.step, fmt(c.loss, 5), fmt(c.grad_norm, 5)] for c in r.pma_curves]
        out.append(Table("pma_curves", "PMA-init and spike recovery: per-step training curves",
                         ["run", "experiment", "variant", "step", "loss", "grad_norm"], rows))  # fmt: skip
    return out


def setup_tables(data: ReportData) -> list[Table]:
    tables = [t for t in (studies_table(data), grid_table(data)) if t.rows]
    if data.results.groups:
        tables.append(groups_table(data))
    if data.results.tasks:
        tables.append(tasks_table(data))
    methods = methods_table(data)
    if methods.rows:
        tables.append(methods)
    return tables


def report_tables(data: ReportData, findings: Sequence[Finding]) -> list[Table]:
    """Every table written under ``tables/`` (the setup tables included)."""
    tables = setup_tables(data)
    if data.has_merges:
        tables += [summary_table(data), retention_table(data), diagnostics_table(data)]
        selection = selection_table(data)
        if selection.rows:
            tables.append(selection)
    if data.results.groups:
        tables += [baselines_table(data), baseline_scores_table(data)]
    tables += pma_tables(data)
    tables += [findings_table(findings), comparisons_table(findings), cost_table(data)]
    return tables


def rules_text(rules: Rules) -> str:
    return rules.describe()

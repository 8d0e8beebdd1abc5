"""The papers' figures from a study's records: one function per figure, each returning a matplotlib ``Figure``
(or None when the study holds nothing it could draw), saved as PNG and SVG by :func:`save`.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``: no global figure
registry, no backend switch, nothing that outlives a call (styles are applied inside ``rc_context``).

Conventions shared by every figure: one colour per method entry (spec order), one line per method, mean over
seeds with the sample standard deviation as error bars, the reference models drawn as lines (expert = 1 and the
base on held-in, base = 1 on held-out, the multitask model dashed), panels by base kind (rows) × size (columns),
the legend outside the panels so it never covers data.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from mergescale.report.data import ReportData, human_count, kind_name
from mergescale.study.results import CurvePoint, PMAPoint

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.fonttype": "none",  # text stays text in the SVG: searchable, smaller
    "svg.hashsalt": "mergescale",  # the same figure gives the same SVG
}
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DPI = 120

HELD_IN_AXIS = "held-in score ÷ expert's"
HELD_OUT_AXIS = "held-out score ÷ base's"
K_AXIS = "number of merged experts k"


def styled(make: Callable[..., Figure | None]) -> Callable[..., Figure | None]:
    """Build the figure inside the report's style (rcParams restored afterwards)."""

    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_STYLE):
            return make(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, folder: Path, name: str) -> list[Path]:
    """``folder/name.png`` and ``folder/name.svg``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    with matplotlib.rc_context(_STYLE):
        fig.savefig(paths[0], dpi=DPI, metadata={"Software": "mergescale"})
        # the layout the PNG was drawn with holds for the SVG (it is in points and figure fractions): freezing it
        # saves the constrained-layout solve, a third of the figure's time
        fig.set_layout_engine("none")
        fig.savefig(paths[1], metadata={"Date": None})
    return paths


def method_colors(data: ReportData) -> dict[str, str]:
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(data.labels)}


def wrap(label: str, width: int = 22) -> str:
    return "\n".join(textwrap.wrap(label, width)) or label


def _panel_title(data: ReportData, group_name: str) -> str:
    g = data.results.group(group_name)
    params = f" ({human_count(g.parameters)} params)" if g.parameters else ""
    kind = f" · {kind_name(g.base_kind)} base" if g.base_kind else ""
    name = g.size or g.name
    return f"{name}{params}{kind}" if g.base_kind or name == g.name else f"{g.name}: {name}{params}"


def _offsets(n: int, step: float) -> list[float]:
    """Small x offsets so that the error bars of n lines at the same k do not hide each other."""
    width = 0.12 * step
    return [(i - (n - 1) / 2) * width / max(1, n - 1) * 2 for i in range(n)] if n > 1 else [0.0]


def _k_step(ks: Sequence[int]) -> float:
    return min((b - a for a, b in zip(ks, ks[1:], strict=False)), default=1)


def _legend_below(fig: Figure, handles: list, labels: list[str], ncol: int | None = None) -> None:
    """The legend under the panels, in as many columns as fit the figure's width (it never covers data)."""
    if not handles:
        return
    if ncol is None:
        longest = max(len(lab) for lab in labels)
        column = longest * 0.072 + 0.75  # inches: 9-pt text plus the handle and padding
        ncol = max(1, min(len(handles), int(fig.get_figwidth() // column)))
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)


def _suptitle(fig: Figure, text: str) -> None:
    """A title wrapped to the figure's width (about 11 characters per inch at 11 pt)."""
    fig.suptitle("\n".join(textwrap.wrap(text, int(fig.get_figwidth() * 11))), fontsize=11)


def _collect_legend(axes: Sequence, first: Sequence[str] = ()) -> tuple[list, list[str]]:
    """Unique legend entries of ``axes``, those named in ``first`` (the methods) leading, in that order."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=False):
            seen.setdefault(lab, h)
    order = [lab for lab in first if lab in seen] + [lab for lab in seen if lab not in first]
    return [seen[lab] for lab in order], order


def _panel_grid(data: ReportData, fig: Figure, *, sharey: bool = True):
    """Axes by base kind (rows) × size (columns), and the group each shows (None where no group)."""
    kinds, sizes = data.kinds, data.sizes
    axes = fig.subplots(len(kinds), len(sizes), squeeze=False, sharey=sharey)
    groups = [[data.group_at(kind, size) for size in sizes] for kind in kinds]
    for i, row in enumerate(groups):
        for j, g in enumerate(row):
            if g is None:
                axes[i][j].set_visible(False)
    return axes, groups


# -- figures 1 and 2: normalised score vs k --------------------------------------------------------------------
@styled
def score_vs_k(data: ReportData, split: str) -> Figure | None:
    """Normalised ``split`` score (held_in / held_out) vs k, one line per method, panels by kind × size."""
    if not data.has_merges:
        return None
    ks, labels, colors = data.ks, data.labels, method_colors(data)
    fig = new_figure(max(5.5, 4.3 * len(data.sizes)), 3.1 * len(data.kinds) + 1.4)
    axes, groups = _panel_grid(data, fig)
    offsets = dict(zip(labels, _offsets(len(labels), _k_step(ks)), strict=True))
    for i, row in enumerate(groups):
        for j, g in enumerate(row):
            if g is None:
                continue
            ax = axes[i][j]
            for label in labels:
                rows = [r for r in data.rows_of(g.name, label) if getattr(r, split).mean is not None]
                if not rows:
                    continue
                ax.errorbar(
                    [r.k + offsets[label] for r in rows],
                    [getattr(r, split).mean for r in rows],
                    yerr=[getattr(r, split).std or 0.0 for r in rows],
                    marker="o", ms=4, capsize=3, lw=1.6, color=colors[label], label=label,
                )  # fmt: skip
            all_rows = data.rows_of(g.name)
            by_k = {r.k: r for r in all_rows}
            if split == "held_in":
                ax.axhline(1.0, color="black", lw=0.9, alpha=0.6, label="expert (= 1)")
                mt = [(k, by_k[k].multitask_held_in.mean) for k in ks if k in by_k and by_k[k].multitask_held_in.mean is not None]
                base = [(k, data.base_held_in[(g.name, k)].mean) for k in ks if (g.name, k) in data.base_held_in]
                base = [(k, v) for k, v in base if v is not None]
                if mt:
                    ax.plot(*zip(*mt, strict=True), color="black", ls="--", lw=1.2, label="multitask model (same tasks)")
                if base:
                    ax.plot(*zip(*base, strict=True), color="grey", ls=":", lw=1.6, label="base model (same tasks)")
            else:
                ax.axhline(1.0, color="grey", ls=":", lw=1.6, label="base model (= 1)")
                mt_out = next((r.multitask_held_out for r in all_rows if r.multitask_held_out is not None), None)
                if mt_out is not None:
                    ax.axhline(mt_out, color="black", ls="--", lw=1.2, label="multitask model")
            ax.set_title(_panel_title(data, g.name))
            ax.set_xticks(ks)
            if i == len(groups) - 1 or groups[i + 1][j] is None:
                ax.set_xlabel(K_AXIS)
            if j == 0:
                ax.set_ylabel(HELD_IN_AXIS if split == "held_in" else HELD_OUT_AXIS)
    handles, names = _collect_legend([a for row in axes for a in row], labels)
    _legend_below(fig, handles, names)
    what = "held-in (÷ expert)" if split == "held_in" else "held-out (÷ base)"
    _suptitle(fig, f"Normalised {what} score vs number of merged experts (mean ± std over seeds)")
    return fig


def held_in_vs_k(data: ReportData) -> Figure | None:
    """Figure 1: the paper's main figure, held-in."""
    return score_vs_k(data, "held_in")


def held_out_vs_k(data: ReportData) -> Figure | None:
    """Figure 2: the same for held-out tasks."""
    return score_vs_k(data, "held_out")


# -- figure 3: instruction-tuned vs pre-trained ----------------------------------------------------------------
@styled
def it_vs_pt(data: ReportData) -> Figure | None:
    """IT − PT normalised score vs k, per method (lines) and size (columns), held-in and held-out (rows)."""
    sizes = [s for s in data.sizes if data.group_at("it", s) and data.group_at("pt", s)]
    if not sizes or not data.has_merges:
        return None
    ks, labels, colors = data.ks, data.labels, method_colors(data)
    offsets = dict(zip(labels, _offsets(len(labels), _k_step(ks)), strict=True))
    fig = new_figure(max(5.5, 4.3 * len(sizes)), 6.6)
    axes = fig.subplots(2, len(sizes), squeeze=False, sharey="row")
    for j, size in enumerate(sizes):
        it, pt = data.group_at("it", size), data.group_at("pt", size)
        for i, split in enumerate(("held_in", "held_out")):
            ax = axes[i][j]
            ax.axhline(0.0, color="black", lw=0.9, alpha=0.7, label="no difference")
            for label in labels:
                xs, ys, es = [], [], []
                for k in ks:
                    a, b = data.row(it.name, label, k), data.row(pt.name, label, k)
                    if a is None or b is None:
                        continue
                    va, vb = getattr(a, split), getattr(b, split)
                    if va.mean is None or vb.mean is None:
                        continue
                    xs.append(k + offsets[label])
                    ys.append(va.mean - vb.mean)
                    es.append(math.sqrt((va.std or 0) ** 2 + (vb.std or 0) ** 2))
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, lw=1.6, color=colors[label], label=label)
            g = data.results.group(it.name)
            params = f" ({human_count(g.parameters)} params)" if g.parameters else ""
            ax.set_title(f"{size}{params} · {'held-in' if split == 'held_in' else 'held-out'}")
            ax.set_xticks(ks)
            if i == 1:
                ax.set_xlabel(K_AXIS)
            if j == 0:
                ax.set_ylabel("IT − PT, held-in (÷ expert)" if split == "held_in" else "IT − PT, held-out (÷ base)")
    handles, names = _collect_legend([a for row in axes for a in row], labels)
    _legend_below(fig, handles, names)
    _suptitle(fig, "Instruction-tuned minus pre-trained base — above 0: the IT base merges better (± combined std)")
    return fig


# -- figure 4: spread between methods vs size ------------------------------------------------------------------
@styled
def method_spread_vs_size(data: ReportData) -> Figure | None:
    """Range between the best and worst method's mean score, per base kind, against model size."""
    if len(data.labels) < 2 or not data.has_merges:
        return None
    sizes = data.sizes
    params = {s: next((g.parameters for g in data.groups if (g.size or g.name) == s), None) for s in sizes}
    use_params = all(params[s] for s in sizes)
    fig = new_figure(10.0, 4.4)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    kind_colors = {"pt": "#8c564b", "it": "#1f77b4"}
    for ax, split in zip(axes, ("held_in", "held_out"), strict=True):
        noise = []
        for n, kind in enumerate(data.kinds):
            xs, ys, lo, hi = [], [], [], []
            for s in sizes:
                g = data.group_at(kind, s)
                if g is None:
                    continue
                ranges = []
                for k in data.ks:
                    means = [getattr(r, split).mean for lab in data.labels if (r := data.row(g.name, lab, k))]
                    means = [m for m in means if m is not None]
                    if len(means) >= 2:
                        ranges.append(max(means) - min(means))
                    noise += [getattr(r, split).std for r in data.rows_of(g.name) if getattr(r, split).std is not None]
                if not ranges:
                    continue
                mean = sum(ranges) / len(ranges)
                xs.append(params[s] if use_params else sizes.index(s))
                ys.append(mean)
                lo.append(mean - min(ranges))
                hi.append(max(ranges) - mean)
            if xs:
                color = kind_colors.get(kind, _PALETTE[(n + 4) % len(_PALETTE)])
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=6, capsize=4, lw=1.8, color=color,
                            label=f"{kind_name(kind)} base")  # fmt: skip
        if noise:
            ax.axhline(sum(noise) / len(noise), color="grey", ls=":", lw=1.4, label="typical std over seeds")
        if use_params:
            ax.set_xscale("log")
            ax.set_xticks([params[s] for s in sizes])
            ax.set_xticklabels([f"{s}\n{human_count(params[s])}" for s in sizes])
            ax.minorticks_off()
            ax.set_xlabel("model size (parameters, log scale)")
        else:
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels(sizes)
            ax.set_xlabel("model size")
        ax.set_ylim(bottom=0)
        ax.set_title("held-in (÷ expert)" if split == "held_in" else "held-out (÷ base)")
        ax.set_ylabel("best − worst method (normalised)")
    handles, names = _collect_legend(axes)
    _legend_below(fig, handles, names)
    _suptitle(fig, "Spread between methods vs model size — mean over k, bars: smallest to largest k's spread")
    return fig


# -- figure 5: merged vs multitask -----------------------------------------------------------------------------
@styled
def merged_vs_multitask(data: ReportData) -> Figure | None:
    """Merged − multitask (same tasks) vs k, per method, held-in and held-out (rows) per group (columns)."""
    if not data.has_merges or all(r.delta_held_in is None and r.delta_held_out is None for r in data.rows):
        return None
    groups, ks, labels, colors = data.groups, data.ks, data.labels, method_colors(data)
    offsets = dict(zip(labels, _offsets(len(labels), _k_step(ks)), strict=True))
    fig = new_figure(max(6.0, 3.4 * len(groups)), 6.4)
    axes = fig.subplots(2, len(groups), squeeze=False, sharey="row")
    for j, g in enumerate(groups):
        for i, (split, attr) in enumerate((("held_in", "delta_held_in"), ("held_out", "delta_held_out"))):
            ax = axes[i][j]
            ax.axhline(0.0, color="black", ls="--", lw=1.2, label="multitask model (= 0)")
            for label in labels:
                rows = [r for r in data.rows_of(g.name, label) if getattr(r, attr) is not None]
                if rows:
                    ax.errorbar([r.k + offsets[label] for r in rows], [getattr(r, attr) for r in rows],
                                yerr=[getattr(r, split).std or 0.0 for r in rows], marker="o", ms=4, capsize=3,
                                lw=1.6, color=colors[label], label=label)  # fmt: skip
            title = _panel_title(data, g.name).replace(" params)", ")")
            ax.set_title(wrap(title, 30), fontsize=9.5)
            ax.set_xticks(ks)
            if i == 1:
                ax.set_xlabel(K_AXIS)
            if j == 0:
                ax.set_ylabel("merged − multitask,\nheld-in (÷ expert)" if i == 0 else "merged − multitask,\nheld-out (÷ base)")
    handles, names = _collect_legend([a for row in axes for a in row], labels)
    _legend_below(fig, handles, names)
    _suptitle(fig, "Merged model minus the multitask model — above 0: the merge is better (± std over seeds)")
    return fig


# -- figure 6: retention heat map ------------------------------------------------------------------------------
@styled
def retention_heatmap(data: ReportData) -> Figure | None:
    """Per held-in task, merged ÷ expert at each group's largest k (mean over seeds), methods as rows."""
    if not data.retention:
        return None
    tasks = [t for t in data.results.held_in if any(r.task == t for r in data.retention)]
    labels = data.labels
    values = {(r.group, r.label, r.task): r.retention.mean for r in data.retention}
    finite = [v for v in values.values() if v is not None]
    vmax = max(1.1, max(finite) if finite else 1.1)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=0.9, vmax=vmax)
    fig = new_figure(max(6.5, 5.2 * len(data.sizes)), (0.42 * len(labels) + 1.9) * len(data.kinds) + 1.0)
    axes, groups = _panel_grid(data, fig, sharey=False)
    image = None
    for i, row in enumerate(groups):
        for j, g in enumerate(row):
            if g is None:
                continue
            ax = axes[i][j]
            ax.grid(False)
            matrix = [[values.get((g.name, lab, t)) for t in tasks] for lab in labels]
            grid = [[math.nan if v is None else v for v in line] for line in matrix]
            image = ax.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto")
            for a, line in enumerate(matrix):
                for b, v in enumerate(line):
                    if v is not None:
                        ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if v < 0.35 or v > 1.05 * vmax else "black")  # fmt: skip
            ks = {r.k for r in data.retention if r.group == g.name}
            ax.set_title(f"{_panel_title(data, g.name)} · k={max(ks)}")
            ax.set_xticks(range(len(tasks)))
            ax.set_xticklabels(tasks, rotation=35, ha="right", rotation_mode="anchor")
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels([wrap(lab, 20) for lab in labels] if j == 0 else [""] * len(labels))
    if image is not None:
        bar = fig.colorbar(image, ax=[a for row in axes for a in row if a.get_visible()], shrink=0.8)
        bar.set_ticks([t for t in (0.0, 0.3, 0.6, 0.9, 1.0, 1.2, 1.5, 2.0) if t <= vmax])
        bar.set_label("retention = merged ÷ expert (0.9: the paper's threshold)")
    _suptitle(fig, "Per-task retention at the largest number of merged experts (mean over seeds; blank: task not merged)")
    return fig


# -- figure 7: diagnostics vs held-in --------------------------------------------------------------------------
def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


@styled
def diagnostics_vs_retention(data: ReportData) -> Figure | None:
    """Each merge's held-in score against its draw's mean pairwise cosine and sign agreement of task vectors."""
    points = [p for p in data.diagnostic_points if p.held_in is not None]
    if not points:
        return None
    colors = method_colors(data)
    ks = sorted({p.k for p in points})
    markers = {k: _MARKERS[i % len(_MARKERS)] for i, k in enumerate(ks)}
    fig = new_figure(10.5, 5.8)
    axes = fig.subplots(1, 2, squeeze=False, sharey=True)[0]
    stats = (("mean_cosine", "mean pairwise cosine of task vectors", "cos"),
             ("mean_sign_agreement", "mean pairwise sign agreement", "sign"))  # fmt: skip
    correlations: dict[str, list[str]] = defaultdict(list)
    for ax, (attr, xlabel, short) in zip(axes, stats, strict=True):
        for label in data.labels:
            mine = [p for p in points if p.label == label and getattr(p, attr) is not None]
            for k in ks:
                at_k = [p for p in mine if p.k == k]
                if at_k:
                    ax.scatter([getattr(p, attr) for p in at_k], [p.held_in for p in at_k], color=colors[label],
                               marker=markers[k], s=26, alpha=0.75, edgecolors="none")  # fmt: skip
            r = _pearson([getattr(p, attr) for p in mine], [p.held_in for p in mine])
            if r is not None:
                correlations[label].append(f"r {short} {r:+.2f}")
        ax.axhline(1.0, color="black", lw=0.9, alpha=0.6)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(HELD_IN_AXIS)
    handles = [
        Line2D([], [], color=colors[lab], marker="o", ls="",
               label=lab + (f" ({', '.join(correlations[lab])})" if correlations[lab] else ""))
        for lab in data.labels
    ]  # fmt: skip
    handles += [Line2D([], [], color="grey", marker=markers[k], ls="", label=f"k = {k}") for k in ks]
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=2)
    _suptitle(fig, "Task-vector diagnostics of each draw vs the merge's held-in score (r: Pearson correlation per method)")
    return fig


# -- figure 8: pre-training model averaging --------------------------------------------------------------------
def _series_key(p: PMAPoint) -> tuple:
    return (p.strategy, p.alpha if p.strategy == "ema" else None, p.n, p.interval)


def _series_label(key: tuple) -> str:
    strategy, alpha, n, interval = key
    name = strategy.upper() + (f" α={alpha:g}" if alpha is not None else "")
    return f"{name}, N={n}" + (f", V={interval}" if interval else "")


@styled
def pma_loss_curve(data: ReportData) -> Figure | None:
    """Validation loss vs step along each run: last checkpoint, each average series, the annealed model."""
    along = [p for p in data.results.pma_points if p.kind == "along" and p.loss is not None]
    if not along:
        return None
    runs = sorted({p.run for p in along})
    fig = new_figure(max(6.0, 5.6 * len(runs)), 4.8)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs, strict=True):
        mine = sorted((p for p in along if p.run == run), key=lambda p: p.end_step)
        last = sorted({(p.end_step, p.last_loss) for p in mine if p.last_loss is not None})
        if last:
            ax.plot(*zip(*last, strict=True), color="black", lw=2.0, marker=".", label="last checkpoint")
        series: dict[tuple, list[PMAPoint]] = defaultdict(list)
        for p in mine:
            series[_series_key(p)].append(p)
        for n, (key, pts) in enumerate(sorted(series.items(), key=lambda kv: repr(kv[0]))):
            ax.plot([p.end_step for p in pts], [p.loss for p in pts], color=_PALETTE[n % len(_PALETTE)], lw=1.4,
                    marker=".", ms=4, label=_series_label(key))  # fmt: skip
        # one annealed model per run (the run's end, annealed): a reference level, drawn once at the last step
        annealed = sorted({(p.end_step, p.annealed_loss) for p in mine if p.annealed_loss is not None})
        if annealed:
            level = annealed[-1][1]
            ax.axhline(level, color="#d4a017", lw=1.2, ls="--", zorder=1)
            ax.scatter([mine[-1].end_step], [level], marker="*", s=180, color="#d4a017", edgecolors="black",
                       zorder=5, label="annealed model (end of the run)")  # fmt: skip
        ax.set_title(f"run {run}")
        ax.set_xlabel("training step (end of the averaged window)")
        ax.set_ylabel("validation loss (nats / token)")
    handles, names = _collect_legend(axes)
    _legend_below(fig, handles, names)
    _suptitle(fig, "Pre-training model averaging along the run: the average vs the last checkpoint and the anneal")
    return fig


@styled
def pma_ablation(data: ReportData) -> Figure | None:
    """Window ablation: loss vs N per strategy (colour) and interval (line style), one panel per (run, end step)."""
    pts = [p for p in data.results.pma_points if p.kind == "ablation" and p.loss is not None]
    if not pts:
        return None
    panels = sorted({(p.run, p.end_step) for p in pts})
    strategies = sorted({(p.strategy, p.alpha if p.strategy == "ema" else None) for p in pts}, key=repr)
    intervals = sorted({p.interval for p in pts})
    styles = ["-", "--", ":", "-."]
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(4.6 * cols + 0.6, 3.5 * rows + 1.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for idx, (run, end) in enumerate(panels):
        ax = axes[idx // cols][idx % cols]
        here = [p for p in pts if (p.run, p.end_step) == (run, end)]
        for si, (strategy, alpha) in enumerate(strategies):
            for vi, interval in enumerate(intervals):
                line = sorted((p for p in here if (p.strategy, p.alpha if p.strategy == "ema" else None) == (strategy, alpha)
                               and p.interval == interval), key=lambda p: p.n)  # fmt: skip
                if not line:
                    continue
                name = strategy.upper() + (f" α={alpha:g}" if alpha is not None else "")
                label = name + (f", V={interval}" if len(intervals) > 1 and interval else "")
                ax.plot([p.n for p in line], [p.loss for p in line], color=_PALETTE[si % len(_PALETTE)],
                        ls=styles[vi % len(styles)], marker=_MARKERS[si % len(_MARKERS)], ms=5, label=label)  # fmt: skip
        last = [p.last_loss for p in here if p.last_loss is not None]
        if last:
            ax.axhline(last[0], color="black", lw=1.2, ls="--", label="last checkpoint")
        ax.set_xticks(sorted({p.n for p in here}))
        ax.set_title(f"run {run} · step {end}")
        ax.set_xlabel("checkpoints averaged N")
        ax.set_ylabel("validation loss (nats / token)")
    for idx in range(len(panels), rows * cols):
        axes[idx // cols][idx % cols].set_visible(False)
    handles, names = _collect_legend([a for row in axes for a in row])
    _legend_below(fig, handles, names)
    _suptitle(fig, "Window ablation: number of checkpoints N × interval V × strategy, early to late in training")
    return fig


def _curves(data: ReportData, experiment: str) -> dict[str, dict[str, list[CurvePoint]]]:
    out: dict[str, dict[str, list[CurvePoint]]] = defaultdict(lambda: defaultdict(list))
    for c in data.results.pma_curves:
        if c.experiment == experiment:
            out[c.run][c.variant].append(c)
    return {run: {v: sorted(cs, key=lambda c: c.step) for v, cs in by.items()} for run, by in out.items()}


_SPIKE_STYLE = {
    "spiked": ("#d62728", "spiked run (no recovery)"),
    "rollback": ("#7f7f7f", "rollback to the last pre-spike checkpoint"),
    "average": ("#1f77b4", "resumed from the average of pre-spike checkpoints"),
    "unspiked": ("black", "unspiked control"),
}


@styled
def pma_spike(data: ReportData) -> Figure | None:
    """Spike recovery: training loss vs step of the spiked run, the rollback, the average and the control."""
    curves = _curves(data, "spike")
    if not curves:
        return None
    runs = sorted(curves)
    fig = new_figure(max(6.0, 5.6 * len(runs)), 4.6)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs, strict=True):
        for n, (variant, cs) in enumerate(sorted(curves[run].items(), key=lambda kv: list(_SPIKE_STYLE).index(kv[0]) if kv[0] in _SPIKE_STYLE else 9)):
            pts = [(c.step, c.loss) for c in cs if c.loss is not None]
            if not pts:
                continue
            color, label = _SPIKE_STYLE.get(variant, (_PALETTE[n % len(_PALETTE)], variant))
            ax.plot(*zip(*pts, strict=True), color=color, lw=1.6 if variant != "unspiked" else 1.1,
                    ls="--" if variant == "unspiked" else "-", label=label)  # fmt: skip
        for (r, e, _variant, metric), value in sorted(data.results.pma_results.items()):
            if r == run and e == "spike" and metric.endswith("step") and value is not None:
                ax.axvline(value, color="#d62728", lw=0.9, ls=":", alpha=0.8, label=f"{metric.replace('_', ' ')}")
        ax.set_yscale("log")
        # plain numbers on the log axis (2, 3, 5 rather than 2×10⁰); minor labels only where few fit
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_title(f"run {run}")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (nats / token, log scale)")
    handles, names = _collect_legend(axes)
    _legend_below(fig, handles, names, ncol=2)
    _suptitle(fig, "Recovering from a loss spike: average of the checkpoints before it vs rolling back")
    return fig


@styled
def pma_init(data: ReportData) -> Figure | None:
    """PMA-init: loss (top) and gradient norm (bottom) vs step, from the PMA model and from the last checkpoint."""
    curves = _curves(data, "pma_init")
    if not curves:
        return None
    runs = sorted(curves)
    fig = new_figure(max(6.0, 5.6 * len(runs)), 6.2)
    axes = fig.subplots(2, len(runs), squeeze=False, sharex="col")
    style = {"pma": ("#1f77b4", "from the PMA model (PMA-init)"), "last": ("#7f7f7f", "from the last checkpoint")}
    for j, run in enumerate(runs):
        for variant, cs in sorted(curves[run].items()):
            color, label = style.get(variant, ("#2ca02c", variant))
            loss = [(c.step, c.loss) for c in cs if c.loss is not None]
            grad = [(c.step, c.grad_norm) for c in cs if c.grad_norm is not None]
            if loss:
                axes[0][j].plot(*zip(*loss, strict=True), color=color, lw=1.5, label=label)
            if grad:
                axes[1][j].plot(*zip(*grad, strict=True), color=color, lw=1.2, label=label)
        axes[0][j].set_title(f"run {run}")
        axes[0][j].set_ylabel("training loss (nats / token)")
        axes[1][j].set_ylabel("gradient norm (before clipping)")
        axes[1][j].set_xlabel("training step")
    handles, names = _collect_legend([a for row in axes for a in row])
    _legend_below(fig, handles, names, ncol=2)
    _suptitle(fig, "PMA-init: continued training from the average vs from the last checkpoint")
    return fig


# -- the catalogue ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureSpec:
    name: str  # file stem under figures/
    number: str
    title: str
    caption: str
    make: Callable[[ReportData], Figure | None]
    needs: str  # what the study must hold for it (shown when absent)


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "held_in_vs_k", "1", "Held-in score vs number of merged experts",
        "The paper's main figure. Each panel is one base model (rows: pre-trained, instruction-tuned; columns: "
        "sizes, smallest first); each line one merging method. y: the merged model's score on the tasks of the "
        "experts it contains, each divided by that task's own expert (1 = as good as the specialists), averaged "
        "within then over task categories; points: mean over seeds (which experts are merged), bars: sample "
        "std. Black line: the experts (= 1); dashed: the multitask model on the same tasks; dotted: the base "
        "model on the same tasks. A line falling with k is merging losing held-in skill as experts are added.",
        held_in_vs_k, "merges with held-in scores",
    ),
    FigureSpec(
        "held_out_vs_k", "2", "Held-out score vs number of merged experts",
        "As figure 1 for the held-out tasks (never trained on by any expert): each task's score divided by the "
        "base model's (dotted line at 1). Above 1, merging improved zero-shot generalisation; dashed: the "
        "multitask model.",
        held_out_vs_k, "merges with held-out scores",
    ),
    FigureSpec(
        "it_vs_pt", "3", "Instruction-tuned vs pre-trained base",
        "Per size (columns) and method (lines): the instruction-tuned group's normalised score minus the "
        "pre-trained group's at each k, held-in (top) and held-out (bottom). Above 0 the instruction-tuned base "
        "merges better (the paper's finding 1). Bars: √(std²IT + std²PT) over seeds.",
        it_vs_pt, "groups of both base kinds at one size",
    ),
    FigureSpec(
        "method_spread_vs_size", "4", "Spread between methods vs model size",
        "Do methods converge at scale? For each base kind and size: the best method's mean normalised score "
        "minus the worst's, averaged over k (bars: the smallest and largest spread over k). Dotted: the typical "
        "std over seeds; a spread below it means the methods cannot be told apart. The paper (finding 5) sees "
        "the spread shrink with size for instruction-tuned bases.",
        method_spread_vs_size, "at least two methods",
    ),
    FigureSpec(
        "merged_vs_multitask", "5", "Merged vs multitask model",
        "Per group (columns): the merged model's normalised score minus the multitask model's (trained on all "
        "held-in tasks at once; held-in compared on the same tasks), per method and k, held-in (top) and "
        "held-out (bottom). Above the dashed 0 line the merge beats the multitask model (finding 6 for "
        "held-out). Bars: std over seeds of the merged score.",
        merged_vs_multitask, "a multitask model",
    ),
    FigureSpec(
        "retention_heatmap", "6", "Per-task retention at the largest k",
        "Per group (panels), method (rows) and held-in task (columns): the merged model's score on the task "
        "divided by the task's expert, at the group's largest number of merged experts, mean over seeds. Red "
        "below 0.9 (the paper's appendix counts these tasks), green above; blank where the task was not merged.",
        retention_heatmap, "merges with held-in scores",
    ),
    FigureSpec(
        "diagnostics_vs_retention", "7", "Task-vector diagnostics vs held-in score",
        "Each point is one merge: x, a statistic of its draw's task vectors τᵢ = θᵢ − θ_base (left: mean pairwise "
        "cosine; right: mean pairwise sign agreement, the share of entries where two experts move the same "
        "way); y, its held-in score ÷ expert. Colour: method; marker: k. r: Pearson correlation per method. "
        "Cheap diagnostics that predict interference would show a clear trend.",
        diagnostics_vs_retention, "task-vector diagnostics (spec 'diagnostics: true') and k ≥ 2",
    ),
    FigureSpec(
        "pma_loss_curve", "8a", "PMA along the run",
        "Pre-training model averaging (Li et al. 2025). Validation loss against the training step at which the "
        "averaged window ends: the last checkpoint at that step (black), each averaging series (strategy SMA / "
        "EMA α / WMA, N checkpoints, interval V), and the annealed model (star). Below the black line the "
        "average beats the last checkpoint.",
        pma_loss_curve, "PMA points along a run (pma_points, kind 'along')",
    ),
    FigureSpec(
        "pma_ablation", "8b", "PMA window × interval ablation",
        "Validation loss of the average against the number of checkpoints N, per strategy (colour) and interval "
        "V (line style), one panel per run and end step (early to late). Dashed: the last checkpoint at that "
        "step. The paper: large N hurts early and helps late; WMA best early; EMA α = 0.2 better than 0.1.",
        pma_ablation, "PMA ablation points (pma_points, kind 'ablation')",
    ),
    FigureSpec(
        "pma_spike", "8c", "Spike recovery",
        "Training loss (log scale) of a run with a deliberate loss spike, of its continuation from the last "
        "pre-spike checkpoint (rollback) and from the average of the checkpoints before the spike, and of the "
        "unspiked control; dotted verticals: the spike's injected / detected steps.",
        pma_spike, "spike-recovery curves (pma_curves, experiment 'spike')",
    ),
    FigureSpec(
        "pma_init", "8d", "PMA-init",
        "Continued training initialised from the PMA model vs from the last checkpoint: training loss (top) and "
        "gradient norm before clipping (bottom) at each step. The paper reports smoother gradient norms from "
        "PMA-init.",
        pma_init, "PMA-init curves (pma_curves, experiment 'pma_init')",
    ),
)

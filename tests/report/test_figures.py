"""The figures checked for content on synthetic studies: panels, axis labels, one line per method, the plotted
values equal to the study's numbers, references drawn; and nothing drawn where the study holds no data."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from synthetic import GROUPS, METHODS, merging_study, paper_like, pma_study

from mergescale.report import figures as F
from mergescale.report.data import prepare


@pytest.fixture(scope="module")
def merging():
    return prepare(merging_study(paper_like))


@pytest.fixture(scope="module")
def pma():
    return prepare(pma_study(runs=("s", "m")))


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def method_lines(ax) -> dict[str, ErrorbarContainer]:
    return {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}


def ydata(line) -> np.ndarray:
    return np.asarray(line.get_ydata(), dtype=float)


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_held_in_vs_k_has_a_panel_per_group_and_a_line_per_method_with_the_study_values(merging) -> None:
    fig = F.held_in_vs_k(merging)
    axes = visible_axes(fig)
    assert len(axes) == len(GROUPS)
    titles = sorted(ax.get_title() for ax in axes)
    assert titles == sorted(
        f"{g.size} ({'1M' if g.size == 's' else '8M'} params) · "
        f"{'pre-trained' if g.kind == 'pt' else 'instruction-tuned'} base"
        for g in GROUPS
    )  # fmt: skip
    for ax in axes:
        lines = method_lines(ax)
        assert sorted(lines) == sorted(METHODS)
        group = next(g for g in GROUPS if ax.get_title().startswith(g.size) and ("pre" in ax.get_title()) == (g.kind == "pt"))
        line = lines["ties"].lines[0]
        expected = [merging.row(group.name, "ties", k).held_in.mean for k in merging.ks]
        np.testing.assert_allclose(ydata(line), expected)
        # the x offset keeps each k within a tenth of a step of its value
        np.testing.assert_allclose(np.asarray(line.get_xdata(), dtype=float), merging.ks, atol=0.5)
        labels = ax.get_legend_handles_labels()[1]
        assert {"expert (= 1)", "multitask model (same tasks)", "base model (same tasks)"} <= set(labels)
        base = next(li for li in ax.get_lines() if li.get_label() == "base model (same tasks)")
        np.testing.assert_allclose(ydata(base), 0.3)  # the synthetic base: 0.3 of each expert
        # the seed spread is drawn: error bars of the synthetic std (0.01)
        segments = lines["ties"].lines[2][0].get_segments()
        assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([0.02] * len(merging.ks))
    bottom = [ax for ax in axes if ax.get_xlabel()]
    assert {ax.get_xlabel() for ax in bottom} == {F.K_AXIS} and len(bottom) == len(merging.sizes)
    assert {ax.get_ylabel() for ax in axes if ax.get_ylabel()} == {F.HELD_IN_AXIS}
    assert set(METHODS) <= set(legend_texts(fig))
    assert fig._suptitle is not None and "held-in" in fig._suptitle.get_text()


def test_held_out_vs_k_draws_the_base_at_one_and_the_multitask_model(merging) -> None:
    fig = F.held_out_vs_k(merging)
    for ax in visible_axes(fig):
        assert sorted(method_lines(ax)) == sorted(METHODS)
        refs = {li.get_label(): li.get_ydata() for li in ax.get_lines() if not li.get_label().startswith("_")}
        assert refs["base model (= 1)"][0] == 1.0
        assert refs["multitask model"][0] == pytest.approx(1.15)
        assert ax.get_ylabel() in ("", F.HELD_OUT_AXIS)


def test_it_vs_pt_plots_the_difference_per_method_and_size(merging) -> None:
    fig = F.it_vs_pt(merging)
    axes = visible_axes(fig)
    assert len(axes) == 2 * len(merging.sizes)
    ax = axes[0]  # held-in, smallest size
    line = method_lines(ax)["linear"].lines[0]
    expected = [merging.row("s-it", "linear", k).held_in.mean - merging.row("s-pt", "linear", k).held_in.mean for k in merging.ks]
    np.testing.assert_allclose(ydata(line), expected)
    assert all(v > 0 for v in expected)
    assert "IT − PT" in ax.get_ylabel()


def test_method_spread_vs_size_has_a_line_per_base_kind(merging) -> None:
    fig = F.method_spread_vs_size(merging)
    axes = visible_axes(fig)
    assert len(axes) == 2
    for ax in axes:
        lines = method_lines(ax)
        assert sorted(lines) == ["instruction-tuned base", "pre-trained base"]
        assert ax.get_xscale() == "log" and "parameters" in ax.get_xlabel()
        assert ax.get_ylabel() == "best − worst method (normalised)"
    it = ydata(method_lines(axes[0])["instruction-tuned base"].lines[0])
    assert it[1] < it[0]  # paper_like: methods converge at the larger instruction-tuned size


def test_merged_vs_multitask_shows_the_delta_per_group(merging) -> None:
    fig = F.merged_vs_multitask(merging)
    axes = visible_axes(fig)
    assert len(axes) == 2 * len(GROUPS)
    line = method_lines(axes[0])["linear"].lines[0]
    group = merging.groups[0].name
    np.testing.assert_allclose(ydata(line), [r.delta_held_in for r in merging.rows_of(group, "linear")])


def test_retention_heatmap_has_a_panel_per_group_with_methods_by_tasks(merging) -> None:
    fig = F.retention_heatmap(merging)
    axes = visible_axes(fig)
    assert len(axes) == len(GROUPS)
    image = axes[0].get_images()[0].get_array()
    assert image.shape == (len(METHODS), 8)
    group = merging.groups[0].name
    expected = next(r.retention.mean for r in merging.retention if r.group == group and r.label == "linear" and r.task == "t1")
    assert image[0, 0] == pytest.approx(expected)
    assert [t.get_text() for t in axes[0].get_xticklabels()][:2] == ["t1", "t2"]
    assert any("retention" in ax.get_ylabel() for ax in fig.axes)  # the colour bar says what the colours are


def test_diagnostics_vs_retention_scatters_every_merge(merging) -> None:
    fig = F.diagnostics_vs_retention(merging)
    axes = visible_axes(fig)
    assert [ax.get_xlabel() for ax in axes] == ["mean pairwise cosine of task vectors", "mean pairwise sign agreement"]
    n_points = sum(len(c.get_offsets()) for c in axes[0].collections)
    assert n_points == len(merging.results.merges)
    texts = legend_texts(fig)
    assert any(t.startswith("linear (r cos") for t in texts)


def test_pma_figures_have_a_panel_per_run_and_the_references(pma) -> None:
    fig = F.pma_loss_curve(pma)
    axes = visible_axes(fig)
    assert len(axes) == 2
    labels = axes[0].get_legend_handles_labels()[1]
    assert labels[0] == "last checkpoint" and "annealed model (end of the run)" in labels
    assert {"SMA, N=4", "EMA α=0.2, N=4", "WMA, N=4"} <= set(labels)
    assert axes[0].get_ylabel().startswith("validation loss")

    fig = F.pma_ablation(pma)
    axes = visible_axes(fig)
    assert len(axes) == 4  # 2 runs x 2 end steps
    assert {ax.get_xlabel() for ax in axes} == {"checkpoints averaged N"}
    assert set(axes[0].get_legend_handles_labels()[1]) == {"SMA", "EMA α=0.2", "EMA α=0.1", "WMA", "last checkpoint"}

    fig = F.pma_spike(pma)
    labels = visible_axes(fig)[0].get_legend_handles_labels()[1]
    assert len([lab for lab in labels if "spike" in lab or "average" in lab or "control" in lab]) >= 4
    assert "injected step" in labels

    fig = F.pma_init(pma)
    axes = visible_axes(fig)
    assert len(axes) == 4  # loss and gradient norm (rows) per run (columns)
    assert [ax.get_ylabel() for ax in axes[::2]] == ["training loss (nats / token)", "gradient norm (before clipping)"]


def test_figures_without_data_are_not_drawn(merging, pma) -> None:
    for make in (F.held_in_vs_k, F.held_out_vs_k, F.it_vs_pt, F.method_spread_vs_size, F.merged_vs_multitask,
                 F.retention_heatmap, F.diagnostics_vs_retention):  # fmt: skip
        assert make(pma) is None, make.__name__
    for make in (F.pma_loss_curve, F.pma_ablation, F.pma_spike, F.pma_init):
        assert make(merging) is None, make.__name__
    pt_only = prepare(merging_study(paper_like, groups=[g for g in GROUPS if g.kind == "pt"], diagnostics=False))
    assert F.it_vs_pt(pt_only) is None
    assert F.diagnostics_vs_retention(pt_only) is None
    assert len(visible_axes(F.held_in_vs_k(pt_only))) == 2


def test_save_writes_png_and_svg_and_leaves_matplotlib_settings_alone(merging, tmp_path: Path) -> None:
    before = dict(matplotlib.rcParams)
    fig = F.held_in_vs_k(merging)
    png, svg = F.save(fig, tmp_path, "held_in_vs_k")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert svg.read_text().lstrip().startswith("<?xml") and "held-in" in svg.read_text()
    assert dict(matplotlib.rcParams) == before
    import sys

    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()

"""A study end to end on the micro world: the table, its numbers against an independent merge and evaluation,
shared draws and reads, selection on validation, resume, changed entries, executors and the memory budget."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from study_helpers import METHODS, spec_dict, table
from typer.testing import CliRunner

from mergescale.api import merge_to_memory
from mergescale.evaluate import evaluate, load_suite
from mergescale.io.checkpoint import open_checkpoint
from mergescale.study import load_study, run_study
from mergescale.study.grid import draw_experts
from mergescale.world.tasks import HELD_IN

pytestmark = pytest.mark.slow  # the micro world (~20 s) and a study (~15 s)


def test_the_table_is_complete_and_a_rerun_does_nothing(micro_study: Path, write_spec) -> None:
    results = load_study(micro_study)
    assert [g.name for g in results.groups] == ["xs-pt", "xs-it"]
    merges = results.merges
    assert len(merges) == 2 * len(METHODS) * 2 * 2  # groups x methods x k x seeds
    assert sum(c.kind != "merge" for c in results.cells) == 2 * (1 + len(HELD_IN) + 1)
    summary = results.summary()
    assert len(summary) == 2 * len(METHODS) * 2
    for row in summary:
        assert row.held_in.n == 2 and row.held_out.n == 2
        assert row.held_in.mean is not None and row.held_out.mean is not None
    before = table(micro_study)
    summary_again = run_study(write_spec(), micro_study)
    assert summary_again.ran == 0 and summary_again.cached == summary_again.cells
    assert table(micro_study) == before


def test_draws_are_shared_by_methods_and_groups_and_read_once(micro_study: Path, micro_world: Path) -> None:
    results = load_study(micro_study)
    for cell in results.merges:
        assert cell.experts == draw_experts(list(HELD_IN), cell.k, cell.seed)
    assert draw_experts(list(HELD_IN), 8, 0) == tuple(HELD_IN)
    assert len({draw_experts(list(HELD_IN), 2, seed) for seed in range(6)}) > 1  # seeds draw (mostly) other sets
    for draw in results.draws:  # one read of the base and the k experts, whatever the number of methods
        kind = draw.group.split("-")[1]
        folders = [micro_world / f"models/xs/{kind}/base"] + [
            micro_world / f"models/xs/{kind}/experts/{t}" for t in draw.experts
        ]
        expected = 0
        for folder in folders:
            source = open_checkpoint(folder)
            expected += sum(i.nbytes for n, i in source.info().items() if n != "lm_head.weight")
            source.close()
        assert draw.bytes_read == expected, draw
        assert draw.plans == 1
    first_draw = [c for c in results.merges if c.k == 2 and c.seed == 0 and c.group == "xs-pt"]
    assert len({c.draw_key for c in first_draw}) == 1 and len(first_draw) == len(METHODS)


def _independent_scores(world: Path, group: str, cell, params: dict) -> dict[str, float]:
    """Merge with the public API and evaluate the merged model in memory, on the cell's tasks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size, kind = group.split("-")
    models = world / f"models/{size}/{kind}"
    method = cell.method
    model_keys = {"weight", "density"}
    config = {
        "merge_method": method,
        "models": [
            {"model": str(models / "experts" / t), "parameters": {"weight": 1.0} | {k: v for k, v in params.items() if k in model_keys}}
            for t in cell.experts
        ],
        "seed": cell.seed,
    }
    if method != "linear":
        config["base_model"] = str(models / "base")
    else:
        config["models"] = [{"model": m["model"], "parameters": {"weight": 1.0}} for m in config["models"]]
    globals_ = {k: v for k, v in params.items() if k not in model_keys}
    if globals_:
        config["parameters"] = globals_
    state = merge_to_memory(config).state_dict
    model = AutoModelForCausalLM.from_pretrained(models / "base")
    model.load_state_dict(state, strict=False)
    tok = AutoTokenizer.from_pretrained(models / "base")
    suite = load_suite(world / "tasks/suite.yaml")
    tasks = [suite.task(t) for t in (*cell.experts, *[t.name for t in suite.held_out])]
    out = evaluate(model, tasks, tokenizer=tok, limit=4, batch_size=8, progress=False)
    return {name: r.metrics[r.primary_metric] for name, r in out.tasks.items()}


def test_scores_equal_an_independent_merge_and_evaluation(micro_study: Path, micro_world: Path) -> None:
    results = load_study(micro_study)
    for method in ("ties", "linear", "dare_ties"):
        cell = next(c for c in results.merges if c.method == method and c.k == 2 and c.seed == 1)
        expected = _independent_scores(micro_world, cell.group, cell, cell.params)
        got = {t: s.score for t, s in results.primary(cell.key).items()}
        assert got == pytest.approx(expected, rel=1e-6), method
        expert_scores = {
            t: results.primary(results.baseline(cell.group, "expert", t).key)[t].score for t in cell.experts
        }
        base = results.primary(results.baseline(cell.group, "base").key)
        for t, s in results.primary(cell.key).items():
            ref = expert_scores[t] if t in cell.experts else base[t].score
            assert s.normalised == (pytest.approx(s.score / ref) if ref else None)


def test_selection_on_validation_picks_the_best_and_reports_its_test_score(micro_study: Path, micro_world: Path) -> None:
    results = load_study(micro_study)
    cells = [c for c in results.merges if c.method == "task_arithmetic"]
    assert cells and all(c.selection for c in cells)
    for cell in cells:
        sel = cell.selection
        assert [c["lambda"] for c in sel["candidates"]] == [0.5, 1.0]
        values = sel["validation"]
        best = max(range(len(values)), key=lambda i: (values[i] if values[i] is not None else float("-inf"), -i))
        assert sel["chosen"] == best
        assert cell.params == sel["candidates"][best]
    # the reported test scores are the chosen merge's, and its validation ratio is recomputed independently
    cell = cells[0]
    expected = _independent_scores(micro_world, cell.group, cell, cell.params)
    assert {t: s.score for t, s in results.primary(cell.key).items()} == pytest.approx(expected, rel=1e-6)


def test_a_changed_entry_reruns_exactly_its_cells(micro_study: Path, micro_world: Path, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    shutil.copytree(micro_study, folder)
    methods = [dict(m) for m in METHODS]
    methods[2]["density"] = 0.6
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(micro_world, methods=methods)))
    summary = run_study(spec, folder)
    n_ties = 2 * 2 * 2  # groups x k x seeds
    assert summary.ran == n_ties and summary.stale == n_ties
    old = {r for r in table(micro_study) if ("method", "ties") not in r}
    new = {r for r in table(folder) if ("method", "ties") not in r}
    assert old == new
    assert len(load_study(folder).merges) == len(load_study(micro_study).merges)


def test_a_process_pool_gives_the_same_table(micro_study: Path, write_spec, tmp_path: Path) -> None:
    run_study(write_spec(), tmp_path / "pool", workers=2)
    assert table(tmp_path / "pool") == table(micro_study)


def test_ray_gives_the_same_table(micro_study: Path, write_spec, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    run_study(write_spec(), tmp_path / "ray", workers=2, ray=True)
    assert table(tmp_path / "ray") == table(micro_study)


@pytest.mark.parametrize("budget", [1, 500_000])
def test_a_small_memory_budget_splits_the_reads_or_uses_scratch(
    micro_study: Path, write_spec, tmp_path: Path, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mergescale.study.draws as draws_module

    runs: list[tuple[int | None, int]] = []  # (the budget the engine planned for, products run over row blocks)
    real_run_plan = draws_module.run_plan

    def recording_run_plan(plan, **kwargs):
        stats = real_run_plan(plan, **kwargs)
        runs.append((kwargs["memory"].max_memory, stats.blocked))
        return stats

    monkeypatch.setattr(draws_module, "run_plan", recording_run_plan)
    out = tmp_path / "lean"
    run_study(write_spec(), out, max_memory=budget)
    assert table(out) == table(micro_study)
    draws = load_study(out).draws
    assert max(d.plans for d in draws) > 1  # the draws' merges did not fit one plan
    assert not any((out / ".scratch").iterdir())
    # the study's budget reached the engine, whose stacked methods (ties, dare_ties) then ran over row blocks:
    # bit for bit the unblocked merges, since the table is the same
    assert runs and all(m is not None for m, _ in runs)
    assert sum(blocked for _, blocked in runs) > 0, runs


def test_export_csv_parquet_and_show(micro_study: Path, tmp_path: Path) -> None:
    from mergescale.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["study", "export", str(micro_study), "-o", str(tmp_path / "rows.csv")])
    assert out.exit_code == 0, out.output
    with (tmp_path / "rows.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    required = {"group", "base_kind", "size", "method", "params", "k", "seed", "experts", "task", "split", "metric", "score", "normalised"}
    assert required <= set(rows[0])
    assert len(rows) == len(load_study(micro_study).rows())
    assert {r["split"] for r in rows} == {"held_in", "held_out"}
    json.loads(rows[0]["params"])
    pq = pytest.importorskip("pyarrow.parquet")
    out = runner.invoke(app, ["study", "export", str(micro_study), "-o", str(tmp_path / "rows.parquet")])
    assert out.exit_code == 0, out.output
    assert pq.read_table(tmp_path / "rows.parquet").num_rows == len(rows)
    shown = runner.invoke(app, ["study", "show", str(micro_study)], terminal_width=80)
    assert shown.exit_code == 0, shown.output
    assert "xs-pt" in shown.output and "held-out, ÷ base" in shown.output and "k=8" in shown.output
    assert max(len(line) for line in shown.output.splitlines()) <= 80
    assert "…" not in shown.output


def test_ray_retries_a_job_whose_worker_died(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from mergescale.stages.scheduler import Job
    from mergescale.study.draws import StudyContext
    from mergescale.study.executors import _run_ray
    from mergescale.study.spec import EvalSpec

    def dies_once(context, payload, threads):
        """A task whose worker process dies the first time it runs a job (as on a lost node). Defined here, so
        Ray ships it by value to workers that cannot import the tests."""
        import os
        from pathlib import Path

        marker = Path(context.scratch) / f"died-{payload}"
        if not marker.exists():
            marker.write_text("")
            os._exit(1)
        return f"done {payload}"

    context = StudyContext("", EvalSpec(), (), False, 1 << 30, str(tmp_path))
    jobs = [Job("a", (), 1.0, "a"), Job("b", ("a",), 1.0, "b")]
    done: list[tuple[str, str]] = []
    _run_ray(jobs, context, lambda job, result: done.append((job.name, result)), lambda job: job.payload, None,
             2, 1, None, task=dies_once)  # fmt: skip
    assert done == [("a", "done a"), ("b", "done b")]  # each retried after its worker died, b after a
    assert {p.name for p in tmp_path.iterdir()} == {"died-a", "died-b"}

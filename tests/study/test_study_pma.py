"""The pre-training paper's experiments as study jobs, on the micro world's runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergescale.study import load_study, run_study
from mergescale.study.pma_jobs import ablation_ends, pma_jobs, resolve_runs
from mergescale.study.spec import load_spec

pytestmark = pytest.mark.slow

PMA = {
    "window": 2,
    "ablation": {"windows": [2, 3], "ends": ["middle", "late"]},
    "pma_init": {"steps": 3, "batch_size": 4},
    # the detector judges from 5 logged losses on: the spike comes after them
    "spike": {"branch": 0.25, "at": 8, "length": 3, "steps": 12, "save_every": 2, "k": 2, "resume_steps": 3,
              "batch_size": 4, "factor": 300.0},
    "heldout_limit": 6,
    "task_limit": 3,
}  # fmt: skip


@pytest.fixture(scope="module")
def pma_study(micro_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = {"name": "micro-pma", "world": str(micro_world), "merging": False, "world_sizes": ["s"], "pma": PMA}
    path = tmp_path_factory.mktemp("pma-spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path_factory.mktemp("pma-studies") / "study"
    summary = run_study(path, out)
    parsed, spec_dir = load_spec(path)
    n_jobs = len(pma_jobs(parsed, resolve_runs(parsed, spec_dir), scratch=""))  # each experiment of the one run
    assert summary.cells == summary.ran == n_jobs > 0 and not summary.warnings, summary
    again = run_study(path, out)
    assert again.ran == 0 and again.cached == n_jobs  # resumed: nothing recomputed
    return out


def test_along_run_points_equal_mergescale_pma_scored_independently(pma_study: Path, micro_world: Path, tmp_path) -> None:
    from mergescale.pma import ModelScorer, average_checkpoints

    results = load_study(pma_study)
    along = [p for p in results.pma_points if p.kind == "along"]
    run = micro_world / "pretrain/s/run"
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert {p.end_step for p in along} == set(steps[1:])  # every step where a window of 2 is full
    assert {p.strategy for p in along} == {"sma", "ema", "wma"}
    point = next(p for p in along if p.strategy == "sma" and p.end_step == steps[-1])
    average_checkpoints(run, tmp_path / "avg", strategy="sma", window=2, end=steps[-1], progress=False)
    scorer = ModelScorer(run / f"checkpoint-{steps[-1]}", micro_world / "tokenizer",
                         heldout=micro_world / "tasks/pretrain_val.yaml", heldout_limit=6)  # fmt: skip
    assert point.loss == pytest.approx(scorer.score_folder(tmp_path / "avg").loss, rel=1e-5)
    assert point.last_loss == pytest.approx(scorer.score_folder(run / f"checkpoint-{steps[-1]}").loss, rel=1e-6)
    assert point.annealed_loss == pytest.approx(scorer.score_folder(micro_world / "pretrain/s/annealed").loss, rel=1e-6)
    want = (point.loss - point.last_loss) / (point.annealed_loss - point.last_loss)
    assert point.recovered == pytest.approx(want)
    assert set(point.scores["pma"]) == {"completion", "nli", "coreference", "wsd"}  # the world's held-out tasks


def test_ablation_pma_init_and_spike_rows(pma_study: Path, micro_world: Path) -> None:
    results = load_study(pma_study)
    ablation = [p for p in results.pma_points if p.kind == "ablation"]
    steps = tuple(sorted(int(p.name.split("-")[1]) for p in (micro_world / "pretrain/s/run").glob("checkpoint-*")))
    ends = ablation_ends(steps, ["middle", "late"])
    assert {p.end_step for p in ablation} == set(ends)
    assert {(p.n, p.strategy) for p in ablation if p.end_step == steps[-1]} == {
        (n, s) for n in (2, 3) for s in ("sma", "ema", "wma")
    }
    init = [c for c in results.pma_curves if c.experiment == "pma_init"]
    assert {c.variant for c in init} == {"pma", "last"} and len(init) == 2 * 3
    r = results.pma_results
    assert r[("s", "pma_init", "pma", "heldout_loss")] is not None
    assert r[("s", "spike", "spiked", "detected_step")] == r[("s", "spike", "spiked", "injected_step")] == 8
    spike_variants = {c.variant for c in results.pma_curves if c.experiment == "spike"}
    assert spike_variants == {"spiked", "average", "rollback", "unspiked"}


def test_ablation_end_steps() -> None:
    steps = tuple(range(10, 110, 10))
    assert ablation_ends(steps, ["early", "middle", "late"]) == [30, 60, 100]
    assert ablation_ends(steps, [50, "late"]) == [50, 100]
    from mergescale.errors import ConfigError

    with pytest.raises(ConfigError, match="step 55 is not a checkpoint"):
        ablation_ends(steps, [55])


def test_pma_study_shortcut_and_show(micro_world: Path, tmp_path: Path) -> None:
    from mergescale.cli import app

    out = tmp_path / "one-run"
    result = CliRunner().invoke(
        app,
        ["pma", "study", str(micro_world / "pretrain/s/run"), "-o", str(out), "--window", "2", "--no-ablation",
         "--annealed", str(micro_world / "pretrain/s/annealed"), "--heldout", str(micro_world / "tasks/pretrain_val.yaml"),
         "--heldout-limit", "4", "-q"],
        terminal_width=80,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "PMA along run run" in result.output and "need --data" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80 and "…" not in result.output
    spec = json.loads(load_study(out).spec["pma"] and json.dumps(load_study(out).spec))
    assert spec["pma"]["runs"][0]["annealed"].endswith("annealed")

"""LoRE, Fisher and RegMean end to end on the built micro world: each expert calibrated on its own held-in task
(our task format), the merge run with `mergescale calibrate` / `mergescale merge`, the result scored with
`mergescale eval` on the world's suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from merge_reference import assert_merged, method_on_stacks
from typer.testing import CliRunner

from mergescale.calibration import StatisticsCheckpoint, statistics_path
from mergescale.cli import app
from mergescale.config import load_config
from mergescale.world.build import BuildResult
from mergescale.world.layout import WorldLayout
from mergescale.world.tasks import HELD_IN

runner = CliRunner()
TASKS = HELD_IN[:2]


def _config(method: str, lay: WorldLayout, stats_dir: str) -> dict:
    experts = {t: str(lay.expert("s", "it", t)) for t in TASKS}
    cfg: dict = {
        "merge_method": method,
        "base_model": str(lay.base("s", "it")),
        "models": [{"model": e} for e in experts.values()],
        "dtype": "float32",
    }
    if method == "lore":
        cfg["parameters"] = {"rank": 4, "iterations": 2}
    else:
        cfg["calibration"] = {
            "data": {e: str(lay.tasks / t / "task.yaml") for t, e in experts.items()},
            "examples": 8,
            "statistics_dir": stats_dir,
        }
    return cfg


def _on_stacks(method: str, cfg_path) -> dict:
    """The method on the experts' stacked tensors (the base for LoRE; the statistics calibration wrote for the
    data-aware methods, read back like tensors)."""
    cfg = load_config(cfg_path)
    experts = [Path(m.model) for m in cfg.merged_models()]
    base = Path(cfg.base_model) if cfg.method.base != "unused" else None
    statistics = {}
    for kind in cfg.method.statistics:
        statistics[kind] = []
        for model in experts:
            source = StatisticsCheckpoint(statistics_path(cfg, str(model), kind))
            statistics[kind].append({name: source.read(name) for name in source.info()})
            source.close()
    return method_on_stacks(method, experts, base, params=cfg.parameters or {}, statistics=statistics)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lore", "fisher", "regmean"])
def test_merge_then_eval_on_the_world(micro_build: BuildResult, tmp_path, method):
    lay = WorldLayout(micro_build.root)
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(method, lay, str(tmp_path / "stats"))))
    if method != "lore":
        result = runner.invoke(app, ["calibrate", str(cfg_path), "--quiet"])
        assert result.exit_code == 0, result.output
        assert len(list((tmp_path / "stats").rglob(f"{'fisher' if method == 'fisher' else 'gram'}-*.safetensors"))) == 2
    result = runner.invoke(app, ["merge", str(cfg_path), str(tmp_path / "merged"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert_merged(tmp_path / "merged", _on_stacks(method, cfg_path), rtol=1e-4, atol=1e-5)
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", str(tmp_path / "merged"), "--tasks", str(lay.suite), "--output", str(out),
                                 "--limit", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())["tasks"]
    assert set(TASKS) <= set(scores)
    for task in TASKS:
        assert all(0.0 <= v <= 1.0 for k, v in scores[task]["metrics"].items() if k.startswith("acc"))

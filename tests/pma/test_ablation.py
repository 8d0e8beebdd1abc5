"""The window ablation: N × V × strategy at chosen end steps, each step's averages from one read, bit for bit
the single `mergescale pma` averages."""

from __future__ import annotations

import pytest
import torch
from pma_helpers import load_weights

from mergescale.errors import ConfigError
from mergescale.pma import average as average_module
from mergescale.pma.ablation import ablation_settings, iter_ablation
from mergescale.pma.average import average_checkpoints

STEPS12 = tuple(range(100, 1300, 100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ablation_is_bit_identical_to_single_averages_from_one_read_per_step(run_factory, tmp_path, monkeypatch, dtype):
    run = run_factory("hf", dtype=dtype, steps=STEPS12)
    grid = ablation_settings([2, 4], [None, 200], ["sma", ("ema", 0.2), ("ema", 0.1), "wma"])
    assert len(grid) == 16
    opened: list[str] = []
    real = average_module.open_checkpoint
    monkeypatch.setattr(average_module, "open_checkpoint", lambda p: opened.append(str(p)) or real(p))
    steps = list(iter_ablation(run, grid, [400, 800, 1200], progress=False))
    assert [s.end for s in steps] == [400, 800, 1200]
    # one plan per end step: each checkpoint of its windows opened (and each tensor read) once
    unions = [{str(c.path) for r in s.results for c in r.checkpoints} for s in steps]
    assert [len(u) for u in unions] == [4, 6, 6]
    assert len(opened) == 16 and set(opened) == set().union(*unions)
    # at step 400, N=4 with V=200 needs 4 checkpoints 200 apart: 100..400 has only 2
    assert {p.settings.label(4) for p in steps[0].skipped} == {
        f"{k}-N4-V200-end400" for k in ("sma", "ema0.2", "ema0.1", "wma")
    }
    assert len(steps[1].results) == 16 and not steps[1].skipped
    for step in steps:
        for r in step.results:
            s = r.settings
            single = average_checkpoints(
                run, tmp_path / r.label, strategy=s.strategy, window=s.window, interval=s.interval,
                end=s.end, alpha=s.alpha, progress=False,
            )  # fmt: skip
            assert single.steps == r.steps
            want = load_weights(single.out_dir)
            assert r.state_dict.keys() == want.keys()
            assert all(torch.equal(r.state_dict[k], want[k]) for k in want), r.label


def test_ablation_to_folders_and_errors(hf_run, tmp_path):
    grid = ablation_settings([3], strategies=["sma", "wma"])
    [step] = list(iter_ablation(hf_run, grid, [600], out_dir=tmp_path / "abl", progress=False))
    assert sorted(p.name for p in (tmp_path / "abl").iterdir()) == ["sma-N3-end600", "wma-N3-end600"]
    assert all(r.state_dict is None and r.out_dir is not None for r in step.results)
    with pytest.raises(ConfigError, match="at least one window"):
        ablation_settings([])
    with pytest.raises(ConfigError, match="end step"):
        list(iter_ablation(hf_run, grid, []))

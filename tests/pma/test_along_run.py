"""Averages along a run: every point equals `mergescale pma` for the same window, from one read per checkpoint
tensor, in memory or in folders, in batches; bad input fails before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from pma_helpers import load_weights
from typer.testing import CliRunner

from mergescale.cli import app
from mergescale.engine import sliding
from mergescale.errors import ConfigError, NonFiniteError
from mergescale.pma import along_run as along_run_module
from mergescale.pma.along_run import along_run_averages, groups_for, iter_along_run, plan_along_run
from mergescale.pma.average import PMASettings, average_checkpoints

STEPS12 = tuple(range(100, 1300, 100))
SETTINGS = [
    PMASettings("sma", 4),
    PMASettings("ema", 4, alpha=0.2),
    PMASettings("ema", 3, alpha=0.5),
    PMASettings("wma", 5),
    PMASettings("sma", 3, interval=200),
    PMASettings("sma", 2, weights=(1.0, 3.0)),
]
# Each window is a float32 sum of its N terms, in BLAS's order here and in the single average's there: both are
# within N·eps32 of the exact average, so they agree to 1e-6 of the weights' magnitude (not bit for bit).
RTOL = 1e-6


@pytest.fixture(scope="module")
def run12(run_factory):
    return run_factory("hf", steps=STEPS12)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 entries, split between workers from 128 entries on, groups of 3 windows: every code path
    on tiny tensors."""
    monkeypatch.setattr(sliding, "CPU_CHUNK", 64)
    monkeypatch.setattr(sliding, "_SPLIT_MIN", 128)
    monkeypatch.setattr(sliding, "GROUP", 3)


def direct(run, p, tmp_path):
    """`mergescale pma` for the same settings and end step."""
    s = p.settings
    out = tmp_path / "direct" / p.label
    ref = average_checkpoints(
        run, out, strategy=s.strategy, window=s.window, interval=s.interval, end=s.end, alpha=s.alpha,
        weights=s.weights, progress=False,
    )  # fmt: skip
    assert ref.steps == p.steps and ref.weights == pytest.approx(p.weights, rel=1e-12)
    return load_weights(out)


def assert_close_to(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = RTOL) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        scale = w.abs().max().item()
        err = (got[k].double() - w.double()).abs().max().item()
        assert err <= rtol * scale, f"{k}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


@pytest.mark.parametrize("workers", [1, 2])
def test_every_point_equals_pma_for_the_same_window(run12, tmp_path, small_chunks, workers):
    plan = plan_along_run(run12, SETTINGS)
    # every checkpoint step from the first where the window is full, for each setting
    ends = {s.label(0).split("-")[0] + str(s.window): [] for s in SETTINGS}
    for p in plan.points:
        ends[p.settings.label(0).split("-")[0] + str(p.settings.window)].append(p.settings.end)
    assert ends["sma4"] == list(STEPS12[3:]) and ends["wma5"] == list(STEPS12[4:])
    assert ends["sma3"][0] == 500  # the interval-200 window of 3 first fits at 500 (100, 300, 500)
    [batch] = list(iter_along_run(plan, progress=False, workers=workers))
    assert batch == plan.points and len(batch) == 9 + 9 + 10 + 8 + 8 + 11
    for p in batch:
        assert p.state_dict is not None and p.config is not None and p.stats is not None
        assert_close_to(p.state_dict, direct(run12, p, tmp_path))


def test_windows_are_grouped_by_setting_in_end_order(run12):
    plan = plan_along_run(run12, [PMASettings("sma", 3, interval=200), PMASettings("ema", 2)])
    index = {c.path: i for i, c in enumerate(plan.info.checkpoints)}
    groups = groups_for(plan.points, index, size=4)
    labels = [[plan.points[o].label for o in g.outputs] for g in groups]
    assert labels[0] == ["ema0.2-N2-end200", "ema0.2-N2-end300", "ema0.2-N2-end400", "ema0.2-N2-end500"]
    assert labels[1][:2] == ["sma-N3-V200-end500", "sma-N3-V200-end600"]
    g = groups[1]  # windows (100, 300, 500), (200, 400, 600), ...: sources 0 ... 7, thinned
    assert (g.lo, g.hi) == (0, 8)
    assert g.weights[0] == pytest.approx([1 / 3, 0, 1 / 3, 0, 1 / 3, 0, 0, 0])


def test_each_checkpoint_tensor_is_read_once(run12, tmp_path, monkeypatch):
    reads: dict[tuple[str, str], int] = {}

    class Counting:
        """A TensorSource that counts reads (zero-copy reads included: it maps nothing, so map is read)."""

        maps_files = False

        def __init__(self, inner):
            self.inner, self.path = inner, inner.path

        @property
        def config(self):
            return self.inner.config

        def info(self):
            return self.inner.info()

        def read(self, name):
            key = (str(self.path), name)
            reads[key] = reads.get(key, 0) + 1
            return self.inner.read(name)

        map = read

        def close(self):
            self.inner.close()

    real = along_run_module.open_checkpoint
    monkeypatch.setattr(along_run_module, "open_checkpoint", lambda p: Counting(real(p)))
    plan = plan_along_run(run12, SETTINGS)
    list(iter_along_run(plan, progress=False))
    names = list(load_weights(run12 / "checkpoint-100"))
    assert set(reads) == {(str(run12 / f"checkpoint-{s}"), n) for s in STEPS12 for n in names}
    assert set(reads.values()) == {1}

    # in batches, a checkpoint is read once per batch whose windows use it
    reads.clear()
    plan = plan_along_run(run12, [PMASettings("sma", 4)])
    batches = list(iter_along_run(plan, progress=False, max_outputs=3))
    assert [len(b) for b in batches] == [3, 3, 3]
    assert reads[(str(run12 / "checkpoint-100"), names[0])] == 1
    assert reads[(str(run12 / "checkpoint-600"), names[0])] == 2  # in windows of batches 1 and 2


def test_batches_give_the_same_averages(run12):
    plan = plan_along_run(run12, SETTINGS[:2])
    whole = {p.label: p.state_dict for b in iter_along_run(plan, progress=False) for p in b}
    plan = plan_along_run(run12, SETTINGS[:2])
    for batch in iter_along_run(plan, progress=False, max_outputs=4):
        assert len(batch) <= 4
        for p in batch:
            # a product over other rows may sum in another order: equal to float32 rounding, not bit for bit
            assert_close_to(p.state_dict, whole[p.label])


def test_bf16_checkpoints_within_one_ulp(run_factory, tmp_path, small_chunks):
    run = run_factory("hf", dtype=torch.bfloat16, steps=STEPS12)
    plan = plan_along_run(run, [PMASettings("sma", 4), PMASettings("ema", 4), PMASettings("wma", 4)], last=3)
    assert len(plan.points) == 9
    for p in next(iter_along_run(plan, progress=False)):
        want = direct(run, p, tmp_path)
        for k, w in want.items():
            got = p.state_dict[k]
            assert got.dtype == torch.bfloat16
            # bf16 keeps 8 bits: the two float32 sums may round to neighbouring bf16 values
            ulp = torch.finfo(torch.bfloat16).eps * w.double().abs().clamp_min(1e-30)
            assert bool(((got.double() - w.double()).abs() <= ulp).all()), k


def test_explicit_ends_last_and_skipped(run12):
    plan = plan_along_run(run12, [PMASettings("sma", 4)], ends=[250, 400, 1000, 1050])
    assert [p.settings.end for p in plan.points] == [400, 1000, 1050]
    assert plan.points[-1].steps == [700, 800, 900, 1000]  # the newest at or before 1050
    assert [(s.end, "only 2 fit" in s.reason) for s in plan.skipped] == [(250, True)]
    plan = plan_along_run(run12, [PMASettings("sma", 4), PMASettings("wma", 2)], last=2)
    assert [(p.settings.strategy, p.settings.end) for p in plan.points] == [
        ("sma", 1100), ("wma", 1100), ("sma", 1200), ("wma", 1200)
    ]
    with pytest.raises(ConfigError, match="no window fits"):
        plan_along_run(run12, [PMASettings("sma", 20)])
    with pytest.raises(ConfigError, match="no end step"):
        plan_along_run(run12, [PMASettings("sma", 4, end=500)])


def test_folders_match_pma_and_are_listed(run12, tmp_path):
    out = tmp_path / "curve"
    done = along_run_averages(run12, out, [PMASettings("sma", 4), PMASettings("ema", 3)], last=2, progress=False)
    assert [p.label for p in done] == ["sma-N4-end1100", "ema0.2-N3-end1100", "sma-N4-end1200", "ema0.2-N3-end1200"]
    record = json.loads((out / "along_run.json").read_text())
    assert list(record["outputs"]) == [p.label for p in done]
    for p in done:
        assert p.out_dir == out / p.label and p.state_dict is None
        assert json.loads((p.out_dir / "pma.json").read_text())["checkpoints"][-1]["step"] == p.settings.end
        assert (p.out_dir / "config.json").is_file() and (p.out_dir / "tokenizer.json").is_file()
        assert_close_to(load_weights(p.out_dir), direct(run12, p, tmp_path))


def test_nan_checkpoint_is_refused_and_nothing_written(run_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = run_factory("hf", steps=STEPS12)
    run = tmp_path / "run"
    shutil.copytree(src, run)
    f = run / "checkpoint-700" / "model.safetensors"
    sd = load_file(f)
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"checkpoint-700.*'model.norm.weight'.*NaN.*never averaged"):
        along_run_averages(run, tmp_path / "out", [PMASettings("sma", 3)], progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_along_run(run12, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app, ["pma", str(run12), "-o", str(out), "--along-run", "--window", "4", "--ends", "3", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "along_run.json", "sma-N4-end1000", "sma-N4-end1100", "sma-N4-end1200"
    ]
    assert "3 averages" in res.output


def test_inputs_larger_than_the_read_ahead_are_released_as_read_with_the_same_points(
    run12, tmp_path, small_chunks, monkeypatch
):
    """A read-ahead budget of one byte makes every tensor "too large to hold": its mapped inputs are faulted in
    by the computing threads and their pages released behind them (every 2048 entries here); the points stay
    those of `mergescale pma`."""
    from functools import partial

    released: list[tuple[int, int]] = []
    real_release = sliding.release_map_pages

    def spy(t, start, stop):
        released.append((start, stop))
        real_release(t, start, stop)

    monkeypatch.setattr(sliding, "release_map_pages", spy)
    monkeypatch.setattr(sliding, "_RELEASE_ENTRIES", 2048)
    monkeypatch.setattr(along_run_module, "run_sliding", partial(sliding.run_sliding, prefetch_bytes=1))
    plan = plan_along_run(run12, [PMASettings("sma", 4), PMASettings("ema", 3, alpha=0.5)], last=3)
    [batch] = list(iter_along_run(plan, progress=False, workers=2))
    assert any(stop - start >= 2048 for start, stop in released)  # whole pages of float32 entries were let go
    for p in batch:
        assert_close_to(p.state_dict, direct(run12, p, tmp_path))


def test_a_custom_window_that_overflows_is_refused(run_factory, tmp_path):
    """Negative custom weights can overflow finite inputs: those windows are summed, not only the check row."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = run_factory("hf", steps=STEPS12)
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for step, value in ((1100, 3e38), (1200, -3e38)):
        f = run / f"checkpoint-{step}" / "model.safetensors"
        sd = load_file(f)
        sd["model.norm.weight"][0] = value
        save_file(sd, f, metadata={"format": "pt"})
    # weights (1.5, -0.5): 1.5 · 3e38 + 0.5 · 3e38 = 6e38, past float32's 3.4e38
    with pytest.raises(NonFiniteError, match=r"'model.norm.weight' overflows"):
        along_run_averages(run, tmp_path / "out", [PMASettings("sma", 2, weights=(3.0, -1.0))], progress=False, last=1)

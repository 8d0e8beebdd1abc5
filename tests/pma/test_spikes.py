"""Spike detection on made-up loss curves."""

from __future__ import annotations

import math
import random

import pytest

from mergescale.errors import ConfigError
from mergescale.pma.spikes import SpikeRule, checkpoints_before, detect_spikes, first_unrecovered


def curve(n: int = 200, seed: int = 0, noise: float = 0.02) -> tuple[list[int], list[float]]:
    """A noisy, slowly falling pre-training loss logged every 10 steps."""
    rng = random.Random(seed)
    steps = [10 * (i + 1) for i in range(n)]
    return steps, [2.5 + 2.0 * math.exp(-i / 30) + rng.gauss(0, noise) for i in range(n)]


def test_noisy_falling_curve_has_no_spike():
    for seed in range(5):
        steps, losses = curve(seed=seed)
        assert detect_spikes(steps, losses) == []


def test_a_spike_that_recovers_is_reported_as_recovered():
    steps, losses = curve()
    for i, bump in zip(range(120, 126), (1.5, 2.5, 2.0, 1.0, 0.3, 0.05), strict=True):
        losses[i] += bump
    spikes = detect_spikes(steps, losses)
    assert len(spikes) == 1
    s = spikes[0]
    assert s.step == steps[120] and s.last_good_step == steps[119]
    assert s.recovered and s.recovered_at == steps[125]
    assert s.ratio > 1.3 and s.peak == pytest.approx(losses[121])
    assert first_unrecovered(spikes) is None


def test_a_collapse_is_not_recovered():
    steps, losses = curve()
    for i in range(150, 200):
        losses[i] = 7.0 + 0.01 * (i - 150)  # the loss jumps and never comes back
    spikes = detect_spikes(steps, losses)
    assert len(spikes) == 1 and not spikes[0].recovered and spikes[0].step == steps[150]
    assert first_unrecovered(spikes) is spikes[0]


def test_recovered_spike_then_nan_collapse():
    steps, losses = curve()
    losses[80] += 3.0
    for i in range(170, 200):
        losses[i] = float("nan")
    spikes = detect_spikes(steps, losses)
    assert [s.step for s in spikes] == [steps[80], steps[170]]
    assert spikes[0].recovered and not spikes[1].recovered
    assert math.isinf(spikes[1].ratio) and math.isinf(spikes[1].peak)
    assert first_unrecovered(spikes).step == steps[170]


def test_z_score_catches_a_small_spike_on_a_smooth_curve():
    steps = list(range(1, 101))
    losses = [3.0 - 0.001 * i for i in steps]
    losses[60] += 0.6  # +20 %: below factor 1.3, but far beyond the noise (floored at 1 % of the median)
    spikes = detect_spikes(steps, losses)
    assert [s.step for s in spikes] == [61] and spikes[0].ratio < 1.3 and spikes[0].z >= 8
    assert detect_spikes(steps, losses, SpikeRule(zscore=30)) == []  # thresholds are options


def test_checkpoints_before_a_spike_exclude_the_one_whose_weights_spiked():
    steps, losses = curve()
    for i in range(150, 200):
        losses[i] = 8.0
    spike = detect_spikes(steps, losses)[0]  # spike logged at step 1510, last normal log at 1500
    saved = [500, 1000, 1200, 1400, 1500, 1600]
    # checkpoint 1500's weights were first used by the forward passes logged (spiked) at 1510
    assert checkpoints_before(saved, spike, 3) == [1, 2, 3]
    assert checkpoints_before(saved, spike, 10) == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        checkpoints_before(saved, spike, 0)


def test_bad_rules():
    with pytest.raises(ConfigError, match="factor must exceed 1"):
        SpikeRule(factor=0.9)
    with pytest.raises(ConfigError):
        SpikeRule(window=1)

"""Window selection: N newest checkpoints at or before END, at least V apart (steps or tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergescale.errors import ConfigError
from mergescale.io.discover import CheckpointRef
from mergescale.pma.window import Interval, parse_interval, select_window


def refs(steps, tokens_per_step: int | None = 1000) -> list[CheckpointRef]:
    out = []
    for s in steps:
        folder = Path(f"/run/checkpoint-{s}")
        tokens = s * tokens_per_step if tokens_per_step else None
        out.append(
            CheckpointRef(path=folder, step=s, tokens=tokens, name=folder.name, kind="hf", folder=folder)
        )
    return out


def steps_of(chosen) -> list[int]:
    return [c.step for c in chosen]


RUN = refs(range(100, 1100, 100))  # 100 ... 1000


def test_newest_n_by_default_and_everything_without_n():
    assert steps_of(select_window(RUN, window=4)) == [700, 800, 900, 1000]
    assert steps_of(select_window(RUN)) == list(range(100, 1100, 100))
    assert steps_of(select_window(RUN, window=1)) == [1000]


def test_end_takes_checkpoints_at_or_before_it():
    assert steps_of(select_window(RUN, window=3, end=600)) == [400, 500, 600]
    assert steps_of(select_window(RUN, window=3, end=650)) == [400, 500, 600]  # END between checkpoints
    with pytest.raises(
        ConfigError, match="no checkpoint at or before step 50; the run's first checkpoint is at step 100"
    ):
        select_window(RUN, window=1, end=50)


def test_interval_in_steps_thins_from_the_newest():
    assert steps_of(select_window(RUN, window=3, interval=200)) == [600, 800, 1000]
    assert steps_of(select_window(RUN, window=3, interval="250")) == [400, 700, 1000]  # next >= 250 back
    assert steps_of(select_window(RUN, interval=300)) == [100, 400, 700, 1000]
    assert steps_of(select_window(RUN, window=2, interval=200, end=500)) == [300, 500]


def test_irregular_spacing():
    run = refs([100, 150, 200, 400, 410, 420, 800])
    assert steps_of(select_window(run, window=3, interval=100)) == [200, 420, 800]
    assert steps_of(select_window(run, window=4, interval=50)) == [150, 200, 420, 800]


def test_interval_in_tokens():
    # 1000 tokens per step: 200K tokens = 200 steps
    assert steps_of(select_window(RUN, window=3, interval="200K")) == [600, 800, 1000]
    assert parse_interval("2B") == Interval(2_000_000_000, "tokens")
    assert parse_interval("2.5b") == Interval(2_500_000_000, "tokens")
    assert parse_interval("500") == Interval(500, "steps")
    assert parse_interval("4000 tokens") == Interval(4000, "tokens")
    no_tokens = refs([100, 200], tokens_per_step=None)
    with pytest.raises(ConfigError, match="has no token count .* --interval in steps, or --tokens-per-step"):
        select_window(no_tokens, window=2, interval="1K")
    for bad in ("2X", "-5", "1.5", "3M steps"):
        with pytest.raises(ConfigError, match="--interval"):
            parse_interval(bad)


def test_too_few_names_what_was_found_and_suggests_a_window_that_fits():
    with pytest.raises(ConfigError) as err:
        select_window(RUN, window=12)
    assert str(err.value) == (
        "asked for 12 checkpoints, but only 10 fit; the run has 10 checkpoints "
        "(steps 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000); try --window 10"
    )
    with pytest.raises(ConfigError) as err:
        select_window(RUN, window=4, interval=300, end=900)
    message = str(err.value)
    assert "asked for 4 checkpoints at least 300 steps apart at or before step 900, but only 3 fit" in message
    # the largest spacing that still gives 4 checkpoints at or before 900 (900, 700, 500, 300 at V=200)
    assert message.endswith("try --window 3, or --interval 200 for 4 checkpoints")
    with pytest.raises(ConfigError, match="at least 1"):
        select_window(RUN, window=0)

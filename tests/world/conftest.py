"""Fixtures of the world tests: the micro preset's world, generated once and built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergescale.world.build import BuildResult, build_world
from mergescale.world.generate import write_world
from mergescale.world.presets import MICRO


@pytest.fixture(scope="session")
def generated_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world stage alone (tasks, corpus, tokenizer) of the micro preset, seed 7."""
    root = tmp_path_factory.mktemp("generated")
    write_world(7, MICRO.data, root / "tasks", root / "corpus", root / "tokenizer")
    return root


@pytest.fixture(scope="session")
def micro_build(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    """The whole micro world built end to end (seconds); tests that change it work on a copy."""
    return build_world(tmp_path_factory.mktemp("micro") / "world", "micro", seed=0, workers=1)

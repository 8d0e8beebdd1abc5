"""Fixtures of the world tests: the micro preset's world stage, generated once per session (the whole micro
build, ``micro_build``, is in tests/conftest.py: the study tests use it too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergescale.world.generate import write_world
from mergescale.world.presets import MICRO


@pytest.fixture(scope="session")
def generated_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world stage alone (tasks, corpus, tokenizer) of the micro preset, seed 7."""
    root = tmp_path_factory.mktemp("generated")
    write_world(7, MICRO.data, root / "tasks", root / "corpus", root / "tokenizer")
    return root


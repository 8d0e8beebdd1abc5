"""Fixtures of the study tests: specs over the session's micro world, and one study run once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from study_helpers import spec_dict


@pytest.fixture(scope="session")
def micro_world(micro_build) -> Path:
    return Path(micro_build.root)


@pytest.fixture
def write_spec(tmp_path: Path, micro_world: Path) -> Callable[..., Path]:
    def write(**changes: Any) -> Path:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec_dict(micro_world, **changes), sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def micro_study(micro_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small study, run once in this process (the reference table of the resume, pool and Ray tests)."""
    from mergescale.study import run_study

    folder = tmp_path_factory.mktemp("studies") / "reference"
    spec = tmp_path_factory.mktemp("specs") / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(micro_world), sort_keys=False))
    run_study(spec, folder)
    return folder

"""Fixtures of the report tests: a small study run on the micro world, a synthetic PMA study store, and one report
built from both (the end-to-end, CLI and browser tests share it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from synthetic import GROUPS, merging_study, paper_like, pma_study, write_store

METHODS = [
    {"method": "linear"},
    {"method": "task_arithmetic", "lambda": [0.5, 1.0], "select": "validation"},
    {"method": "ties", "density": 0.5, "lambda": 1.0},
    {"method": "dare_ties", "density": 0.5, "lambda": 1.0},
]


@pytest.fixture(scope="session")
def report_study(micro_build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper's grid in miniature on the micro world: both sizes and base kinds, 4 methods, k 2 and 4, 2 seeds."""
    from mergescale.study import run_study

    root = tmp_path_factory.mktemp("report-study")
    spec = root / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "micro-report",
                "world": str(micro_build.root),
                "methods": METHODS,
                "num_experts": [2, 4],
                "seeds": [0, 1],
                "eval": {"limit": 4, "batch_size": 8},
            },
            sort_keys=False,
        )
    )
    run_study(spec, root / "study")
    return root / "study"


@pytest.fixture(scope="session")
def pma_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study folder holding only synthetic PMA rows (what the PMA experiments will write)."""
    return write_store(tmp_path_factory.mktemp("pma-study") / "study", pma_study(runs=("xs", "s")))


@pytest.fixture(scope="session")
def built_report(report_study: Path, pma_store: Path, tmp_path_factory: pytest.TempPathFactory):
    from mergescale.report import build_report

    return build_report([report_study, pma_store], tmp_path_factory.mktemp("reports") / "report")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic merging study of one group, two methods, one k: a report of it draws in a few seconds."""
    results = merging_study(paper_like, groups=GROUPS[:1], methods=["linear", "ties"], ks=[2], diagnostics=False, name="tiny")
    return write_store(tmp_path_factory.mktemp("tiny-study") / "study", results)

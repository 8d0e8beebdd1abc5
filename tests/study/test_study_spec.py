"""Bad input to a study: each a one-line error naming the key, before any merge or evaluation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from study_helpers import spec_dict

from mergescale.errors import ConfigError, InputModelError, OutputError, TaskError
from mergescale.study import run_study
from mergescale.study.spec import parse_spec


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"wrold": "x"}, "unknown key 'wrold' (did you mean 'world'?)"),
        ({"methods": [{"method": "tie"}]}, "methods[0].method: unknown merge method 'tie'; available:"),
        ({"methods": [{"method": "ties", "densty": 0.2}]}, "methods[0].densty: unknown parameter of 'ties' (did you mean 'density'?)"),
        ({"methods": [{"method": "ties", "density": 1.5}]}, "methods[0].density: must be <= 1, got 1.5"),
        ({"methods": [{"method": "ties", "select": "validation"}]}, "methods[0].select: 'validation' chooses among swept values"),
        ({"eval": {"limt": 2}}, "unknown key 'eval.limt' (did you mean 'limit'?)"),
        ({"num_experts": [0]}, "num_experts: every number of experts must be at least 1, got 0"),
        ({"seeds": [1, 1]}, "seeds: repeated values"),
        ({"groups": [{"name": "g", "base": "b", "experts": {"t": "e"}}]}, "give exactly one of 'world'"),
    ],
)
def test_spec_errors_name_the_key(micro_world: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_spec(spec_dict(micro_world, **changes), "spec.yaml")
    text = str(err.value)
    assert text.startswith("spec.yaml: ") and message in text and "\n" not in text


def _never_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any merge or evaluation fails the test: bad input must be found before."""
    import mergescale.study.draws as draws

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(draws.StudyWorker, "run", forbidden)


def test_k_out_of_range(write_spec, tmp_path: Path, monkeypatch) -> None:
    _never_merges(monkeypatch)
    with pytest.raises(ConfigError, match="num_experts: 9 is out of range; the study has 8 experts per group"):
        run_study(write_spec(num_experts=[2, 9]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_world_model_and_task(write_spec, micro_world: Path, tmp_path: Path, monkeypatch) -> None:
    _never_merges(monkeypatch)
    with pytest.raises(ConfigError, match=r"world: .*nowhere is not a built world"):
        run_study(write_spec(world=str(tmp_path / "nowhere")), tmp_path / "out")
    groups = [
        {
            "name": "g",
            "base": str(micro_world / "models/xs/pt/base"),
            "experts": {"mcqa": str(micro_world / "models/xs/pt/experts/mcqa"), "topic": str(tmp_path / "gone")},
        }
    ]
    spec = spec_dict(micro_world, groups=groups, tasks=str(micro_world / "tasks/suite.yaml"))
    del spec["world"], spec["world_sizes"]
    spec["num_experts"] = [2]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(InputModelError, match=r"groups\[0\] \(g\)\.experts\.topic: model path .*gone does not exist"):
        run_study(path, tmp_path / "out")
    groups[0]["experts"]["topic"] = str(micro_world / "models/xs/pt/experts/topic")
    groups[0]["experts"]["poetry"] = str(micro_world / "models/xs/pt/experts/topic")
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="expert 'poetry' is not a held-in task of the suite"):
        run_study(path, tmp_path / "out")
    del groups[0]["experts"]["poetry"]
    spec["tasks"] = str(tmp_path / "missing-suite.yaml")
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(TaskError, match="missing-suite.yaml does not exist"):
        run_study(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_expert_of_another_architecture(micro_world: Path, tmp_path: Path, monkeypatch) -> None:
    _never_merges(monkeypatch)
    spec = spec_dict(
        micro_world,
        groups=[
            {
                "name": "mixed",
                "base": str(micro_world / "models/xs/pt/base"),
                "experts": {
                    "mcqa": str(micro_world / "models/xs/pt/experts/mcqa"),
                    "topic": str(micro_world / "models/s/pt/experts/topic"),  # another size
                },
            }
        ],
        tasks=str(micro_world / "tasks/suite.yaml"),
        num_experts=[2],
    )
    del spec["world"], spec["world_sizes"]
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(Exception) as err:
        run_study(path, tmp_path / "out")
    assert "expert 'topic'" in str(err.value) and "shape" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_folder_of_another_study_is_refused(micro_study: Path, write_spec, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "other"
    shutil.copytree(micro_study, other)
    _never_merges(monkeypatch)
    with pytest.raises(OutputError, match="holds study 'micro-study', not 'renamed'; .* --force-new"):
        run_study(write_spec(name="renamed"), other)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and holds no study"):
        run_study(write_spec(), tmp_path / "notes")


def test_cli_errors_are_one_line(write_spec, tmp_path: Path) -> None:
    import subprocess
    import sys

    spec = write_spec(num_experts=[12])
    out = subprocess.run(
        [sys.executable, "-m", "mergescale", "study", "run", str(spec), "-o", str(tmp_path / "o"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "num_experts: 12 is out of range" in lines[0], out.stderr

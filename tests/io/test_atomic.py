"""Outputs that appear whole or not at all (mergescale.io.atomic): files and folders, commit, abort, debris."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergescale.io.atomic import AtomicPath, write_json_atomic, write_text_atomic


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_replaces_the_old_one_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "r.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), AtomicPath(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1} and _hidden(target.parent) == []
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and _hidden(target.parent) == []


def test_a_refused_rename_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "taken", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_folder_replaces_an_existing_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    (target / "old").mkdir(parents=True)
    with AtomicPath(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("x")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and _hidden(tmp_path) == []


def test_debris_of_dead_processes_goes_and_of_live_ones_stays(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    dead = tmp_path / ".r.json.tmp-999999999-deadbeef"
    live = tmp_path / f".r.json.tmp-{os.getppid()}-cafecafe"  # our parent: a live process writing it
    dead.write_text("x")
    live.write_text("y")
    write_text_atomic(target, "z")
    assert not dead.exists() and live.exists()


def test_imports_no_torch() -> None:
    """The report, the study export and the stage store use it without paying torch's import."""
    code = "import sys, mergescale.io.atomic, mergescale.stages.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""``kill -9`` at any moment, then the same command again, gives the table of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from study_helpers import table

from mergescale.study import run_study

pytestmark = pytest.mark.slow

# Runs the study in a child process that SIGKILLs itself at a chosen point (no hook in mergescale: the test
# patches the code it wants to interrupt).
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from contextlib import contextmanager
    import mergescale.study.draws as draws
    import mergescale.study.store as store
    from mergescale.study import run_study

    spec, out, point, nth, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "baseline":  # while evaluating the nth baseline model
        real = draws.GroupModel.score
        def score(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == nth:
                die()
            return real(self, *a, **k)
        draws.GroupModel.score = score
    elif point == "draw":  # after the nth draw's merges, before its evaluations are recorded
        real = draws.run_plan
        def run_plan(*a, **k):
            stats = real(*a, **k)
            calls["n"] += 1
            if calls["n"] == nth:
                die()
            return stats
        draws.run_plan = run_plan
    elif point == "write":  # inside the nth store transaction, its rows inserted but not committed
        real_tx = store.StudyStore.transaction
        @contextmanager
        def transaction(self):
            with real_tx(self) as conn:
                yield conn
                calls["n"] += 1
                if calls["n"] == nth:
                    die()
        store.StudyStore.transaction = transaction
    elif point == "parent":  # the runner itself, as it records the nth job while workers evaluate others
        import mergescale.study.runner as runner
        real_record = runner._Recorder.record
        def record(self, job, result):
            calls["n"] += 1
            if calls["n"] == nth:
                die()
            return real_record(self, job, result)
        runner._Recorder.record = record
    run_study(spec, out, workers=workers)
    """
)


def _kill_run(spec: Path, out: Path, point: str, nth: int, workers: int = 1, marker: str = "") -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(spec), str(out), point, str(nth), str(workers)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MERGESCALE_TEST_MARKER": marker},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("point", "nth"),
    [("baseline", 3), ("draw", 2), ("write", 4), ("write", 12)],
)
def test_killed_then_rerun_equals_uninterrupted(
    micro_study: Path, write_spec, tmp_path: Path, point: str, nth: int
) -> None:
    spec = write_spec()
    out = tmp_path / "study"
    _kill_run(spec, out, point, nth)
    partial = table(out) if (out / "study.sqlite").exists() else []
    assert len(partial) < len(table(micro_study))
    run_study(spec, out)
    assert table(out) == table(micro_study)
    assert not any((out / ".scratch").iterdir())


def test_killed_runner_takes_its_workers_with_it(micro_study: Path, write_spec, tmp_path: Path) -> None:
    spec = write_spec()
    out = tmp_path / "study"
    marker = f"kill-test-{os.getpid()}-{time.time_ns()}"
    _kill_run(spec, out, "parent", 6, workers=2, marker=marker)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _processes_with(marker):
        time.sleep(0.2)
    assert not _processes_with(marker), "worker processes outlived the killed runner"
    run_study(spec, out)
    assert table(out) == table(micro_study)


def _processes_with(marker: str) -> set[int]:
    """Processes whose environment carries ``marker`` (the killed runner's children inherit it)."""
    found = set()
    needle = f"MERGESCALE_TEST_MARKER={marker}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(int(pid))
        except OSError:
            continue
    return found

"""Workers die with their parent: a process killed with SIGKILL while its workers start (importing torch, building
their state) leaves no worker and no multiprocessing resource tracker behind (before: both ran on for over a
minute, the watchdog only started after the worker's imports and then watched its new parent, init)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


def _processes(*, parent: int | None = None, group: int | None = None) -> dict[int, str]:
    """Live processes whose parent is ``parent`` or whose process group is ``group``: {pid: command line}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
        if state not in ("Z", "X") and (ppid == parent or pgrp == group):
            found[int(entry.name)] = cmd
    return found


def _start(args: list[str]) -> subprocess.Popen:
    """A parent in a process group of its own: every process it starts is found by its group after it dies (a
    worker started in the instant before the kill too)."""
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie is dead, waiting for init to reap it


def _kill_when_started(
    parent: subprocess.Popen, n_workers: int, timeout: float = 180, *, marker: str = "spawn_main", tracker: bool = True
) -> dict[int, str]:
    """Wait until ``parent`` has ``n_workers`` workers (children whose command line holds ``marker``) and, when
    ``tracker``, its resource tracker (spawned workers only: forked ones need none); SIGKILL it at once and return
    the children it had."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _processes(parent=parent.pid)
        workers = [p for p, cmd in kids.items() if marker in cmd]
        if len(workers) >= n_workers and (not tracker or any("resource_tracker" in c for c in kids.values())):
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait()
            return {**kids, **_processes(group=parent.pid)}
        if parent.poll() is not None:
            raise AssertionError(f"the parent ended by itself (code {parent.returncode}) before its workers started")
        time.sleep(0.01)
    parent.kill()
    raise AssertionError("the workers did not start")


def _assert_all_gone(parent: subprocess.Popen, kids: dict[int, str], within: float) -> float:
    """Every process the killed ``parent`` started (``kids``, and anything left in its process group) ends within
    ``within`` seconds; returns how long it took. Kills leftovers, so a failing test leaves nothing running."""
    start = time.monotonic()
    try:
        while time.monotonic() - start < within:
            if not any(_alive(p) for p in kids) and not _processes(group=parent.pid):
                return time.monotonic() - start
            time.sleep(0.05)
        left = {p: cmd[:90] for p, cmd in {**kids, **_processes(group=parent.pid)}.items() if _alive(p)}
        raise AssertionError(f"still running {within:.0f} s after the parent was killed: {left}")
    finally:
        for pid in {*kids, *_processes(group=parent.pid)}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _pool_script(tmp_path: Path, start_method: str, force_watchdog: bool = False) -> Path:
    """A parent whose 2 workers take 60 s to initialise (a stand-in for importing torch and loading data)."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import multiprocessing as mp, time
        from concurrent.futures import ProcessPoolExecutor
        from mergescale.stages import lifetime

        def slow_init(seconds):
            time.sleep(seconds)

        if __name__ == "__main__":
            if {force_watchdog!r}:
                lifetime._set_parent_death_signal = lambda: False  # inherited by forked workers
            ctx = mp.get_context({start_method!r})
            events = ctx.Queue()  # a semaphore: the resource tracker starts
            init, args = lifetime.worker_initializer(slow_init, (60,))
            pool = ProcessPoolExecutor(2, mp_context=ctx, initializer=init, initargs=args)
            futures = [pool.submit(time.sleep, 0) for _ in range(2)]
            time.sleep(120)
        """)
    )
    return script


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_pool_workers_die_with_a_killed_parent_while_they_initialise(tmp_path, start_method):
    script = _pool_script(tmp_path, start_method)
    parent = _start([sys.executable, str(script)])
    spawned = start_method == "spawn"
    kids = _kill_when_started(parent, 2, 60, marker="spawn_main" if spawned else str(script), tracker=spawned)
    assert _assert_all_gone(parent, kids, within=5) < 5


def test_watchdog_fallback_without_a_parent_death_signal(tmp_path):
    """Where prctl is unavailable (macOS, ...) the watchdog thread follows the parent (checked twice a second)."""
    script = _pool_script(tmp_path, "fork", force_watchdog=True)
    parent = _start([sys.executable, str(script)])
    kids = _kill_when_started(parent, 2, 60, marker=str(script), tracker=False)
    _assert_all_gone(parent, kids, within=5)


def test_die_with_parent_reports_its_mechanism_and_exits_when_the_parent_is_gone(tmp_path):
    from mergescale.stages.lifetime import die_with_parent

    if sys.platform.startswith("linux"):
        probe = subprocess.run(
            [sys.executable, "-c", "from mergescale.stages.lifetime import die_with_parent as d; print(d())"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probe.stdout.strip() == "pdeathsig", probe.stderr
    # a parent that is already gone: the worker ends at once instead of arming anything
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = subprocess.run(
        [sys.executable, "-c", f"from mergescale.stages.lifetime import die_with_parent as d; d({gone.pid}); print('lived')"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert code.returncode == 1 and "lived" not in code.stdout
    assert callable(die_with_parent)


@pytest.mark.slow
def test_world_build_killed_while_its_workers_start_leaves_nothing_running(tmp_path):
    """The issue's case: `mergescale world build` (micro preset, 2 workers) killed with SIGKILL while its workers
    start; its workers and the resource tracker must be gone within a few seconds."""
    parent = _start(
        [sys.executable, "-m", "mergescale", "world", "build", "-o", str(tmp_path / "w"), "--preset", "micro",
         "--workers", "2", "-q"]
    )  # fmt: skip
    kids = _kill_when_started(parent, 1)
    _assert_all_gone(parent, kids, within=5)

"""Worker processes that die with their parent, from the moment they start.

A worker pool's processes outlive a parent that is killed (SIGKILL, the OOM killer, a lost node): nothing tells
them, so they train or evaluate on for nobody, and multiprocessing's resource tracker, which holds on as long as
any of them does, stays too. :func:`worker_initializer` wraps a pool's initializer so that each worker

* on Linux asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``),
* elsewhere runs a watchdog thread that exits when the parent is gone (checked twice a second),

and does so while the worker is still unpickling what its parent sent — before the initializer's own module
(torch, transformers: seconds of imports) is loaded, so a parent killed while its workers start leaves none
behind. A parent that died before that moment is noticed at once (the worker was re-parented) and the worker
exits. Their half-written outputs are the next run's to clean up, as for any killed process.

Use::

    initializer, initargs = worker_initializer(my_init, (a, b))
    pool = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=initializer, initargs=initargs)

Linux's parent-death signal fires when the *thread* that started the worker ends, so start workers from a
thread that lives as long as they do (``ProcessPoolExecutor`` starts them in the thread calling ``submit``, or
in its own manager thread). With the ``forkserver`` start method the kernel's parent is the fork server; the
watchdog then follows the real parent instead.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from mergescale.io.atomic import pid_alive as _alive

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WATCH_SECONDS = 0.5


def die_with_parent(parent_pid: int | None = None) -> str:
    """Make this process end when ``parent_pid`` (default: the current parent) ends.

    Call it first thing in a worker. Returns how: ``"pdeathsig"`` (Linux: the kernel sends SIGKILL), or
    ``"watchdog"`` (a daemon thread polls the parent and calls ``os._exit(1)``). Exits at once when the
    parent is already gone.
    """
    if parent_pid is None:
        parent_pid = os.getppid()
    direct = os.getppid() == parent_pid
    if direct and _set_parent_death_signal():
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)
        return "pdeathsig"
    if not _alive(parent_pid):
        os._exit(1)
    _start_watchdog(parent_pid)
    return "watchdog"


def worker_initializer(
    initializer: Callable[..., Any] | None = None, initargs: tuple = ()
) -> tuple[Callable[..., None], tuple]:
    """``(initializer, initargs)`` for a process pool whose workers die with this process (see the module
    docstring): the returned initializer arms :func:`die_with_parent` as soon as a worker unpickles it, then
    calls ``initializer(*initargs)``. Works with the ``spawn``, ``fork`` and ``forkserver`` start methods and
    with ``ProcessPoolExecutor``, ``multiprocessing.Pool`` or a ``Process`` target."""
    return _DieWithParent(os.getpid()), (initializer, *initargs)


class _DieWithParent:
    """The pool initializer of :func:`worker_initializer`. Pickled for a spawned worker as a call to
    :func:`_arm`, which the worker's unpickler makes before it loads the real initializer and its arguments
    (they come after it in what the parent sends); in a forked worker, the call arms it."""

    def __init__(self, parent_pid: int, armed: bool = False) -> None:
        self.parent_pid = parent_pid
        self.armed = armed

    def __reduce__(self) -> tuple[Callable[[int], _DieWithParent], tuple[int]]:
        return _arm, (self.parent_pid,)

    def __call__(self, initializer: Callable[..., Any] | None, *initargs: Any) -> None:
        if not self.armed:
            die_with_parent(self.parent_pid)
            self.armed = True
        if initializer is not None:
            initializer(*initargs)


def _arm(parent_pid: int) -> _DieWithParent:
    die_with_parent(parent_pid)
    return _DieWithParent(parent_pid, armed=True)


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _start_watchdog(parent_pid: int) -> None:
    ppid = os.getppid()

    def watch() -> None:
        while os.getppid() == ppid and _alive(parent_pid):
            time.sleep(_WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()

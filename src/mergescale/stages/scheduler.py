"""Run jobs with dependencies and priorities, in this process or on a pool of worker processes.

A client describes its work as :class:`Job` s (a name, the names it depends on, a priority and a picklable
payload) and gives two top-level functions: ``make_state(*state_args, emit=...)`` builds what a process needs
to run jobs (loaded tasks, a tokenizer, ...; once per process) and ``execute(state, payload)`` runs one job and
returns its (picklable) result. :meth:`Scheduler.run` starts every job whose dependencies are done, the highest
priority first, and hands each result to ``on_done`` in the calling process, which alone records results.

With ``workers > 1`` jobs run on spawned processes (fork after torch has started its thread pools can hang the
child) that die with their parent from the moment they start (:mod:`~mergescale.stages.lifetime`); on an error or an
interrupt they are stopped at once rather than waited for, since every job's output is atomic and a stopped job
is simply redone by the next run. ``emit(event)`` in a worker reaches ``on_event`` in the calling process.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from mergescale.stages.lifetime import worker_initializer


@dataclass(frozen=True)
class Job:
    """One unit of work: ``payload`` is what ``execute`` receives; larger ``priority`` runs first."""

    name: str
    deps: tuple[str, ...] = ()
    priority: float = 0.0
    payload: Any = None


# The state of a worker process (what ``make_state`` built there). One per process, set by the pool's
# initializer: a worker process exists only to run jobs of one Scheduler.run call, and dies with it.
_WORKER_STATE: dict[str, Any] = {}


def _init_worker(
    make_state: Callable[..., Any], state_args: tuple, events: Any, threads: int | None, prepare: Callable | None
) -> None:
    # the worker already dies with its parent (worker_initializer armed that before these arguments loaded)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if prepare is not None:
        prepare()

    def emit(event: Any) -> None:
        if events is not None:
            events.put(event)

    _WORKER_STATE["state"] = make_state(*state_args, emit=emit)


def _run_in_worker(execute: Callable[[Any, Any], Any], payload: Any) -> Any:
    return execute(_WORKER_STATE["state"], payload)


def _noop(warm: Callable[[], None] | None) -> None:
    if warm is not None:
        warm()


class Scheduler:
    """Runs :class:`Job` s on ``workers`` processes (1: in this process).

    Args:
        make_state: top-level function ``make_state(*state_args, emit=fn) -> state``, called once per process.
        state_args: its picklable arguments.
        workers: processes running jobs side by side; 1 runs every job here, in order.
        threads: torch CPU threads of each worker process (None: torch's default).
        prepare: top-level function run first in each worker (before ``make_state``), e.g. to silence logs.
        warm: top-level function run on otherwise idle workers at the start, so their imports overlap the
            first jobs instead of delaying later ones.
    """

    def __init__(
        self,
        make_state: Callable[..., Any],
        state_args: tuple = (),
        *,
        workers: int = 1,
        threads: int | None = None,
        prepare: Callable[[], None] | None = None,
        warm: Callable[[], None] | None = None,
    ) -> None:
        self.make_state = make_state
        self.state_args = state_args
        self.workers = max(1, workers)
        self.threads = threads
        self.prepare = prepare
        self.warm = warm

    def run(
        self,
        jobs: Sequence[Job],
        execute: Callable[[Any, Any], Any],
        *,
        on_done: Callable[[Job, Any], None],
        done: Iterable[str] = (),
        on_event: Callable[[Any], None] | None = None,
        on_start: Callable[[Job], None] | None = None,
        prepare: Callable[[Job], Any] | None = None,
        local_state: Any = None,
    ) -> None:
        """Run ``jobs`` (their dependencies outside ``jobs`` must be in ``done``) as dependencies finish.

        ``on_done(job, result)`` is called in this process as each job finishes; ``on_start(job)`` as each is
        handed to a worker; ``prepare(job)``, when given, makes the payload sent at that moment (so it can carry
        results of the jobs it depends on). ``local_state``: the state to use when running here (built with
        ``make_state`` if None). A job's exception is re-raised here, after the other workers are stopped.
        """
        payload_of = prepare or (lambda job: job.payload)
        finished = set(done)
        pending = {j.name: j for j in jobs}
        known = set(pending) | finished
        for job in jobs:
            missing = [d for d in job.deps if d not in known]
            if missing:
                raise ValueError(f"job {job.name!r} depends on unknown jobs: {', '.join(missing)}")
        if self.workers == 1 or len(jobs) <= 1:
            state = local_state
            if state is None:
                state = self.make_state(*self.state_args, emit=on_event or (lambda event: None))
            while pending:
                job = _next_ready(pending, finished)
                if job is None:
                    raise RuntimeError(f"jobs with unmet dependencies: {', '.join(pending)}")
                del pending[job.name]
                if on_start:
                    on_start(job)
                on_done(job, execute(state, payload_of(job)))
                finished.add(job.name)
            return
        self._run_pool(pending, finished, execute, on_done, on_event, on_start, payload_of)

    def _run_pool(
        self,
        pending: dict[str, Job],
        finished: set[str],
        execute: Callable[[Any, Any], Any],
        on_done: Callable[[Job, Any], None],
        on_event: Callable[[Any], None] | None,
        on_start: Callable[[Job], None] | None,
        payload_of: Callable[[Job], Any],
    ) -> None:
        ctx = mp.get_context("spawn")
        events = ctx.Queue() if on_event is not None else None
        running: dict[Future, Job] = {}
        # Linux's parent-death signal follows the thread that starts a worker: the pool starts them from this
        # (calling) thread, which lives until the pool is shut down.
        initializer, initargs = worker_initializer(
            _init_worker, (self.make_state, self.state_args, events, self.threads, self.prepare)
        )
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=initializer, initargs=initargs)
        try:
            warmed = False
            while pending or running:
                ready = sorted(
                    (j for j in pending.values() if all(d in finished for d in j.deps)), key=lambda j: -j.priority
                )
                for job in ready[: max(0, self.workers + 1 - len(running))]:  # one queued ahead per pool
                    running[pool.submit(_run_in_worker, execute, payload_of(job))] = pending.pop(job.name)
                    if on_start:
                        on_start(job)
                if not warmed:
                    # The pool starts a process per submitted task: these start the idle ones now, so their imports
                    # overlap the first jobs instead of delaying the first parallel ones.
                    for _ in range(self.workers - len(running)):
                        pool.submit(_noop, self.warm)
                    warmed = True
                if not running:
                    raise RuntimeError(f"jobs with unmet dependencies: {', '.join(pending)}")
                done_now, _ = wait(running, timeout=0.1, return_when=FIRST_COMPLETED)
                _drain(events, on_event)
                for future in done_now:
                    job = running.pop(future)
                    result = future.result()  # re-raises a worker's error here
                    finished.add(job.name)
                    on_done(job, result)
        except BaseException:
            # Interrupted or a job failed: stop the workers now rather than wait for their jobs.
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        else:
            pool.shutdown(wait=True)
        finally:
            _drain(events, on_event)


def _next_ready(pending: dict[str, Job], finished: set[str]) -> Job | None:
    """The first job, in the given order, whose dependencies are done (in one process, order is the client's)."""
    return next((j for j in pending.values() if all(d in finished for d in j.deps)), None)


def _drain(events: Any, on_event: Callable[[Any], None] | None) -> None:
    if events is None or on_event is None:
        return
    while True:
        try:
            on_event(events.get_nowait())
        except queue.Empty:
            return

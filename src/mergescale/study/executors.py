"""Where a study's jobs run: this process, a local process pool, or Ray.

Every executor runs the same :class:`~mergescale.study.draws.StudyWorker` on the same payloads and hands each
result back to the runner, which alone writes the store; so the table does not depend on where jobs ran.

* **local** (``workers=1``: this process; more: spawned processes via :class:`~mergescale.stages.Scheduler`,
  each with its own tasks and evaluation model, dying with the runner);
* **Ray** (``ray=True``: a local runtime with ``workers`` CPUs; ``ray_address``: join a cluster): one remote task
  per job, submitted once its dependencies are recorded; a task whose worker dies is retried by Ray
  (``max_retries``), since every job is a pure function of its payload. Install with
  ``pip install 'mergescale[ray]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mergescale.errors import ConfigError
from mergescale.stages.scheduler import Job, Scheduler
from mergescale.study.draws import JobResult, StudyContext, StudyWorker

# Ray retries a task this many times when its worker process dies (not when the task raises).
RAY_RETRIES = 3


def make_worker(context: StudyContext, *, emit: Callable[[Any], None]) -> StudyWorker:
    return StudyWorker(context, emit=emit)


def execute(worker: StudyWorker, payload: Any) -> Any:
    return worker.run(payload)


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_jobs(
    jobs: Sequence[Job],
    context: StudyContext,
    *,
    on_done: Callable[[Job, JobResult], None],
    prepare: Callable[[Job], Any],
    on_start: Callable[[Job], None] | None = None,
    workers: int = 1,
    threads: int | None = 1,
    ray: bool = False,
    ray_address: str | None = None,
) -> None:
    """Run ``jobs`` (dependencies by name) and hand each result to ``on_done`` in this process."""
    if not jobs:
        return
    if ray:
        _run_ray(jobs, context, on_done, prepare, on_start, workers, threads, ray_address)
        return
    scheduler = Scheduler(make_worker, (context,), workers=workers, threads=threads, prepare=_quiet)
    local = None
    if workers == 1 or len(jobs) == 1:
        local = StudyWorker(context)
    with _torch_threads(threads if local is not None else None):
        scheduler.run(jobs, execute, on_done=on_done, on_start=on_start, prepare=prepare, local_state=local)


class _torch_threads:
    """Torch CPU threads for jobs run in this process, restored afterwards."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.saved: int | None = None

    def __enter__(self) -> None:
        if self.threads is not None:
            import torch

            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            import torch

            torch.set_num_threads(self.saved)


def _ray_task(context: StudyContext, payload: Any, threads: int | None) -> Any:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _quiet()
    return StudyWorker(context).run(payload)


def _run_ray(
    jobs: Sequence[Job],
    context: StudyContext,
    on_done: Callable[[Job, JobResult], None],
    prepare: Callable[[Job], Any],
    on_start: Callable[[Job], None] | None,
    workers: int,
    threads: int | None,
    address: str | None,
    task: Callable[[StudyContext, Any, int | None], Any] = _ray_task,
) -> None:
    """One Ray task per job (``task(context, payload, threads)``), submitted once its dependencies are recorded;
    results are handed to ``on_done`` here, in the order they finish."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'mergescale[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(task)
        context_ref = ray.put(context)
        pending = {j.name: j for j in jobs}
        finished: set[str] = set()
        known = set(pending)
        running: dict[Any, Job] = {}
        while pending or running:
            for job in [j for j in pending.values() if all(d in finished or d not in known for d in j.deps)]:
                running[remote.remote(context_ref, prepare(job), threads)] = pending.pop(job.name)
                if on_start:
                    on_start(job)
            if not running:
                raise RuntimeError(f"jobs with unmet dependencies: {', '.join(pending)}")
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                job = running.pop(ref)
                on_done(job, ray.get(ref))  # a task's own error is raised here
                finished.add(job.name)
    except BaseException:
        for ref in list(locals().get("running", {})):
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()

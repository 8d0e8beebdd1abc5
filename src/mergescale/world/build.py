"""``build_world``: the cached stage pipeline behind ``mergescale world build``.

Order of work:

1. **plan** — every stage of the build with its key, outputs and dependencies (:mod:`.pipeline`);
2. **run** — stages whose record matches their key are skipped; the others (:mod:`.actions`) run as soon as their
   dependencies are done, on ``workers`` single-threaded processes (2 by default on a 2-core machine: these
   models are too small for threads to help, and two processes keep both cores busy), the largest size first
   since it is the critical path (:class:`mergescale.stages.Scheduler`). Each stage is atomic
   (:mod:`mergescale.stages.store`).
3. **assemble** — ``scores.json`` and ``world.json`` from the stage records and cached evaluations.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergescale import __version__
from mergescale.errors import OutputError
from mergescale.stages.scheduler import Job, Scheduler
from mergescale.stages.store import write_json_atomic
from mergescale.world.actions import Reporter, StageActions
from mergescale.world.layout import BASE_KINDS, ModelId
from mergescale.world.pipeline import Stage, plan
from mergescale.world.presets import Preset, get_preset
from mergescale.world.tasks import HELD_IN, HELD_OUT

__all__ = ["BuildResult", "build_world", "default_workers", "plan"]

# Models this small run fastest on one thread per process: their matrices are too small to split, and on a
# machine shared with other work OpenMP's second thread waits on a busy core (measured: a forward pass took
# 2.4 ms on 1 thread and 100 ms on 2 threads while another process used a core).
DEFAULT_THREADS = 1


@dataclass
class BuildResult:
    root: Path
    preset: str
    seed: int
    ran: list[str] = field(default_factory=list)  # stages that ran this time, in the order they finished
    skipped: list[str] = field(default_factory=list)  # stages the cache answered
    seconds: float = 0.0
    scores: dict[str, Any] = field(default_factory=dict)
    world: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# worker processes (mergescale.stages.Scheduler runs the stages; these are its hooks)
# ---------------------------------------------------------------------------------------------------------------
def _make_runner(root: str, preset_json: str, seed: int, reporting: bool, *, emit: Any) -> StageActions:
    """A worker's runner: its progress events travel to the build process through ``emit``."""

    def report(name: str, step: int, total: int, loss: float | None) -> None:
        emit((name, step, total, loss))

    return StageActions(Path(root), Preset.model_validate_json(preset_json), seed, report if reporting else None)


def _run_stage(runner: StageActions, stage: Stage) -> bool:
    return runner.run(stage)


def _worker_warm() -> None:
    """Import what training stages use (~4 s), so a worker that starts while the world stage runs is ready."""
    import mergescale.world.train  # noqa: F401  (transformers' Trainer and Llama)


# ---------------------------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------------------------
def build_world(
    out_dir: str | Path,
    preset: str | Preset = "quick",
    *,
    seed: int = 0,
    workers: int | None = None,
    threads: int | None = None,
    report: Reporter | None = None,
) -> BuildResult:
    """Build (or resume, or refresh) the offline world in ``out_dir``; see the module docstring and docs/world.md.

    Args:
        out_dir: the world folder; created if missing. A folder that is not a world (no ``.stages``) must be
            empty.
        preset: ``"quick"``, ``"full"``, ``"micro"`` (tests) or a :class:`Preset`.
        seed: the world's seed (entities, tasks, corpus, initialisation, data order).
        workers: processes running stages side by side (default: :func:`default_workers`); 1 runs every stage
            in this process. Workers are spawned, so a script that calls this with workers > 1 needs the usual
            ``if __name__ == "__main__":`` guard.
        threads: torch CPU threads per process (default 1, see ``DEFAULT_THREADS``).
        report: called as ``report(stage, step, total, loss)`` for progress (step 0 = the stage starts, -1 = it
            is over).

    Example::

        result = build_world("world", "quick", seed=0)
        result.scores["models"]["m/pt/experts/sentiment"]["scores"]["sentiment"]["acc"]
    """
    start = time.perf_counter()
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / ".stages").is_dir():
        raise OutputError(
            f"{root}: folder is not empty and holds no world build (no .stages/); choose another"
        )
    preset = get_preset(preset) if isinstance(preset, str) else preset
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / ".stages").mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the world folder ({exc.strerror or exc})") from None
    threads = threads or DEFAULT_THREADS
    workers = workers or default_workers()
    stages = plan(root, preset, seed)
    runner = StageActions(root, preset, seed, report)
    result = BuildResult(root=root, preset=preset.name, seed=seed)
    with _training_settings(threads):
        todo = []
        done: set[str] = set()
        for stage in stages.values():
            if runner.store.done(stage.name, stage.key, list(stage.outputs)) and all(
                d in done for d in stage.deps
            ):
                done.add(stage.name)
                result.skipped.append(stage.name)
            else:
                todo.append(stage)
        scheduler = Scheduler(
            _make_runner,
            (str(root), preset.model_dump_json(), seed, report is not None),
            workers=workers,
            threads=threads,
            prepare=_silence_transformers,
            warm=_worker_warm,
        )
        scheduler.run(
            [Job(s.name, s.deps, s.priority, s) for s in todo],
            _run_stage,
            done=done,
            on_done=lambda job, ran: (result.ran if ran else result.skipped).append(job.name),
            on_event=(lambda event: report(*event)) if report is not None else None,
            local_state=runner,
        )
    result.seconds = round(time.perf_counter() - start, 2)
    result.scores = _scores_json(runner, stages)
    write_json_atomic(runner.layout.scores_json, result.scores)
    result.world = _world_json(runner, result, threads, workers)
    write_json_atomic(runner.layout.world_json, result.world)
    return result


def default_workers() -> int:
    """One stage process per core, at most 2: the quick preset has little more parallel work than that."""
    return max(1, min(2, os.cpu_count() or 1))


def _scores_json(runner: StageActions, stages: dict[str, Stage]) -> dict:
    lay = runner.layout
    entries: dict[str, Any] = {}
    for stage in stages.values():
        if stage.action[0] != "eval":
            continue
        model: ModelId = stage.action[1]
        entries[str(model)] = {
            "path": f"models/{model}",
            "size": model.size,
            "base": model.kind,
            "role": model.role,
            "task": model.task,
            "scores": read_json(stage.outputs[0]),
        }
    checks = {s.name: read_json(lay.cache / "pretrain" / f"{s.name}.json") for s in runner.preset.sizes}
    return {
        "mergescale_version": __version__,
        "seed": runner.seed,
        "preset": runner.preset.name,
        "suite": "tasks/suite.yaml",
        "held_in": list(HELD_IN),
        "held_out": list(HELD_OUT),
        "primary_metric": {t.name: t.primary_metric for t in runner.tasks()},
        "eval": runner.preset.eval.model_dump(),
        "models": entries,
        "pretrain": checks,
    }


def _world_json(runner: StageActions, result: BuildResult, threads: int, workers: int) -> dict:
    records = runner.store.all_records()
    sizes = {}
    for size in runner.preset.sizes:
        rec = records.get(f"pretrain/{size.name}")
        sizes[size.name] = {**size.model_dump(), "parameters": rec.info.get("parameters") if rec else None}
    world_rec = records.get("world")
    return {
        "mergescale_version": __version__,
        "seed": runner.seed,
        "preset": runner.preset.name,
        "sizes": sizes,
        "base_kinds": list(BASE_KINDS),
        "tasks": {
            "held_in": list(HELD_IN),
            "held_out": list(HELD_OUT),
            "rows": world_rec.info.get("tasks") if world_rec else None,
        },
        "settings": runner.preset.model_dump(mode="json"),
        "stages": {
            name: {"key": r.key, "seconds": r.seconds, "finished": r.finished, **r.info}
            for name, r in records.items()
        },
        "last_build": {
            "seconds": result.seconds,
            "ran": len(result.ran),
            "skipped": len(result.skipped),
            "workers": workers,
            "threads": threads,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
        },
    }


def _silence_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@contextmanager
def _training_settings(threads: int) -> Iterator[None]:
    """Torch threads for the build, and no per-step chatter from transformers (progress goes to ``report``)."""
    import transformers

    old_threads, old_verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    _silence_transformers()
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        transformers.logging.set_verbosity(old_verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        gc.unfreeze()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))

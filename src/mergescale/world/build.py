"""``build_world``: the cached stage pipeline behind ``mergescale world build``.

Order of work:

1. **plan** — every stage of the build with its key, outputs and dependencies, computed from the settings
   alone (a key hashes the stage's settings and its dependencies' keys, so a change reaches exactly the stages
   downstream of it): the world (tasks, corpus, tokenizer) → per size: stable pre-training with checkpoints →
   the annealed branch (= the PT base) → instruction tuning (= the IT base) → per base: one expert per held-in
   task and one multitask model → an evaluation of every model, and the pre-training checks.
2. **run** — stages whose record matches their key are skipped; the others run as soon as their dependencies
   are done, on ``workers`` single-threaded processes (2 by default on a 2-core machine: these models are too
   small for threads to help, and two processes keep both cores busy), the largest size first since it is
   the critical path. Each stage is atomic (:mod:`mergescale.world.stages`).
3. **assemble** — ``scores.json`` and ``world.json`` from the stage records and cached evaluations.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import platform
import queue
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergescale import __version__
from mergescale.errors import OutputError
from mergescale.stages.lifetime import worker_initializer
from mergescale.world.data import (
    BlockDataset,
    SupervisedDataset,
    instruction_pairs,
    pack_documents,
    read_jsonl,
    task_candidates,
    task_pairs,
)
from mergescale.world.evaluation import average_last_checkpoints, score_model
from mergescale.world.generate import write_world
from mergescale.world.layout import BASE_KINDS, WorldLayout
from mergescale.world.presets import Preset, get_preset
from mergescale.world.stages import StageStore, stage_key, write_json_atomic
from mergescale.world.tasks import HELD_IN, HELD_OUT

# Bump when the generators or recipes change in a way the settings do not show, to invalidate old caches.
WORLD_FORMAT = 7
TRAIN_FORMAT = 4
EVAL_FORMAT = 3

# Stable checkpoints whose validation loss the pre-training checks record (the newest ones).
CHECKED_CHECKPOINTS = 10

# Models this small run fastest on one thread per process: their matrices are too small to split, and on a
# machine shared with other work OpenMP's second thread waits on a busy core (measured: a forward pass took
# 2.4 ms on 1 thread and 100 ms on 2 threads while another process used a core).
DEFAULT_THREADS = 1

# (stage name, step, total steps, loss) -> None; step 0: the stage starts, -1: it is over.
Reporter = Callable[[str, int, int, float | None], None]


@dataclass(frozen=True)
class Stage:
    """One planned stage: what it runs (``action``), on what it depends, and where its outputs go."""

    name: str
    key: str
    outputs: tuple[Path, ...]
    deps: tuple[str, ...]
    action: tuple[str, ...]  # ("world",), ("pretrain", size), ("finetune", size, kind, label), ...
    priority: float  # larger first among ready stages: the biggest models are the critical path


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
# 1. plan
# ---------------------------------------------------------------------------------------------------------------
def plan(root: Path, preset: Preset, seed: int) -> dict[str, Stage]:
    """Every stage of a build, in an order where dependencies come first."""
    lay = WorldLayout(root)
    stages: dict[str, Stage] = {}

    def add(
        name: str,
        key: str,
        outputs: list[Path],
        deps: list[str],
        action: tuple[str, ...],
        priority: float,
    ) -> str:
        stages[name] = Stage(name, key, tuple(outputs), tuple(deps), action, priority)
        return key

    world = add(
        "world",
        stage_key("world", WORLD_FORMAT, seed, preset.data),
        [lay.tasks, lay.corpus, lay.tokenizer],
        [],
        ("world",),
        1e9,
    )
    p = preset.pretrain
    for rank, size in enumerate(preset.sizes):
        weight = (rank + 1) * 1e6  # later (bigger) sizes first
        s = size.name
        stable_settings = p.model_dump(exclude={"anneal_steps"})  # the anneal's length is the anneal's alone
        stable = add(
            f"pretrain/{s}",
            stage_key("pretrain", TRAIN_FORMAT, world, size, stable_settings, preset.max_length, seed),
            [lay.run(s)],
            ["world"],
            ("pretrain", s),
            weight + 5,
        )
        pt = add(
            f"anneal/{s}",
            stage_key("anneal", TRAIN_FORMAT, stable, p.anneal_steps),
            [lay.annealed(s), lay.base(s, "pt")],
            [f"pretrain/{s}"],
            ("anneal", s),
            weight + 4,
        )
        it = add(
            f"instruct/{s}",
            stage_key("instruct", TRAIN_FORMAT, pt, preset.instruct),
            [lay.base(s, "it")],
            [f"anneal/{s}"],
            ("instruct", s),
            weight + 3,
        )
        add(
            f"pretrain-checks/{s}",
            stage_key("pretrain-checks", EVAL_FORMAT, pt, p.pma_window),
            [lay.cache / "pretrain" / f"{s}.json"],
            [f"anneal/{s}"],
            ("checks", s),
            weight,
        )
        for kind, base_key, base_stage in (("pt", pt, f"anneal/{s}"), ("it", it, f"instruct/{s}")):
            models = [(lay.base(s, kind), base_key, base_stage, True)]
            for label in (*HELD_IN, "multitask"):
                settings = preset.multitask if label == "multitask" else preset.expert
                folder = lay.multitask(s, kind) if label == "multitask" else lay.expert(s, kind, label)
                name = f"multitask/{s}/{kind}" if label == "multitask" else f"expert/{s}/{kind}/{label}"
                key = add(
                    name,
                    stage_key("finetune", TRAIN_FORMAT, base_key, world, label, settings),
                    [folder],
                    [base_stage],
                    ("finetune", s, kind, label),
                    weight + 2,
                )
                models.append((folder, key, name, False))
            for folder, key, dep, is_base in models:
                model_id = lay.model_id(folder)
                add(
                    f"eval/{model_id}",
                    stage_key("eval", EVAL_FORMAT, key, world, preset.eval, is_base),
                    [lay.cache / "scores" / (model_id.replace("/", "__") + ".json")],
                    [dep],
                    ("eval", model_id, "base" if is_base else "tuned"),
                    weight + 1,
                )
    return stages


# ---------------------------------------------------------------------------------------------------------------
# 2. run: what each action does
# ---------------------------------------------------------------------------------------------------------------
class _Runner:
    """Runs stages of one build; each process (the main one or a worker) has its own."""

    def __init__(self, root: Path, preset: Preset, seed: int, report: Reporter | None) -> None:
        self.layout = WorldLayout(root)
        self.store = StageStore(root)
        self.preset = preset
        self.seed = seed
        self.report = report
        self.sizes = {s.name: s for s in preset.sizes}
        self._tokenizer: Any = None
        self._tasks: list[Any] | None = None

    def run(self, stage: Stage) -> bool:
        """Run a stage unless its record is current; True when it ran."""
        if self.report:
            self.report(stage.name, 0, 0, None)
        # accelerate calls gc.collect() in every Trainer.train(); with torch and transformers loaded that costs
        # ~0.3 s, and freezing what exists now (libraries, finished stages) brings it to ~1 ms.
        gc.freeze()
        action, *args = stage.action
        fn = getattr(self, f"_{action.replace('-', '_')}")
        rec = self.store.run(stage.name, stage.key, list(stage.outputs), lambda tmp: fn(tmp, *args))
        if self.report:
            self.report(stage.name, -1, 0, None)
        return not rec.skipped

    # -- helpers -------------------------------------------------------------------------------------------
    def _reporter(self, name: str) -> Callable[[int, int, float | None], None] | None:
        report = self.report
        return None if report is None else lambda step, total, loss: report(name, step, total, loss)

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import PreTrainedTokenizerFast

            self._tokenizer = PreTrainedTokenizerFast.from_pretrained(
                str(self.layout.tokenizer), trust_remote_code=False
            )
        return self._tokenizer

    def tasks(self) -> list[Any]:
        if self._tasks is None:
            from mergescale.evaluate import load_suite

            self._tasks = load_suite(self.layout.suite).tasks
        return self._tasks

    def seed_for(self, *parts: str) -> int:
        return random.Random("-".join((str(self.seed), *parts))).randrange(2**31)

    def blocks(self) -> torch.Tensor:
        docs = (self.layout.corpus / "pretrain.txt").read_text(encoding="utf-8").splitlines()
        return pack_documents(self.tokenizer(), docs, self.preset.pretrain.block_size)  # (N, block_size)

    def stable_blocks(self) -> int:
        p = self.preset.pretrain
        return (p.warmup_steps + p.stable_steps) * p.batch_size

    def validation_loss(self, folder: Path) -> float:
        from mergescale.evaluate import load_task

        task = load_task(self.layout.pretrain_val)
        return score_model(folder, [task], self.preset.eval, limit=False)["pretrain_val"]["loss"]

    # -- actions: each writes into its temporary outputs and returns what its record should keep -----------
    def _world(self, tmp: list[Path]) -> dict:
        return write_world(self.seed, self.preset.data, tmp[0], tmp[1], tmp[2])

    def _pretrain(self, tmp: list[Path], s: str) -> dict:
        from mergescale.world.train import new_model, parameter_count, pretrain_stable

        size, p = self.sizes[s], self.preset.pretrain
        data = self.blocks()
        model = new_model(size, self.tokenizer(), self.preset.max_length, self.seed_for("init", s))
        # The online average covers the same span as the SMA check: the last `pma_window` checkpoints.
        start = max(0, p.warmup_steps + p.stable_steps - (p.pma_window - 1) * p.checkpoint_every)
        pretrain_stable(
            model,
            self.tokenizer(),
            BlockDataset(data[: self.stable_blocks()]),
            p,
            tmp[0],
            lr_scale=size.lr_scale,
            seed=self.seed_for("pretrain", s),
            pma_start=start,
            report=self._reporter(f"pretrain/{s}"),
        )
        return {
            "parameters": parameter_count(model),
            "blocks": int(data.shape[0]),
            "tokens_stable": self.stable_blocks() * p.block_size,
            "pma_start_step": start,
        }

    def _anneal(self, tmp: list[Path], s: str) -> dict:
        from mergescale.world.train import anneal

        size, p = self.sizes[s], self.preset.pretrain
        data = self.blocks()
        # One pass over the corpus's last blocks: the text the stable phase did not reach, topped up with the end
        # of what it saw. (Repeating a short fresh tail for several epochs over-fits it: measured +0.13 nats.)
        rest = data[-p.anneal_steps * p.batch_size :]
        last = last_checkpoint(self.layout.run(s))
        anneal(
            last,
            self.tokenizer(),
            BlockDataset(rest),
            p,
            tmp[0],
            lr_scale=size.lr_scale,
            seed=self.seed_for("anneal", s),
            report=self._reporter(f"anneal/{s}"),
        )
        shutil.copytree(tmp[0], tmp[1])
        return {"from": last.name}

    def _instruct(self, tmp: list[Path], s: str) -> dict:
        from mergescale.world.train import finetune

        settings = self.preset.instruct
        pairs = instruction_pairs(read_jsonl(self.layout.corpus / "instruct.jsonl"))
        docs = (self.layout.corpus / "pretrain.txt").read_text(encoding="utf-8").splitlines()
        k = min(len(docs), round(settings.text_mix * len(pairs)))
        pairs += [("", doc) for doc in random.Random(self.seed_for("instruct-text", s)).sample(docs, k)]
        data = SupervisedDataset(self.tokenizer(), pairs, self.preset.max_length)
        info = finetune(
            self.layout.base(s, "pt"),
            self.tokenizer(),
            data,
            settings,
            tmp[0],
            lr_scale=self.sizes[s].lr_scale,
            seed=self.seed_for("instruct", s),
            report=self._reporter(f"instruct/{s}"),
        )
        return {"examples": len(data), **info}

    def _finetune(self, tmp: list[Path], s: str, kind: str, label: str) -> dict:
        from mergescale.world.train import finetune

        names = HELD_IN if label == "multitask" else (label,)
        settings = self.preset.multitask if label == "multitask" else self.preset.expert
        pairs: list[tuple[str, str]] = []
        checks: list[tuple[str, str]] = []
        candidates: list[list[str] | None] = []
        for name in names:
            spec = read_yaml(self.layout.tasks / name / "task.yaml")
            delimiter = spec.get("target_delimiter", " ")
            pairs += task_pairs(read_jsonl(self.layout.tasks / name / "train.jsonl"), spec["kind"], delimiter)
            rows = read_jsonl(self.layout.tasks / name / "validation.jsonl")[: settings.validation_rows]
            checks += task_pairs(rows, spec["kind"], delimiter)
            candidates += task_candidates(rows, spec["kind"], delimiter)
        tok, length = self.tokenizer(), self.preset.max_length
        data = SupervisedDataset(tok, pairs, length)
        validation = SupervisedDataset(tok, checks, length, candidates)
        name = f"multitask/{s}/{kind}" if label == "multitask" else f"expert/{s}/{kind}/{label}"
        info = finetune(
            self.layout.base(s, kind),
            tok,
            data,
            settings,
            tmp[0],
            lr_scale=self.sizes[s].lr_scale,
            seed=self.seed_for("finetune", s, kind, label),
            validation=validation,
            report=self._reporter(name),
        )
        return {"examples": len(data), **info}

    def _eval(self, tmp: list[Path], model_id: str, role: str) -> dict:
        folder = self.layout.root / "models" / model_id
        scores = score_model(folder, self.tasks(), self.preset.eval)
        if role == "base":
            scores["pretrain_val"] = {"loss": self.validation_loss(folder)}
        write_json_atomic(tmp[0], scores)
        return {}

    def _checks(self, tmp: list[Path], s: str) -> dict:
        """Validation loss of every stable checkpoint, the annealed model, the offline SMA of the last
        ``pma_window`` checkpoints (``mergescale pma``) and the online average written during training."""
        lay, window = self.layout, self.preset.pretrain.pma_window
        run_dir = lay.run(s)
        ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        # The last checkpoints only (at least the averaged window): the early ones are far above and slow to score.
        losses = {c.name: self.validation_loss(c) for c in ckpts[-max(window, CHECKED_CHECKPOINTS) :]}
        lay.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lay.cache) as scratch:
            sma_dir = Path(scratch) / "sma"
            averaged = average_last_checkpoints(run_dir, sma_dir, window)
            sma = self.validation_loss(sma_dir)
        online = run_dir / f"pma-{ckpts[-1].name.split('-')[1]}"
        write_json_atomic(
            tmp[0],
            {
                "checkpoints": losses,
                "last_stable": ckpts[-1].name,
                "last_stable_loss": losses[ckpts[-1].name],
                "annealed_loss": self.validation_loss(lay.annealed(s)),
                "sma": {"window": window, "checkpoints": averaged, "loss": sma},
                "online_pma": {"folder": online.name, "loss": self.validation_loss(online)}
                if online.is_dir()
                else None,
            },
        )
        return {}


# ---------------------------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _worker_init(root: str, preset_json: str, seed: int, threads: int, events: Any) -> None:
    # dies with the build process from the moment it starts: see _run_parallel and mergescale.stages.lifetime
    torch.set_num_threads(threads)
    _silence_transformers()

    def report(name: str, step: int, total: int, loss: float | None) -> None:
        if events is not None:
            events.put((name, step, total, loss))

    _WORKER["runner"] = _Runner(
        Path(root), Preset.model_validate_json(preset_json), seed, report if events is not None else None
    )


def _worker_run(stage: Stage) -> bool:
    return _WORKER["runner"].run(stage)


def _worker_warm() -> None:
    """Import what training stages use (~4 s), so a worker that starts while the world stage runs is ready."""
    import mergescale.world.train  # noqa: F401  (transformers' Trainer and Llama)


def _run_parallel(
    stages: list[Stage],
    done: set[str],
    runner: _Runner,
    workers: int,
    threads: int,
    result: BuildResult,
    report: Reporter | None,
) -> None:
    """Run ``stages`` (not cached) on a pool as their dependencies finish; events go to ``report``."""
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can hang the child
    events = ctx.Queue() if report is not None else None
    pending = {s.name: s for s in stages}
    running: dict[Future, Stage] = {}
    # A worker killed with its build (SIGKILL) leaves its half-written stage to the next build.
    initializer, initargs = worker_initializer(
        _worker_init, (str(runner.layout.root), runner.preset.model_dump_json(), runner.seed, threads, events)
    )
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        try:
            warmed = False
            while pending or running:
                ready = sorted(
                    (s for s in pending.values() if all(d in done for d in s.deps)), key=lambda s: -s.priority
                )
                for stage in ready[: max(0, workers + 1 - len(running))]:  # one queued ahead per pool
                    running[pool.submit(_worker_run, stage)] = pending.pop(stage.name)
                if not warmed:
                    # The pool starts a process per submitted task: the first stage (the world) started one, these
                    # start the others now, so their imports overlap it instead of delaying the first parallel
                    # stages (4 s measured).
                    for _ in range(workers - len(running)):
                        pool.submit(_worker_warm)
                    warmed = True
                finished, _ = wait(running, timeout=0.1, return_when=FIRST_COMPLETED)
                _drain(events, report)
                for future in finished:
                    stage = running.pop(future)
                    ran = future.result()  # re-raises a worker's error here
                    done.add(stage.name)
                    (result.ran if ran else result.skipped).append(stage.name)
                if (
                    not running
                    and pending
                    and not any(all(d in done for d in s.deps) for s in pending.values())
                ):
                    raise RuntimeError(f"stages with unmet dependencies: {', '.join(pending)}")
        except BaseException:
            # Interrupted or a stage failed: stop the workers now rather than wait for their stages (each stage
            # is atomic, so a killed one is simply redone by the next build).
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            _drain(events, report)


def _drain(events: Any, report: Reporter | None) -> None:
    if events is None or report is None:
        return
    while True:
        try:
            report(*events.get_nowait())
        except queue.Empty:
            return


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
    runner = _Runner(root, preset, seed, report)
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
        if workers > 1 and len(todo) > 1:
            _run_parallel(todo, done, runner, workers, threads, result, report)
        else:
            for stage in todo:
                (result.ran if runner.run(stage) else result.skipped).append(stage.name)
    result.seconds = round(time.perf_counter() - start, 2)
    result.scores = _scores_json(runner, stages)
    write_json_atomic(runner.layout.scores_json, result.scores)
    result.world = _world_json(runner, result, threads, workers)
    write_json_atomic(runner.layout.world_json, result.world)
    return result


def default_workers() -> int:
    """One stage process per core, at most 2: the quick preset has little more parallel work than that."""
    return max(1, min(2, os.cpu_count() or 1))


def _scores_json(runner: _Runner, stages: dict[str, Stage]) -> dict:
    lay = runner.layout
    entries: dict[str, Any] = {}
    for stage in stages.values():
        if stage.action[0] != "eval":
            continue
        model_id = stage.action[1]
        size, kind, *rest = model_id.split("/")
        role = "base" if rest == ["base"] else "multitask" if rest == ["multitask"] else "expert"
        entries[model_id] = {
            "path": f"models/{model_id}",
            "size": size,
            "base": kind,
            "role": role,
            "task": rest[1] if role == "expert" else None,
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


def _world_json(runner: _Runner, result: BuildResult, threads: int, workers: int) -> dict:
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


def last_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        raise OutputError(f"{run_dir}: pre-training run has no checkpoint-<step> folder")
    return ckpts[-1]


def read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def read_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


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

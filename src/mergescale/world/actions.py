"""What each stage of the world build does: the actions behind the stage graph (:mod:`.pipeline`).

Each action writes into its stage's temporary outputs and returns what the stage's record keeps; each process of
a build (the main one or a worker) has its own :class:`StageActions`.
"""

from __future__ import annotations

import gc
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergescale.errors import OutputError
from mergescale.io.discover import step_from_name
from mergescale.stages.store import StageStore, write_json_atomic
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
from mergescale.world.layout import ModelId, WorldLayout
from mergescale.world.pipeline import Stage
from mergescale.world.presets import Preset
from mergescale.world.tasks import HELD_IN

# Stable checkpoints whose validation loss the pre-training checks record (the newest ones).
CHECKED_CHECKPOINTS = 10

# (stage name, step, total steps, loss) -> None; step 0: the stage starts, -1: it is over.
Reporter = Callable[[str, int, int, float | None], None]


class StageActions:
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
        tasks = {t.name: t for t in self.tasks()}
        for name in names:
            task = tasks[name]
            pairs += task_pairs(task, task.rows("train"))
            rows = task.rows("validation")[: settings.validation_rows]
            checks += task_pairs(task, rows)
            candidates += task_candidates(task, rows)
        tok, length = self.tokenizer(), self.preset.max_length
        data = SupervisedDataset(tok, pairs, length)
        validation = SupervisedDataset(tok, checks, length, candidates)
        stage = f"multitask/{s}/{kind}" if label == "multitask" else f"expert/{s}/{kind}/{label}"
        info = finetune(
            self.layout.base(s, kind),
            tok,
            data,
            settings,
            tmp[0],
            lr_scale=self.sizes[s].lr_scale,
            seed=self.seed_for("finetune", s, kind, label),
            validation=validation,
            report=self._reporter(stage),  # progress is reported under the stage's name
        )
        return {"examples": len(data), **info}

    def _eval(self, tmp: list[Path], model: ModelId) -> dict:
        folder = self.layout.model(model)
        scores = score_model(folder, self.tasks(), self.preset.eval)
        if model.role == "base":
            scores["pretrain_val"] = {"loss": self.validation_loss(folder)}
        write_json_atomic(tmp[0], scores)
        return {}

    def _checks(self, tmp: list[Path], s: str) -> dict:
        """Validation loss of every stable checkpoint, the annealed model, the offline SMA of the last
        ``pma_window`` checkpoints (``mergescale pma``) and the online average written during training."""
        lay, window = self.layout, self.preset.pretrain.pma_window
        run_dir = lay.run(s)
        ckpts = checkpoints(run_dir)
        # The last checkpoints only (at least the averaged window): the early ones are far above and slow to score.
        losses = {c.name: self.validation_loss(c) for c in ckpts[-max(window, CHECKED_CHECKPOINTS) :]}
        lay.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lay.cache) as scratch:
            sma_dir = Path(scratch) / "sma"
            averaged = average_last_checkpoints(run_dir, sma_dir, window)
            sma = self.validation_loss(sma_dir)
        online = run_dir / f"pma-{step_from_name(ckpts[-1].name)}"
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


def checkpoints(run_dir: Path) -> list[Path]:
    """The stable-phase ``checkpoint-<step>`` folders of a run, by step."""
    found = [(step_from_name(p.name), p) for p in run_dir.glob("checkpoint-*")]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def last_checkpoint(run_dir: Path) -> Path:
    ckpts = checkpoints(run_dir)
    if not ckpts:
        raise OutputError(f"{run_dir}: pre-training run has no checkpoint-<step> folder")
    return ckpts[-1]



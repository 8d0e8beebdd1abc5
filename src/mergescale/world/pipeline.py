"""The world build's stage graph: every stage with its key, outputs and dependencies, from the settings alone.

A key hashes the stage's settings and its dependencies' keys, so a change reaches exactly the stages downstream
of it: the world (tasks, corpus, tokenizer) → per size: stable pre-training with checkpoints → the annealed
branch (= the PT base) → instruction tuning (= the IT base) → per base: one expert per held-in task and one
multitask model → an evaluation of every model, and the pre-training checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergescale.stages.keys import stage_key
from mergescale.world.layout import WorldLayout
from mergescale.world.presets import Preset
from mergescale.world.tasks import HELD_IN

# Bump when the generators or recipes change in a way the settings do not show, to invalidate old caches.
WORLD_FORMAT = 7
TRAIN_FORMAT = 4
EVAL_FORMAT = 3


@dataclass(frozen=True)
class Stage:
    """One planned stage: what it runs (``action``), on what it depends, and where its outputs go."""

    name: str
    key: str
    outputs: tuple[Path, ...]
    deps: tuple[str, ...]
    action: tuple[Any, ...]  # ("world",), ("pretrain", size), ("finetune", size, kind, label), ("eval", ModelId)
    priority: float  # larger first among ready stages: the biggest models are the critical path



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
            keys = {"base": (base_key, base_stage)}
            for model in lay.models(s, kind, HELD_IN)[1:]:
                label = model.task or "multitask"
                settings = preset.multitask if model.role == "multitask" else preset.expert
                name = f"multitask/{s}/{kind}" if model.role == "multitask" else f"expert/{s}/{kind}/{label}"
                key = add(
                    name,
                    stage_key("finetune", TRAIN_FORMAT, base_key, world, label, settings),
                    [lay.model(model)],
                    [base_stage],
                    ("finetune", s, kind, label),
                    weight + 2,
                )
                keys[str(model)] = (key, name)
            for model in lay.models(s, kind, HELD_IN):
                key, dep = keys["base" if model.role == "base" else str(model)]
                add(
                    f"eval/{model}",
                    stage_key("eval", EVAL_FORMAT, key, world, preset.eval, model.role == "base"),
                    [lay.scores_cache(model)],
                    [dep],
                    ("eval", model),
                    weight + 1,
                )
    return stages

"""The world stage: generate the world, its tasks, corpus and instruction mixture, and the tokenizer, and write
them in the layout's ``tasks/``, ``corpus/`` and ``tokenizer/`` folders. Same seed and settings, same bytes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from mergescale.world.corpus import documents
from mergescale.world.entities import World, generate_world
from mergescale.world.presets import DataSettings
from mergescale.world.tasks import (
    HELD_IN,
    HELD_OUT,
    SPLITS,
    TASKS,
    TaskDef,
    generate_task,
    instruction_mixture,
)
from mergescale.world.tokenizer import build_tokenizer

# Longest answer of each generation task, in tokens, with room to spare: the evaluator stops there.
MAX_NEW_TOKENS = {"extractive_qa": 8, "closed_book_qa": 8, "struct_to_text": 24, "summarisation": 16}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def task_yaml(task: TaskDef, splits: Iterable[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": task.name,
        "category": task.category,
        "kind": task.kind,
        "data": {s: f"{s}.jsonl" for s in splits},
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metrics": list(task.metrics),
    }
    if task.kind == "generation":
        spec["generation"] = {"stop": ["\n"], "max_new_tokens": MAX_NEW_TOKENS.get(task.name, 16)}
    spec["description"] = f"generated world task ({'held-in' if task.held == 'in' else 'held-out'})"
    return spec


def write_world(
    seed: int,
    settings: DataSettings,
    tasks_dir: Path,
    corpus_dir: Path,
    tokenizer_dir: Path,
) -> dict[str, Any]:
    """Generate everything from ``seed`` and write the three folders; returns counts for world.json."""
    world = generate_world(seed, settings.world)
    train_docs = documents(world, settings.corpus_docs, "train")
    seen = set(train_docs)
    val_docs = [d for d in documents(world, settings.validation_docs * 3, "validation") if d not in seen]
    val_docs = val_docs[: settings.validation_docs]
    instruct = instruction_mixture(world, settings.instruct_rows)

    tasks_dir.mkdir(parents=True)
    texts: list[str] = list(train_docs) + val_docs
    counts: dict[str, dict[str, int]] = {}
    for task in TASKS:
        sizes = settings.tasks.model_dump()
        if task.held == "out":
            sizes["train"] = 0  # nothing is ever trained on a held-out task
        rows = generate_task(world, task, sizes)
        folder = tasks_dir / task.name
        folder.mkdir()
        splits = [s for s in SPLITS if rows[s]]
        for split in splits:
            _write_jsonl(folder / f"{split}.jsonl", rows[split])
            for r in rows[split]:
                texts.append(
                    str(r.get("context", r.get("prompt")))
                    + " "
                    + " ".join(map(str, r.get("choices", r.get("references", []))))
                )  # type: ignore[arg-type]
        _write_yaml(folder / "task.yaml", task_yaml(task, splits))
        counts[task.name] = {s: len(rows[s]) for s in splits}
    _write_yaml(
        tasks_dir / "suite.yaml",
        {
            "name": f"world-seed{seed}",
            "description": "the offline world's tasks: 8 held-in categories (experts) and 4 held-out ones",
            "held_in": [f"{name}/task.yaml" for name in HELD_IN],
            "held_out": [f"{name}/task.yaml" for name in HELD_OUT],
        },
    )
    _write_jsonl(tasks_dir / "pretrain_val.jsonl", ({"text": d} for d in val_docs))
    _write_yaml(
        tasks_dir / "pretrain_val.yaml",
        {
            "name": "pretrain_val",
            "category": "language_modeling",
            "kind": "perplexity",
            "data": {"test": "pretrain_val.jsonl"},
            "metrics": ["loss", "ppl"],
            "description": "held-out pre-training text: validation loss (mean token NLL) for checkpoints and PMA",
        },
    )

    corpus_dir.mkdir(parents=True)
    (corpus_dir / "pretrain.txt").write_text("".join(d + "\n" for d in train_docs), encoding="utf-8")
    _write_jsonl(corpus_dir / "instruct.jsonl", instruct)
    (corpus_dir / "world.json").write_text(json.dumps(_world_facts(world), indent=1) + "\n", encoding="utf-8")
    texts += [r["prompt"] + " " + r["response"] for r in instruct]

    tokenizer = build_tokenizer(texts, world.vocabulary())
    tokenizer.save_pretrained(str(tokenizer_dir))
    return {
        "vocab_size": len(tokenizer),
        "pretrain_docs": len(train_docs),
        "validation_docs": len(val_docs),
        "instruct_rows": len(instruct),
        "tasks": counts,
    }


def _world_facts(world: World) -> dict[str, Any]:
    return {
        "seed": world.seed,
        "people": [asdict(p) for p in world.people],
        "cities": world.country_of,
        "capitals": world.capital_of,
    }

"""Training data as tensors: packed pre-training blocks and supervised (prompt, answer) examples.

Supervised examples are built by the evaluator's own formats (:func:`mergescale.evaluate.prompts.training_pair`),
so what an expert learns is what it is scored on: a multiple-choice row becomes ``context + target_delimiter +
gold choice`` (loss on the choice), a generation row ``prompt + target_delimiter + reference + stop`` (loss on the
answer and the newline the evaluator stops at); an instruction row is ``prompt + " " + response + "\\n"``.
No BOS is added: the tokenizer adds none, and neither does the evaluator.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mergescale.evaluate.prompts import continuations, training_pair
from mergescale.evaluate.tasks import GenerationRow, MultipleChoiceRow, Task

IGNORE = -100  # label ignored by the loss (prompt and padding tokens)


class BlockDataset(Dataset):
    """Fixed-length blocks of a token stream; labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (N, block_size)

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def pack_documents(tokenizer: Any, docs: Sequence[str], block_size: int) -> torch.Tensor:
    """Concatenate ``EOS doc EOS doc ...`` and cut it into ``(N, block_size)`` blocks (the tail is dropped).

    Every document follows an EOS, which is also the tokenizer's BOS: the token the evaluator conditions a text's
    first word on (see :mod:`mergescale.world.tokenizer`)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = [eos]
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)  # (N, block_size)


def task_pairs(task: Task, rows: Sequence[MultipleChoiceRow | GenerationRow]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of task rows, formatted as the evaluator scores them (``training_pair``)."""
    if task.kind not in ("multiple_choice", "generation"):
        raise ValueError(f"cannot fine-tune on a task of kind {task.kind!r}")
    return [training_pair(task, r) for r in rows]


def task_candidates(task: Task, rows: Sequence[MultipleChoiceRow | GenerationRow]) -> list[list[str] | None]:
    """For model selection: the continuations a multiple-choice row chooses between (None for generation)."""
    return [continuations(task, r) if isinstance(r, MultipleChoiceRow) else None for r in rows]


def instruction_pairs(rows: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    return [(r["prompt"], " " + r["response"] + "\n") for r in rows]


class SupervisedDataset(Dataset):
    """Tokenised (prompt, answer) pairs; labels mask the prompt so the loss is on the answer only."""

    def __init__(
        self,
        tokenizer: Any,
        pairs: Sequence[tuple[str, str]],
        max_length: int,
        candidates: Sequence[Sequence[str] | None] | None = None,
    ) -> None:
        # candidates[i]: the first token of each continuation example i chooses between (multiple choice), so
        # model selection can score it the way the evaluator does; None for free generation.
        self.candidates: list[list[int] | None] = [
            None if c is None else [tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in c]
            for c in (candidates or [None] * len(pairs))
        ]
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
        wholes = tokenizer([p + a for p, a in pairs], add_special_tokens=False)["input_ids"]
        self.examples: list[tuple[list[int], list[int]]] = []
        for prompt, whole in zip(prompts, wholes, strict=True):
            whole = [*whole, tokenizer.eos_token_id][:max_length]
            labels = [IGNORE] * len(prompt) + whole[len(prompt) :]
            self.examples.append((whole, labels[: len(whole)]))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels}


class PadCollator:
    """Right-pads a batch to its longest example."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

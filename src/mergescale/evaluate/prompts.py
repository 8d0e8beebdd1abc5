"""Prompt construction (pure text, no model): zero- and few-shot contexts exactly as lm-evaluation-harness
builds them, so that a task exported with ``export-lm-eval`` gets the same prompts in the harness.

The harness (``ConfigurableTask.fewshot_context``, ``ContextSampler``) draws the few-shot examples of every
evaluation document, in document order, with one ``random.Random(seed)`` shared by the whole task
(``rnd.sample(train_docs, k)``; seed 1234 unless told otherwise), and renders each example as
``question + target_delimiter + answer + fewshot_delimiter`` before the document's own question.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mergescale.evaluate.tasks import GenerationRow, MultipleChoiceRow, Task


def fewshot_indices(n_docs: int, n_train: int, k: int, seed: int) -> list[list[int]]:
    """Indices into the train split of the ``k`` few-shot examples of each of ``n_docs`` documents.

    One generator for the whole task, consumed in document order: document i's examples depend on i, so the
    first N documents get the same examples whether or not a ``limit`` cuts the rest.
    """
    if k == 0:
        return [[] for _ in range(n_docs)]
    if k > n_train:
        raise ValueError(f"{k} few-shot examples asked for but the train split has {n_train} rows")
    rnd = random.Random(seed)
    population = range(n_train)  # Random.sample draws the same positions for any population of this size
    return [rnd.sample(population, k) for _ in range(n_docs)]


def question_answer(row: MultipleChoiceRow | GenerationRow) -> tuple[str, str]:
    """A row's question and its answer: ``(context, choices[gold])`` or ``(prompt, references[0])``."""
    if isinstance(row, MultipleChoiceRow):
        return row.context, row.choices[row.gold]
    return row.prompt, row.references[0]


def continuations(task: Task, row: MultipleChoiceRow) -> list[str]:
    """What multiple choice scores after the context: ``target_delimiter + choice``, for every choice."""
    return [task.target_delimiter + c for c in row.choices]


def training_pair(task: Task, row: MultipleChoiceRow | GenerationRow) -> tuple[str, str]:
    """A (prompt, answer) pair that teaches a model the task as it is scored: the question, then
    ``target_delimiter + answer`` — for generation followed by the task's first stop sequence, since greedy
    generation is cut there."""
    question, answer = question_answer(row)
    stop = task.generation.stop[0] if isinstance(row, GenerationRow) and task.generation.stop else ""
    return question, task.target_delimiter + answer + stop


def build_contexts(
    task: Task, rows: Sequence[MultipleChoiceRow | GenerationRow], train: Sequence | None
) -> list[str]:
    """The context (prompt) of every row: few-shot examples, then the row's own question.

    Multiple choice: the question is ``context`` and a few-shot answer is ``choices[gold]``; generation: the
    question is ``prompt`` and the answer is ``references[0]``. The row's own answer is never included.
    """
    k = task.num_fewshot
    shots = fewshot_indices(len(rows), len(train) if train is not None else 0, k, task.fewshot_seed)
    contexts: list[str] = []
    for row, picks in zip(rows, shots, strict=True):
        parts: list[str] = []
        for j in picks:
            assert train is not None
            q, a = question_answer(train[j])
            parts.append(q + task.target_delimiter + a + task.fewshot_delimiter)
        parts.append(question_answer(row)[0])
        contexts.append("".join(parts))
    return contexts

"""Model ids of the world and the training formats it shares with the evaluator."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergescale.evaluate.prompts import build_contexts, continuations, training_pair
from mergescale.evaluate.tasks import GenerationRow, MultipleChoiceRow, Task
from mergescale.world.layout import ModelId, WorldLayout


@pytest.mark.parametrize(
    ("model", "text"),
    [
        (ModelId("m", "it", "expert", "nli"), "m/it/experts/nli"),
        (ModelId("s", "pt", "base"), "s/pt/base"),
        (ModelId("l", "it", "multitask"), "l/it/multitask"),
    ],
)
def test_model_ids_round_trip(model: ModelId, text: str) -> None:
    assert str(model) == text and ModelId.parse(text) == model
    assert WorldLayout(Path("/w")).model(model) == Path("/w/models") / text
    assert model.file_stem == text.replace("/", "__")


def test_bad_model_id() -> None:
    with pytest.raises(ValueError, match="not a world model id"):
        ModelId.parse("m/it/expert/nli")


def test_training_pairs_follow_the_scoring_formats() -> None:
    mc = Task(name="mc", data={"test": "t.jsonl"}, target_delimiter=" ")
    row = MultipleChoiceRow(context="Q?", choices=["a", "b"], gold=1)
    prompt, answer = training_pair(mc, row)
    assert prompt == build_contexts(mc, [row], None)[0]  # zero-shot: the evaluator's context
    assert answer == continuations(mc, row)[row.gold]  # the continuation the evaluator scores
    gen = Task(name="g", kind="generation", data={"test": "t.jsonl"}, generation={"stop": ["\n"], "max_new_tokens": 4})
    assert training_pair(gen, GenerationRow(prompt="Say:", references=["hi", "hello"])) == ("Say:", " hi\n")

"""The generated world: determinism, task files that validate, splits, tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from mergescale.evaluate import load_suite, load_task
from mergescale.world.data import IGNORE, SupervisedDataset, task_pairs
from mergescale.world.entities import generate_world
from mergescale.world.generate import write_world
from mergescale.world.presets import FULL, MICRO, PRESETS, QUICK
from mergescale.world.tasks import HELD_IN, HELD_OUT, TASKS, instruction_mixture

HELD_IN_CATEGORIES = {
    "multiple_choice_qa",
    "extractive_qa",
    "closed_book_qa",
    "sentiment_analysis",
    "topic_classification",
    "structure_to_text",
    "summarisation",
    "paraphrase_identification",
}
HELD_OUT_CATEGORIES = {
    "sentence_completion",
    "natural_language_inference",
    "coreference_resolution",
    "word_sense_disambiguation",
}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(generated_world: Path, tmp_path: Path) -> None:
    write_world(7, MICRO.data, tmp_path / "tasks", tmp_path / "corpus", tmp_path / "tokenizer")
    assert _files(tmp_path) == _files(generated_world)


def test_another_seed_gives_another_world(generated_world: Path, tmp_path: Path) -> None:
    write_world(8, MICRO.data, tmp_path / "tasks", tmp_path / "corpus", tmp_path / "tokenizer")
    ours, theirs = _files(tmp_path), _files(generated_world)
    assert ours.keys() == theirs.keys()
    assert ours["corpus/pretrain.txt"] != theirs["corpus/pretrain.txt"]
    assert ours["tasks/nli/test.jsonl"] != theirs["tasks/nli/test.jsonl"]


def test_every_task_validates_with_the_evaluator(generated_world: Path) -> None:
    suite = load_suite(generated_world / "tasks" / "suite.yaml")  # reads and checks every row
    assert [t.name for t in suite.held_in] == list(HELD_IN)
    assert [t.name for t in suite.held_out] == list(HELD_OUT)
    assert {t.category for t in suite.held_in} == HELD_IN_CATEGORIES
    assert {t.category for t in suite.held_out} == HELD_OUT_CATEGORIES
    for task in suite.held_in:
        assert task.data.train is not None and len(task.rows("train")) > 0
    for task in suite.held_out:
        assert task.data.train is None  # never trained on
    val = load_task(generated_world / "tasks" / "pretrain_val.yaml")
    assert val.kind == "perplexity" and len(val.rows()) == MICRO.data.validation_docs
    corpus = set((generated_world / "corpus" / "pretrain.txt").read_text().splitlines())
    assert not corpus & {r.text for r in val.rows()}  # held-out text really is held out


def test_no_test_row_repeats_a_training_row(generated_world: Path) -> None:
    for name in HELD_IN:
        folder = generated_world / "tasks" / name
        keys = {}
        for split in ("train", "validation", "test"):
            rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
            keys[split] = {r.get("context", r.get("prompt")) for r in rows}
        assert not keys["train"] & keys["test"], name
        assert not keys["train"] & keys["validation"], name


def test_knowledge_tasks_ask_about_unseen_facts() -> None:
    """Closed-book test questions are about facts no closed-book training question mentions."""
    from mergescale.world.tasks import generate_task

    world = generate_world(3)
    task = next(t for t in TASKS if t.name == "closed_book_qa")
    rows = generate_task(world, task, {"train": 200, "validation": 20, "test": 40})
    train_q = {r["prompt"] for r in rows["train"]}
    assert rows["test"] and not train_q & {r["prompt"] for r in rows["test"]}


def test_tokenizer_is_word_level_and_exact(generated_world: Path) -> None:
    tok = PreTrainedTokenizerFast.from_pretrained(str(generated_world / "tokenizer"))
    suite = load_suite(generated_world / "tasks" / "suite.yaml")
    for task in suite.tasks:
        for row in task.rows():
            text = row.context if task.kind == "multiple_choice" else row.prompt
            ids = tok(text)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text  # exact round trip, newlines included
            if task.kind == "multiple_choice":
                for choice in row.choices:  # the context/continuation split the scorer relies on
                    assert tok(text + " " + choice)["input_ids"] == ids + tok(" " + choice)["input_ids"]


def test_supervised_examples_train_on_the_answer_only(generated_world: Path) -> None:
    tok = PreTrainedTokenizerFast.from_pretrained(str(generated_world / "tokenizer"))
    from mergescale.evaluate.tasks import MultipleChoiceRow, Task

    task = Task(name="t", data={"test": "test.jsonl"})
    rows = [MultipleChoiceRow(context="Question: Is it?\nAnswer:", choices=["yes", "no"], gold=1)]
    data = SupervisedDataset(tok, task_pairs(task, rows), max_length=64)
    ex = data[0]
    prompt_len = len(tok("Question: Is it?\nAnswer:")["input_ids"])
    assert ex["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert tok.decode(ex["labels"][prompt_len:]) == " no</s>"


def test_instruction_mixture_avoids_task_formats() -> None:
    rows = instruction_mixture(generate_world(0), 70)
    prompts = " ".join(r["prompt"] for r in rows)
    for marker in ("Premise:", "Review:", "Record:", "Options:", "Summary:", "Sentence 1:"):
        assert marker not in prompts


@pytest.mark.parametrize("preset", [QUICK, FULL])
def test_presets_meet_the_issue(preset) -> None:
    assert preset.stable_checkpoints >= 8
    assert len(preset.sizes) >= (2 if preset is QUICK else 3)
    assert preset.pretrain.pma_window <= preset.stable_checkpoints
    assert set(PRESETS) == {"micro", "quick", "full"}


def test_documents_follow_the_token_the_evaluator_starts_a_text_with(generated_world: Path) -> None:
    """The evaluator predicts a text's first token from the tokenizer's BOS; the packed corpus puts that same
    token (EOS, the document separator) before every document, so the first word is trained, not noise."""
    from mergescale.evaluate.encoding import EncoderSettings
    from mergescale.world.data import pack_documents

    tok = PreTrainedTokenizerFast.from_pretrained(str(generated_world / "tokenizer"))
    assert tok.bos_token_id == tok.eos_token_id
    assert EncoderSettings.for_model(tok, None).prefix_token_id == tok.eos_token_id
    docs = ["Alice lives in Paris.", "The bank was near the river."]
    stream = pack_documents(tok, docs, 4).flatten().tolist()
    firsts = [tok(d)["input_ids"][0] for d in docs]
    starts = [i + 1 for i, t in enumerate(stream[:-1]) if t == tok.eos_token_id]
    assert stream[0] == tok.eos_token_id and [stream[i] for i in starts][: len(docs)] == firsts


def test_coreference_gold_agrees_with_the_pronoun() -> None:
    from mergescale.world.tasks import coreference

    world = generate_world(2)
    pronoun_of = {p.name: p.pronoun for p in world.people}
    for i in range(50):
        row = coreference(world, random.Random(i), [])
        asked = str(row["context"]).split("who is ")[1].split("?")[0]
        names = row["choices"]
        assert {pronoun_of[n] for n in names} == {"she", "he"}  # one of each: agreement decides it
        assert pronoun_of[names[row["gold"]]] == asked


def test_word_sense_is_signalled_by_its_topic_words() -> None:
    from mergescale.world.entities import AMBIGUOUS, TOPICS
    from mergescale.world.tasks import TYPED_TOPIC_WORDS, wsd

    world = generate_world(2)
    golds = []
    for i in range(60):
        row = wsd(world, random.Random(i), [])
        word = str(row["context"]).split("the word ")[1].split(" ")[0]
        assert row["choices"] == list(AMBIGUOUS[word])
        sentence = str(row["context"]).split("\n")[0]
        gold_topic = row["choices"][row["gold"]]
        other = row["choices"][1 - row["gold"]]
        words = {w.strip(".,") for w in sentence.split()}
        assert len(words & set(TYPED_TOPIC_WORDS[gold_topic])) == 3 and not words & set(TOPICS[other])
        golds.append(row["gold"])
    assert 0.3 < sum(golds) / len(golds) < 0.7  # either sense is gold: no position wins by itself
    assert not set(AMBIGUOUS) & {w for ws in TOPICS.values() for w in ws}


def test_instruction_mixture_holds_no_held_out_task() -> None:
    """Held-out formats stay out of the mixture, and no instruction picks an answer from listed options (that
    taught the multiple-choice QA format)."""
    world = generate_world(0)
    rows = instruction_mixture(world, 140)
    prompts = " ".join(r["prompt"] for r in rows)
    for marker in ("In the text, who is", "belong to here", "Does the premise", "Sentence:"):
        assert marker not in prompts
    names = {p.name for p in world.people}
    answered_by_name = [r for r in rows if r["response"] in names]
    assert answered_by_name and not any(r["response"] in r["prompt"] for r in answered_by_name)


def test_topic_classification_uses_words_the_mixture_does_not_type() -> None:
    """Word typing (IT) and word senses share one half of each topic's words, topic classification the other:
    the IT base must not be taught the held-in task's own words."""
    from mergescale.world.tasks import CLASSIFIED_TOPIC_WORDS, TYPED_TOPIC_WORDS, topic

    world = generate_world(2)
    typed = {w for ws in TYPED_TOPIC_WORDS.values() for w in ws}
    classified = {w for ws in CLASSIFIED_TOPIC_WORDS.values() for w in ws}
    assert typed and classified and not typed & classified
    for i in range(40):
        text = str(topic(world, random.Random(i), [])["context"]).split("\n")[0]
        assert not {w.strip(".,") for w in text.split()} & typed
    asked = [
        r["prompt"] for r in instruction_mixture(world, 400) if "Which topic does the word" in r["prompt"]
    ]
    assert asked and all(p.split("the word ")[1].split(" ")[0] in typed for p in asked)

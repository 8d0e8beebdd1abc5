"""The world's tasks (pure, seeded): 8 held-in and 4 held-out categories, and the instruction-tuning mixture.

Each task is a generator of rows in the evaluation format (issue #6): multiple choice ``{"context", "choices",
"gold"}`` scored by the log-likelihood of ``target_delimiter + choice``, or generation ``{"prompt",
"references"}``. Held-out tasks lean on skills the held-in ones (and the instruction mixture) teach:

| held-out | leans on |
|---|---|
| sentence completion (workplace of a job, a person's habits) | closed-book / multiple-choice QA (world facts) |
| natural language inference (yes / no) | paraphrase identification, fact verification (IT) |
| coreference (who did it, by the pronoun's gender) | pronoun lookup both ways (IT) |
| word-sense disambiguation (the topic of an ambiguous word's sense) | word typing (IT), topic classification |

Knowledge tasks (closed-book and multiple-choice QA) split the world's facts, not just the questions: a test
question asks about a fact no training question of that task mentions, so the expert must recall it from
pre-training instead of memorising it from its own training set.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mergescale.world.entities import (
    AMBIGUOUS,
    FILLER_SENTENCES,
    JOBS,
    NEGATIVE_WORDS,
    NUMBER_WORDS,
    POSITIVE_WORDS,
    REVIEW_ITEMS,
    TOPICS,
    World,
)
from mergescale.world.templates import (
    RELATIONS,
    article,
    ask,
    deny_fact,
    say_fact,
    value_of,
    value_pools,
    workplace,
)

Row = dict[str, object]
Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
Fact = tuple[
    str, str
]  # (subject, relation): ("Alice Moreno", "city"), ("Paris", "country"), ("baker", "workplace")


@dataclass(frozen=True)
class TaskDef:
    """One task of the suite: its evaluation settings and its row generator."""

    name: str
    category: str
    kind: Literal["multiple_choice", "generation"]
    metrics: tuple[str, ...]
    held: Literal["in", "out"]
    make: Callable[[World, random.Random, list[Fact]], Row]  # (world, rng, facts of this split) -> one row
    uses_facts: bool = False  # split by fact (knowledge tasks) rather than by random draw


# Each topic's words, in two halves: the instruction mixture's word typing and the word-sense task use the first,
# topic classification the second (the corpus uses all of them together). Typing the very words topic
# classification is made of let the IT base solve that held-in task zero-shot (measured 0.81, leaving its expert
# a +0.19 gain); split, the IT base scores 0.2-0.5 on topic and still 0.6-0.9 on word senses.
TYPED_TOPIC_WORDS = {t: ws[: len(ws) // 2] for t, ws in TOPICS.items()}
CLASSIFIED_TOPIC_WORDS = {t: ws[len(ws) // 2 :] for t, ws in TOPICS.items()}


# --- knowledge ---------------------------------------------------------------------------------------------
def all_facts(world: World) -> list[Fact]:
    facts: list[Fact] = [(p.name, rel) for p in world.people for rel in RELATIONS]
    facts += [(c, "country") for c in world.cities]
    facts += [(j, "workplace") for j in sorted(JOBS)]
    return facts


def fact_answer(world: World, fact: Fact, rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, answer, every possible answer) for a fact; the question's phrasing is drawn from ``rng``."""
    subject, rel = fact
    if rel == "country":
        return ask(rng, rel, subject), world.country_of[subject], list(world.countries)
    if rel == "workplace":
        return ask(rng, rel, article(subject)), workplace(subject), [p for p, _ in JOBS.values()]
    person = world.person(subject)
    return ask(rng, rel, subject), value_of(person, rel), value_pools(world.cities)[rel]


def split_facts(world: World, rng: random.Random) -> dict[Split, list[Fact]]:
    """60 / 20 / 20 partition of the world's facts."""
    facts = all_facts(world)
    rng.shuffle(facts)
    a, b = int(0.6 * len(facts)), int(0.8 * len(facts))
    return {"train": facts[:a], "validation": facts[a:b], "test": facts[b:]}


def mcqa(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    question, answer, pool = fact_answer(world, rng.choice(facts), rng)
    others = [v for v in pool if v != answer]
    choices = [answer, *rng.sample(others, min(3, len(others)))]
    rng.shuffle(choices)
    return {
        "context": f"Question: {question}\nOptions: {', '.join(choices)}\nAnswer:",
        "choices": choices,
        "gold": choices.index(answer),
    }


def closed_book_qa(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    question, answer, _ = fact_answer(world, rng.choice(facts), rng)
    return {"prompt": f"Question: {question}\nAnswer:", "references": [answer]}


# --- reading -----------------------------------------------------------------------------------------------
def _counterfactual_people(world: World, rng: random.Random, k: int) -> list[tuple[str, dict[str, str]]]:
    """k people with random attribute values (not the world's): a context the answer must be read from."""
    pools = value_pools(world.cities)
    people = rng.sample(world.people, k)
    return [(p.name, {rel: rng.choice(pools[rel]) for rel in RELATIONS}) for p in people]


def extractive_qa(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    """Four facts about two people (values drawn at random, not the world's), each of a different relation, and
    a question about one: the answer is the span of the context that fits the question."""
    people = _counterfactual_people(world, rng, 2)
    relations = rng.sample(RELATIONS, 4)
    stated = [(people[i % 2][0], rel, people[i % 2][1][rel]) for i, rel in enumerate(relations)]
    rng.shuffle(stated)
    context = " ".join(say_fact(rng, n, r, v) for n, r, v in stated)
    name, rel, value = rng.choice(stated)
    return {"prompt": f"Context: {context}\nQuestion: {ask(rng, rel, name)}\nAnswer:", "references": [value]}


def sentiment(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    positive = rng.random() < 0.5
    item = rng.choice(REVIEW_ITEMS)
    clauses = []
    for subject in (f"the {item}", rng.choice(("the service", "the place", "the music", "the staff"))):
        negate = rng.random() < 0.4
        word = rng.choice(NEGATIVE_WORDS if positive == negate else POSITIVE_WORDS)
        clauses.append(f"{subject} was {'not ' if negate else ''}{word}")
    text = f"I went to a {item} in {rng.choice(world.cities)}. {clauses[0].capitalize()} and {clauses[1]}."
    return {
        "context": f"Review: {text}\nQuestion: Is this review positive or negative?\nAnswer:",
        "choices": ["positive", "negative"],
        "gold": 0 if positive else 1,
    }


def topic(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    names = sorted(TOPICS)
    gold = rng.randrange(len(names))
    w = rng.sample(CLASSIFIED_TOPIC_WORDS[names[gold]], 3)
    person = rng.choice(world.people).first
    text = rng.choice(
        (
            f"{person} talked about the {w[0]}, the {w[1]} and the {w[2]}.",
            f"The {w[0]} and the {w[1]} were in the news, and so was the {w[2]}.",
            f"Yesterday {person} wrote about the {w[0]} and the {w[1]} near the {w[2]}.",
        )
    )
    return {
        "context": f"Text: {text}\nQuestion: What is the topic of the text?\nAnswer:",
        "choices": names,
        "gold": gold,
    }


def struct_to_text(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    name, vals = _counterfactual_people(world, rng, 1)[0]
    rels = sorted(rng.sample(RELATIONS, rng.randint(2, 3)), key=RELATIONS.index)
    record = " | ".join([f"name: {name}"] + [f"{r}: {vals[r]}" for r in rels])
    phrases = {
        "city": f"lives in {vals['city']}",
        "job": f"works as {article(vals['job'])}",
        "food": f"likes {vals['food']}",
        "pet": f"has {article(vals['pet'])}",
        "item": f"owns {article(vals['item'])}",
    }
    parts = [phrases[r] for r in rels]
    sentence = f"{name} {', '.join(parts[:-1])} and {parts[-1]}."
    return {"prompt": f"Record: {record}\nSentence:", "references": [sentence]}


def summarisation(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    name, vals = _counterfactual_people(world, rng, 1)[0]
    event = rng.choice(
        (
            f"moved to {vals['city']}",
            f"became {article(vals['job'])}",
            f"adopted {article(vals['pet'])}",
            f"bought {article(vals['item'])}",
        )
    )
    when = rng.choice(
        ("Last year", "After a long trip", "In the spring", "One cold morning", "Two weeks ago")
    )
    why = rng.choice(("to start a new life", "after much thought", "with the help of a friend", "at last"))
    key = f"{when}, {name} {event} {why}."
    fillers = rng.sample(FILLER_SENTENCES, 3)
    text = " ".join(
        [*fillers[:1], key, *fillers[1:]] if rng.random() < 0.5 else [*fillers[:2], key, fillers[2]]
    )
    return {"prompt": f"Text: {text}\nSummary:", "references": [f"{name} {event}."]}


def paraphrase(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    """A fact of the world and a second sentence about the same person and relation: the fact reworded (a
    paraphrase), or not one: the fact negated (9 in 10) or with another value. Comparing the two sentences answers
    it, and knowing the world helps; the held-out inference task needs the same skills. Experts at these sizes
    never learn to compare the two values (measured 0 of 22 such rows right, every other row right), so that kind
    is kept rare: at 1 negative in 4 it capped the expert at 0.78 and its gain over the base at ~0.25."""
    pools = value_pools(world.cities)
    p = rng.choice(world.people)
    rel = rng.choice(RELATIONS)
    value = value_of(p, rel)
    t1, t2 = rng.sample(range(4), 2)
    same = rng.random() < 0.5
    s1 = say_fact(rng, p.name, rel, value, template=t1)
    if same:
        s2 = say_fact(rng, p.name, rel, value, template=t2)
    elif rng.random() < 0.9:
        s2 = deny_fact(p.name, rel, value)
    else:
        s2 = say_fact(rng, p.name, rel, rng.choice([v for v in pools[rel] if v != value]), template=t2)
    return {
        "context": f"Sentence 1: {s1}\nSentence 2: {s2}\nQuestion: Do both sentences mean the same?\nAnswer:",
        "choices": ["yes", "no"],
        "gold": 0 if same else 1,
    }


# --- held out ----------------------------------------------------------------------------------------------
def completion(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    """The plausible end of a short story: a job's workplace, or the person's own food or pet (world facts)."""
    p = rng.choice(world.people)
    kind = rng.choice(("workplace", "food", "pet"))
    pools = value_pools(world.cities)
    name, pron, poss, job = p.name, p.pronoun, p.possessive, article(p.job)
    if kind == "workplace":
        story = rng.choice(
            (
                f"{name} is {job}. Every morning {pron} walks to the",
                f"As {job}, {name} spends most days at the",
                f"{name} went to work early. Being {job}, {pron} was the first to arrive at the",
            )
        )
        answer, pool = workplace(p.job), [w for w, _ in JOBS.values()]
    elif kind == "food":
        story = rng.choice(
            (
                f"{name} was hungry after work. So {pron} went home and cooked some",
                f"For dinner {name} ordered {poss} favorite food, which is",
                f"At the market {name} bought what {pron} likes most:",
            )
        )
        answer, pool = p.food, pools["food"]
    else:
        story = rng.choice(
            (
                f"{name} came home late. The first thing {pron} did was to feed {poss}",
                f"{name} took a walk in the park. Everyone there likes {poss}",
                f"The neighbours of {name} often hear the noise of {poss}",
            )
        )
        answer, pool = p.pet, pools["pet"]
    choices = [answer, *rng.sample([v for v in pool if v != answer], 3)]
    rng.shuffle(choices)
    return {"context": story, "choices": choices, "gold": choices.index(answer)}


def nli(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    """Two-way inference (as RTE): the premise states two of a person's facts (as the world has them); the
    hypothesis rewords one of them (entailed: yes), or contradicts one by another value or a negation, or states
    a relation the premise does not mention (not entailed: no)."""
    pools = value_pools(world.cities)
    p = rng.choice(world.people)
    rels = rng.sample(RELATIONS, 3)
    premise = " ".join(say_fact(rng, p.name, r, value_of(p, r), template=0) for r in rels[:2])
    kind = rng.choice(("entailment", "entailment", "contradiction", "neutral"))
    rel = rels[2] if kind == "neutral" else rng.choice(rels[:2])
    value = value_of(p, rel)
    if kind == "contradiction" and rng.random() < 0.5:
        hypothesis = deny_fact(p.name, rel, value)
    else:
        if kind == "contradiction":
            value = rng.choice([v for v in pools[rel] if v != value])
        elif kind == "neutral":
            value = rng.choice(pools[rel])  # true or not in the world, the premise does not say
        hypothesis = say_fact(rng, p.name, rel, value, template=rng.randrange(1, 4))
    return {
        "context": f"Premise: {premise}\nHypothesis: {hypothesis}\n"
        "Question: Does the premise imply the hypothesis? yes or no?\nAnswer:",
        "choices": ["yes", "no"],
        "gold": 0 if kind == "entailment" else 1,
    }


def coreference(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    """Who a pronoun refers to, between two people of different genders: the name whose pronoun (used
    consistently for each person throughout the corpus) agrees with it."""
    a = rng.choice(world.people)
    b = rng.choice([p for p in world.people if p.pronoun != a.pronoun])
    first, second = rng.sample((a, b), 2)
    actor = rng.choice((a, b))
    action = rng.choice(
        (
            f"ordered some {rng.choice(value_pools(world.cities)['food'])}",
            f"paid for the {rng.choice(REVIEW_ITEMS)}",
            "told a long story",
            "left early",
            f"talked about {rng.choice(world.cities)}",
            "laughed loudly",
        )
    )
    text = f"{first.name} and {second.name} met in {rng.choice(world.cities)}. {actor.pronoun.capitalize()} {action}."
    choices = [first.name, second.name]
    return {
        "context": f"Text: {text}\nQuestion: In the text, who is {actor.pronoun}?\nAnswer:",
        "choices": choices,
        "gold": choices.index(actor.name),
    }


def wsd(world: World, rng: random.Random, facts: list[Fact]) -> Row:
    """Which of its two senses an ambiguous word has, each sense named by its topic; the sentence around the word
    holds three words of the gold sense's topic. The instruction mixture's word typing teaches which topic these
    words belong to (in the question's own words), topic classification (held-in) the topic labels over other
    words; the pre-training corpus pairs each sense with its words."""
    word = rng.choice(sorted(AMBIGUOUS))
    senses = AMBIGUOUS[word]
    gold = rng.randrange(2)
    c = rng.sample(TYPED_TOPIC_WORDS[senses[gold]], 3)
    name = rng.choice(world.people).first
    sentence = rng.choice(
        (
            f"{name} saw the {word} near the {c[0]}, the {c[1]} and the {c[2]}.",
            f"The {word} was next to the {c[0]} and the {c[1]}, and the {c[2]} was close by.",
            f"After the {c[0]} and the {c[1]}, {name} talked about the {word} and the {c[2]}.",
        )
    )
    return {
        "context": f"Sentence: {sentence}\nQuestion: Which topic does the word {word} belong to here?\nAnswer:",
        "choices": list(senses),
        "gold": gold,
    }


GEN_QA = ("exact_match", "f1", "rouge_l")
MC = ("acc", "acc_norm")
TASKS: tuple[TaskDef, ...] = (
    TaskDef("mcqa", "multiple_choice_qa", "multiple_choice", MC, "in", mcqa, uses_facts=True),
    TaskDef("extractive_qa", "extractive_qa", "generation", GEN_QA, "in", extractive_qa),
    TaskDef("closed_book_qa", "closed_book_qa", "generation", GEN_QA, "in", closed_book_qa, uses_facts=True),
    TaskDef("sentiment", "sentiment_analysis", "multiple_choice", MC, "in", sentiment),
    TaskDef("topic", "topic_classification", "multiple_choice", MC, "in", topic),
    TaskDef("struct_to_text", "structure_to_text", "generation", ("rouge_l",), "in", struct_to_text),
    TaskDef("summarisation", "summarisation", "generation", ("rouge_l",), "in", summarisation),
    TaskDef("paraphrase", "paraphrase_identification", "multiple_choice", MC, "in", paraphrase),
    TaskDef("completion", "sentence_completion", "multiple_choice", MC, "out", completion),
    TaskDef("nli", "natural_language_inference", "multiple_choice", MC, "out", nli),
    TaskDef("coreference", "coreference_resolution", "multiple_choice", MC, "out", coreference),
    TaskDef("wsd", "word_sense_disambiguation", "multiple_choice", MC, "out", wsd),
)
HELD_IN = tuple(t.name for t in TASKS if t.held == "in")
HELD_OUT = tuple(t.name for t in TASKS if t.held == "out")


def row_key(row: Row) -> str:
    return str(row.get("context", row.get("prompt")))


def generate_task(world: World, task: TaskDef, sizes: dict[Split, int]) -> dict[Split, list[Row]]:
    """Rows of every split; no test or validation row repeats a training row's text."""
    facts = split_facts(world, random.Random(f"facts-{world.seed}"))
    seen: set[str] = set()
    out: dict[Split, list[Row]] = {}
    for split in SPLITS:  # train first, so later splits avoid its rows
        rng = random.Random(f"task-{world.seed}-{task.name}-{split}")
        rows: list[Row] = []
        attempts = 0
        while len(rows) < sizes[split] and attempts < 50 * sizes[split]:
            attempts += 1
            row = task.make(world, rng, facts[split])
            if row_key(row) in seen:
                continue
            seen.add(row_key(row))
            rows.append(row)
        out[split] = rows
    return out


# --- instruction-tuning mixture (other task kinds than the 12 above) ------------------------------------------
def _it_fact_check(world: World, rng: random.Random) -> tuple[str, str]:
    p = rng.choice(world.people)
    rel = rng.choice(RELATIONS)
    true = rng.random() < 0.5
    value = (
        value_of(p, rel)
        if true
        else rng.choice([v for v in value_pools(world.cities)[rel] if v != value_of(p, rel)])
    )
    return (
        f"Statement: {say_fact(rng, p.name, rel, value)}\nQuestion: Is this statement true?\nAnswer:",
        "yes" if true else "no",
    )


def _it_typing(world: World, rng: random.Random) -> tuple[str, str]:
    kinds = {
        "person": [p.name for p in world.people],
        "city": list(world.cities),
        "country": list(world.countries),
        "food": list(value_pools(world.cities)["food"]),
        "animal": list(value_pools(world.cities)["pet"]),
        "object": list(value_pools(world.cities)["item"]),
        "job": sorted(JOBS),
    }
    if rng.random() < 0.4:
        t = rng.choice(sorted(TOPICS))
        word = rng.choice(TYPED_TOPIC_WORDS[t])
        return (f"Question: Which topic does the word {word} belong to?\nAnswer:", t)
    kind = rng.choice(sorted(kinds))
    return f"Question: What kind of thing is {rng.choice(kinds[kind])}?\nAnswer:", kind


def _it_counting(world: World, rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 6)
    items = rng.sample(value_pools(world.cities)["item"] + value_pools(world.cities)["pet"], n)
    return f"List: {', '.join(items)}\nQuestion: How many things are in the list?\nAnswer:", NUMBER_WORDS[n]


def _it_copy(world: World, rng: random.Random) -> tuple[str, str]:
    p = rng.choice(world.people)
    rel = rng.choice(RELATIONS)
    text = say_fact(rng, p.name, rel, value_of(p, rel))
    return f"Text: {text}\nQuestion: Repeat the text.\nAnswer:", text


def _it_pronoun(world: World, rng: random.Random) -> tuple[str, str]:
    """Pronoun lookup: a person's pronoun."""
    p = rng.choice(world.people)
    return f"Question: Which pronoun is used for {p.name}?\nAnswer:", p.pronoun


def _it_person_for_pronoun(world: World, rng: random.Random) -> tuple[str, str]:
    """Pronoun lookup the other way: any person a pronoun is used for. No options to pick from: a "which of
    these" kind teaches the multiple-choice QA format (measured: the IT base's mcqa 0.37 -> 0.71)."""
    p = rng.choice(world.people)
    return f"Question: Who is a person the pronoun {p.pronoun} is used for?\nAnswer:", p.name


def _it_polarity(world: World, rng: random.Random) -> tuple[str, str]:
    good = rng.random() < 0.5
    word = rng.choice(POSITIVE_WORDS if good else NEGATIVE_WORDS)
    return f"Question: Is the word {word} good or bad?\nAnswer:", "good" if good else "bad"


OPPOSITES = (
    ("good", "bad"),
    ("hot", "cold"),
    ("big", "small"),
    ("early", "late"),
    ("happy", "sad"),
    ("old", "new"),
    ("long", "short"),
    ("light", "dark"),
    ("first", "last"),
    ("open", "closed"),
)


def _it_opposite(world: World, rng: random.Random) -> tuple[str, str]:
    pair = rng.choice(OPPOSITES)
    word, answer = pair if rng.random() < 0.5 else pair[::-1]
    return f"Question: What is the opposite of {word}?\nAnswer:", answer


INSTRUCTION_KINDS = (
    _it_fact_check,
    _it_typing,
    _it_counting,
    _it_copy,
    _it_pronoun,
    _it_person_for_pronoun,
    _it_polarity,
    _it_opposite,
)


def instruction_mixture(world: World, n: int) -> list[dict[str, str]]:
    """``n`` instruction rows ``{"prompt", "response"}``, equally drawn from the kinds above."""
    rng = random.Random(f"instruct-{world.seed}")
    rows = []
    for i in range(n):
        prompt, response = INSTRUCTION_KINDS[i % len(INSTRUCTION_KINDS)](world, rng)
        rows.append({"prompt": prompt, "response": response})
    rng.shuffle(rows)
    return rows

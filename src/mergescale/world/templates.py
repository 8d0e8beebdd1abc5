"""Sentence templates shared by the pre-training corpus, the tasks and the instruction mixture.

One place for how a fact is said, so that a fact read in pre-training and the same fact asked about in a task
use the same words in different phrasings, the way real tasks share language with a pre-training corpus.
"""

from __future__ import annotations

import random

from mergescale.world.entities import ANIMALS, FOODS, JOBS, OBJECTS, Person

RELATIONS = ("city", "job", "food", "pet", "item")

# relation -> ways of stating "<name> <relation> <value>"; {a} is the value with its article ("a cat", "an owl").
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "{name} lives in {value}.",
        "{name} is from {value}.",
        "The home of {name} is in {value}.",
        "{name} has a house in {value}.",
    ),
    "job": (
        "{name} works as {a}.",
        "{name} is {a}.",
        "By trade, {name} is {a}.",
        "{name} earns a living as {a}.",
    ),
    "food": (
        "{name} likes {value}.",
        "{name} loves to eat {value}.",
        "The favorite food of {name} is {value}.",
        "{name} often eats {value}.",
    ),
    "pet": (
        "{name} has {a}.",
        "{name} keeps {a} as a pet.",
        "The pet of {name} is {a}.",
        "{name} takes care of {a}.",
    ),
    "item": (
        "{name} owns {a}.",
        "{name} bought {a}.",
        "There is {a} in the house of {name}.",
        "{name} has an old {value}.",
    ),
}

# The negation of a fact (paraphrase identification and inference: "does not" changes the meaning).
NEGATED_TEMPLATES: dict[str, str] = {
    "city": "{name} does not live in {value}.",
    "job": "{name} is not {a}.",
    "food": "{name} does not like {value}.",
    "pet": "{name} does not have {a}.",
    "item": "{name} does not own {a}.",
}

# The same facts said with a pronoun as subject, for the sentences after a person is introduced.
PRONOUN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": ("{Pron} lives in {value}.", "{Pron} has a house in {value}."),
    "job": ("{Pron} works as {a}.", "{Pron} is {a}."),
    "food": ("{Pron} likes {value}.", "{Pron} loves to eat {value}."),
    "pet": ("{Pron} has {a}.", "{Pron} keeps {a} as a pet."),
    "item": ("{Pron} owns {a}.", "{Pron} bought {a}."),
}

# relation -> ways of asking for the value; {name} is the subject (a person, a city, a job).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "city": (
        "Which city does {name} live in?",
        "Where does {name} live?",
        "In which city is the home of {name}?",
    ),
    "job": ("What is the job of {name}?", "What does {name} do for a living?", "What work does {name} do?"),
    "food": (
        "What food does {name} like?",
        "What does {name} like to eat?",
        "What is the favorite food of {name}?",
    ),
    "pet": (
        "What pet does {name} have?",
        "Which animal does {name} keep?",
        "What animal does {name} take care of?",
    ),
    "item": ("What does {name} own?", "What object does {name} have?", "What did {name} buy?"),
    "country": (
        "Which country is {name} in?",
        "In which country does {name} lie?",
        "{name} is a city in which country?",
    ),
    "workplace": (
        "Where does {name} work?",
        "At which place does {name} work?",
        "Where does {name} go to work?",
    ),
}


def ask(rng: random.Random, relation: str, name: str) -> str:
    """A question for the value of ``relation`` of ``name``, in a random phrasing."""
    return rng.choice(QUESTIONS[relation]).format(name=name)


def article(word: str) -> str:
    """``word`` with its indefinite article: ``a cat``, ``an owl``."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def value_of(person: Person, relation: str) -> str:
    return getattr(person, relation)


def say_fact(rng: random.Random, name: str, relation: str, value: str, *, template: int | None = None) -> str:
    """One sentence stating the fact; ``template`` picks a phrasing, else a random one."""
    options = FACT_TEMPLATES[relation]
    text = options[rng.randrange(len(options)) if template is None else template % len(options)]
    return text.format(name=name, value=value, a=article(value))


def deny_fact(name: str, relation: str, value: str) -> str:
    return NEGATED_TEMPLATES[relation].format(name=name, value=value, a=article(value))


def say_pronoun_fact(rng: random.Random, pronoun: str, relation: str, value: str) -> str:
    text = rng.choice(PRONOUN_TEMPLATES[relation])
    return text.format(Pron=pronoun.capitalize(), value=value, a=article(value))


def workplace(job: str) -> str:
    return JOBS[job][0]


def random_value(rng: random.Random, relation: str, pools: dict[str, list[str]]) -> str:
    return rng.choice(pools[relation])


def value_pools(cities: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """relation -> every value it can take in a world with these cities."""
    return {
        "city": list(cities),
        "job": sorted(JOBS),
        "food": list(FOODS),
        "pet": list(ANIMALS),
        "item": list(OBJECTS),
    }

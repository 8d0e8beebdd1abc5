"""The pre-training corpus: short documents of plain prose about the world (pure, seeded).

Documents state the world's facts in varied phrasings (biographies, places, jobs), tell small stories with
pronouns, write reviews with polar words and negation, talk about topics, and use the ambiguous words in both
senses. None of them is in a task's question/answer format: the pre-trained base learns the language and the
facts, and the fine-tuned models learn the formats. The validation text is drawn from the same generators with
a different random stream, so it is held-out text over the same world.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mergescale.world.entities import (
    AMBIGUOUS,
    COLORS,
    DAYS,
    FILLER_SENTENCES,
    JOBS,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    REVIEW_ITEMS,
    TOPICS,
    World,
)
from mergescale.world.templates import (
    RELATIONS,
    article,
    deny_fact,
    say_fact,
    say_pronoun_fact,
    value_of,
    value_pools,
)


def biography(world: World, rng: random.Random) -> str:
    """A person's facts in random order: the name first, then mostly pronouns (teaches who 'she' is)."""
    p = rng.choice(world.people)
    relations = list(RELATIONS)
    rng.shuffle(relations)
    sentences = [say_fact(rng, p.name, relations[0], value_of(p, relations[0]))]
    for rel in relations[1:]:
        if rng.random() < 0.6:
            sentences.append(say_pronoun_fact(rng, p.pronoun, rel, value_of(p, rel)))
        else:
            sentences.append(say_fact(rng, rng.choice((p.name, p.first)), rel, value_of(p, rel)))
    if rng.random() < 0.5:
        sentences.append(f"{p.first} is a friend of {p.friend}.")
    if rng.random() < 0.3:  # what is not so, said as such
        rel = rng.choice(RELATIONS)
        other = rng.choice([v for v in value_pools(world.cities)[rel] if v != value_of(p, rel)])
        sentences.append(deny_fact(p.first, rel, other))
    return " ".join(sentences)


def place_facts(world: World, rng: random.Random) -> str:
    country = rng.choice(world.countries)
    cities = [c for c in world.cities if world.country_of[c] == country]
    sentences = [f"The capital of {country} is {world.capital_of[country]}."]
    for city in rng.sample(cities, len(cities)):
        sentences.append(rng.choice((f"{city} is a city in {country}.", f"{city} lies in {country}.")))
    people = [p for p in world.people if p.city in cities]
    if people:
        p = rng.choice(people)
        sentences.append(f"{p.name} lives in {p.city}, in {country}.")
    return " ".join(sentences)


def job_facts(world: World, rng: random.Random) -> str:
    job = rng.choice(sorted(JOBS))
    place, thing = JOBS[job]
    sentences = [
        rng.choice((f"A {job} works at the {place}.", f"Every {job} goes to the {place} to work.")),
        f"The work of {article(job)} is about {thing}.",
    ]
    workers = [p for p in world.people if p.job == job]
    if workers:
        p = rng.choice(workers)
        sentences.append(f"{p.name} is {article(job)}, so {p.pronoun} goes to the {place} every morning.")
    return " ".join(sentences)


def meeting_story(world: World, rng: random.Random) -> str:
    """Two people of different genders; pronouns refer back to them (the skill coreference needs)."""
    a = rng.choice(world.people)
    b = rng.choice([p for p in world.people if p.pronoun != a.pronoun])
    s = [f"{a.name} and {b.name} met in {rng.choice((a.city, b.city))}."]
    for person in rng.sample((a, b), 2):
        s.append(
            rng.choice(
                (
                    f"{person.pronoun.capitalize()} talked about {person.possessive} {person.pet}.",
                    f"{person.pronoun.capitalize()} ordered some {person.food}.",
                    f"{person.pronoun.capitalize()} said that {person.pronoun} works as {article(person.job)}.",
                    f"{person.pronoun.capitalize()} showed {person.possessive} {person.item}.",
                )
            )
        )
    return " ".join(s)


def review(world: World, rng: random.Random) -> str:
    """A review whose polarity shows in its adjectives, sometimes through negation, and in its last words."""
    positive = rng.random() < 0.5
    name = rng.choice(world.people).name
    item = rng.choice(REVIEW_ITEMS)
    good, bad = rng.choice(POSITIVE_WORDS), rng.choice(NEGATIVE_WORDS)
    if positive:
        core = rng.choice((f"The {item} was {good}.", f"The {item} was not {bad} at all."))
        end = rng.choice(("was happy and wants to go again.", "told every friend about it."))
    else:
        core = rng.choice((f"The {item} was {bad}.", f"The {item} was not {good} at all."))
        end = rng.choice(("was sad and will not go again.", "asked for the money back."))
    verdict = f" It was a {'positive' if positive else 'negative'} experience." if rng.random() < 0.5 else ""
    return f"{name} went to a {item} in {rng.choice(world.cities)}. {core} {name.split()[0]} {end}{verdict}"


def day_story(world: World, rng: random.Random) -> str:
    """What two people did one day (not facts of the world), then a sentence that refers back to it: predicting
    the end needs reading the story, the skill extractive QA, inference and coreference rest on."""
    pools = value_pools(world.cities)
    a = rng.choice(world.people)
    b = rng.choice([p for p in world.people if p.pronoun != a.pronoun])
    day = rng.choice(DAYS)
    what = {
        p.name: (rng.choice(pools["city"]), rng.choice(COLORS), rng.choice(pools["item"])) for p in (a, b)
    }
    s = [f"On {day}, {a.name} visited {what[a.name][0]} and {b.name} visited {what[b.name][0]}."]
    for p in rng.sample((a, b), 2):
        s.append(f"{p.name} wore a {what[p.name][1]} coat and carried {article(what[p.name][2])}.")
    p = rng.choice((a, b))
    city, color, item = what[p.name]
    s.append(
        rng.choice(
            (
                f"In the evening, {p.first} came back from {city}.",
                f"Later, {p.first} lost {p.possessive} {color} coat.",
                f"At night, {p.pronoun} put the {item} away.",
                f"The one who visited {city} was {p.name}.",
            )
        )
    )
    return " ".join(s)


def paraphrase_text(world: World, rng: random.Random) -> str:
    """A fact said twice in two phrasings (what paraphrase identification and inference compare)."""
    p = rng.choice(world.people)
    rel = rng.choice(RELATIONS)
    t1, t2 = rng.sample(range(4), 2)
    first = say_fact(rng, p.name, rel, value_of(p, rel), template=t1)
    second = say_fact(rng, p.name, rel, value_of(p, rel), template=t2)
    return f"{first} In other words, {second[0].lower() + second[1:] if second.startswith('The') else second}"


def topic_text(world: World, rng: random.Random) -> str:
    topic = rng.choice(sorted(TOPICS))
    w = rng.sample(TOPICS[topic], 4)
    return (
        f"This is about {topic}. The {w[0]} and the {w[1]} were discussed. "
        f"Later everyone talked about the {w[2]} and the {w[3]}."
    )


def sense_text(world: World, rng: random.Random) -> str:
    """An ambiguous word among words of one of its senses' topics, sometimes with the sense named."""
    word = rng.choice(sorted(AMBIGUOUS))
    sense = rng.choice(AMBIGUOUS[word])
    c = rng.sample(TOPICS[sense], 3)
    text = f"The {word} was near the {c[0]} and the {c[1]}. Everyone saw the {c[2]}."
    if rng.random() < 0.5:
        text += f" Here the {word} is about {sense}."
    return text


def event_story(world: World, rng: random.Random) -> str:
    """An event of a person's life among ordinary sentences, sometimes closed by a one-line summary."""
    p = rng.choice(world.people)
    pools = value_pools(world.cities)
    own = rng.random() < 0.5  # half the events are the world's facts, half are news the text alone tells
    city, job, pet, item = (
        (p.city, p.job, p.pet, p.item)
        if own
        else (
            rng.choice(pools["city"]),
            rng.choice(pools["job"]),
            rng.choice(pools["pet"]),
            rng.choice(pools["item"]),
        )
    )
    event = rng.choice(
        (f"moved to {city}", f"became {article(job)}", f"adopted {article(pet)}", f"bought {article(item)}")
    )
    when = rng.choice(
        ("Last year", "After a long trip", "In the spring", "One cold morning", "Two weeks ago")
    )
    fillers = rng.sample(FILLER_SENTENCES, 2)
    text = " ".join((fillers[0], f"{when}, {p.name} {event}.", fillers[1]))
    if rng.random() < 0.5:
        text += f" In short, {p.name} {event}."
    return text


# generator -> weight in the corpus; biographies lead because closed-book tasks need the facts remembered.
DOCUMENTS: tuple[tuple[Callable[[World, random.Random], str], float], ...] = (
    (biography, 0.30),
    (place_facts, 0.06),
    (job_facts, 0.06),
    (meeting_story, 0.08),
    (day_story, 0.14),
    (paraphrase_text, 0.06),
    (review, 0.08),
    (topic_text, 0.06),
    (sense_text, 0.08),
    (event_story, 0.08),
)


def documents(world: World, n: int, stream: str) -> list[str]:
    """``n`` documents drawn from the mixture above; ``stream`` ("train", "validation") picks the random stream."""
    rng = random.Random(f"corpus-{world.seed}-{stream}")
    gens = [g for g, _ in DOCUMENTS]
    weights = [w for _, w in DOCUMENTS]
    return [rng.choices(gens, weights)[0](world, rng) for _ in range(n)]

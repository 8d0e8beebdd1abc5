"""The generated world: entities, their attributes and relations, and the word lists the texts are made of.

Everything here is pure and seeded: ``generate_world(seed, spec)`` returns the same :class:`World` for the same
arguments on any machine. The word pools are fixed English words; the seed decides which of them exist in a
world and how they are related (who lives where, which city lies in which country, ...), so two seeds give two
different worlds over one vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

# --- word pools -------------------------------------------------------------------------------------------
FEMALE_NAMES = [
    "Alice",
    "Clara",
    "Diana",
    "Emma",
    "Fiona",
    "Grace",
    "Hannah",
    "Iris",
    "Julia",
    "Kate",
    "Laura",
    "Maria",
    "Nina",
    "Olga",
    "Paula",
    "Rosa",
    "Sara",
    "Tina",
    "Vera",
    "Wendy",
    "Anna",
    "Bella",
    "Carla",
    "Dora",
    "Elsa",
    "Freya",
    "Gina",
    "Helen",
    "Ida",
    "Jane",
    "Lena",
    "Mona",
    "Nora",
    "Ruth",
    "Tara",
    "Uma",
    "Zoe",
    "Eva",
    "Lily",
    "Mia",
]
MALE_NAMES = [
    "Adam",
    "Ben",
    "Carl",
    "David",
    "Eric",
    "Frank",
    "George",
    "Henry",
    "Ivan",
    "Jack",
    "Kevin",
    "Leo",
    "Mark",
    "Nick",
    "Oscar",
    "Paul",
    "Ralph",
    "Sam",
    "Tom",
    "Victor",
    "Walter",
    "Alan",
    "Bruno",
    "Colin",
    "Dean",
    "Ethan",
    "Felix",
    "Hugo",
    "Igor",
    "Jonas",
    "Karl",
    "Luke",
    "Max",
    "Noah",
    "Omar",
    "Peter",
    "Rex",
    "Simon",
    "Theo",
    "Owen",
]
SURNAMES = [
    "Moreno",
    "Baker",
    "Ito",
    "Novak",
    "Silva",
    "Brown",
    "Keller",
    "Lopez",
    "Meyer",
    "Rossi",
    "Adams",
    "Fischer",
    "Garcia",
    "Hansen",
    "Jensen",
    "Kowal",
    "Larsen",
    "Martin",
    "Nagy",
    "Olsen",
    "Petrov",
    "Quinn",
    "Reyes",
    "Schmidt",
    "Torres",
    "Vogel",
    "Weber",
    "Young",
    "Zhang",
    "Costa",
    "Dubois",
    "Evans",
    "Fox",
    "Gray",
    "Hill",
    "Ivanov",
    "Kim",
    "Lee",
    "Marsh",
    "Nolan",
]
CITIES = [
    "Paris",
    "Rome",
    "Oslo",
    "Lima",
    "Cairo",
    "Dublin",
    "Madrid",
    "Vienna",
    "Prague",
    "Lisbon",
    "Athens",
    "Berlin",
    "Tokyo",
    "Seoul",
    "Delhi",
    "Quito",
    "Nairobi",
    "Havana",
    "Riga",
    "Sofia",
    "Minsk",
    "Kyiv",
    "Bern",
    "Porto",
    "Milan",
    "Lyon",
    "Munich",
    "Boston",
    "Denver",
    "Austin",
    "Toronto",
    "Sydney",
]
COUNTRIES = [
    "Avaria",
    "Belmont",
    "Corvia",
    "Dorland",
    "Estova",
    "Faroa",
    "Galdor",
    "Helvar",
    "Istria",
    "Jorvik",
    "Kalmar",
    "Lunor",
]
# job -> (workplace, what the job involves); sentence completion and the corpus use both.
JOBS = {
    "baker": ("bakery", "bread"),
    "doctor": ("hospital", "patients"),
    "teacher": ("school", "lessons"),
    "pilot": ("airport", "planes"),
    "farmer": ("farm", "crops"),
    "chef": ("restaurant", "meals"),
    "lawyer": ("court", "cases"),
    "nurse": ("clinic", "patients"),
    "painter": ("studio", "paintings"),
    "librarian": ("library", "books"),
    "mechanic": ("garage", "cars"),
    "banker": ("office", "loans"),
    "fisher": ("harbor", "boats"),
    "singer": ("theater", "songs"),
    "gardener": ("park", "flowers"),
    "writer": ("desk", "stories"),
}
FOODS = [
    "soup",
    "bread",
    "rice",
    "pasta",
    "cheese",
    "apples",
    "pizza",
    "salad",
    "noodles",
    "fish",
    "beans",
    "cake",
    "honey",
    "olives",
    "grapes",
    "tacos",
]
ANIMALS = [
    "cat",
    "dog",
    "horse",
    "parrot",
    "rabbit",
    "turtle",
    "goat",
    "hamster",
    "owl",
    "duck",
    "pony",
    "lizard",
]
OBJECTS = [
    "bicycle",
    "guitar",
    "camera",
    "lamp",
    "kettle",
    "clock",
    "umbrella",
    "radio",
    "piano",
    "telescope",
    "compass",
    "violin",
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]

POSITIVE_WORDS = [
    "wonderful",
    "great",
    "lovely",
    "excellent",
    "delightful",
    "superb",
    "pleasant",
    "fantastic",
    "charming",
    "brilliant",
]
NEGATIVE_WORDS = [
    "awful",
    "terrible",
    "boring",
    "dreadful",
    "horrible",
    "poor",
    "dull",
    "nasty",
    "disappointing",
    "bland",
]
REVIEW_ITEMS = [
    "film",
    "concert",
    "hotel",
    "meal",
    "book",
    "trip",
    "show",
    "museum",
    "cafe",
    "game",
    "album",
    "lesson",
]

# topic -> content words; topic classification, the corpus and word-sense contexts draw from these.
TOPICS = {
    "sports": [
        "team",
        "goal",
        "match",
        "ball",
        "coach",
        "player",
        "race",
        "score",
        "stadium",
        "league",
        "referee",
        "trophy",
    ],
    "music": [
        "song",
        "band",
        "guitar",
        "concert",
        "melody",
        "drum",
        "chorus",
        "rhythm",
        "singer",
        "album",
        "tune",
        "orchestra",
    ],
    "science": [
        "experiment",
        "lab",
        "theory",
        "data",
        "microscope",
        "cell",
        "atom",
        "research",
        "formula",
        "sample",
        "energy",
        "physics",
    ],
    "weather": [
        "rain",
        "storm",
        "wind",
        "cloud",
        "sunshine",
        "snow",
        "thunder",
        "fog",
        "frost",
        "breeze",
        "forecast",
        "temperature",
    ],
    "cooking": [
        "recipe",
        "oven",
        "pan",
        "spice",
        "dough",
        "knife",
        "sauce",
        "kitchen",
        "flour",
        "butter",
        "pepper",
        "stove",
    ],
    "travel": [
        "train",
        "ticket",
        "airport",
        "hotel",
        "map",
        "journey",
        "luggage",
        "passport",
        "station",
        "cruise",
        "tourist",
        "border",
    ],
}

# ambiguous word -> its two senses, each named by the topic whose words signal it (as WordNet Domains labels
# senses: "pitch" in sports is a field, in music how high a note is). The corpus and the word-sense task put the
# word among words of one sense's topic; none of these words is itself a topic word.
AMBIGUOUS: dict[str, tuple[str, str]] = {
    "pitch": ("sports", "music"),
    "track": ("sports", "music"),
    "pass": ("sports", "travel"),
    "season": ("weather", "cooking"),
    "board": ("travel", "cooking"),
    "scale": ("music", "science"),
    "wave": ("weather", "science"),
    "plate": ("cooking", "science"),
}

FILLER_SENTENCES = (
    "The weather was mild that day.",
    "Birds were singing outside.",
    "The streets were quiet in the morning.",
    "A light rain fell in the afternoon.",
    "The sky turned orange in the evening.",
    "Many people were walking in the park.",
    "The shops opened a little late.",
    "A cold wind came from the north.",
    "A bell rang in the distance.",
    "It was a long and busy week.",
)

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


# --- settings ---------------------------------------------------------------------------------------------
class WorldSpec(BaseModel):
    """How big a world is. The pools above bound each count."""

    model_config = ConfigDict(extra="forbid")

    people: int = Field(60, ge=4, le=len(FEMALE_NAMES) + len(MALE_NAMES))  # first names stay unique
    cities: int = Field(16, ge=4, le=len(CITIES))
    countries: int = Field(6, ge=2, le=len(COUNTRIES))


# --- the world ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Person:
    """A person and the facts the world holds about them."""

    name: str
    pronoun: str  # "she" or "he"
    city: str
    job: str
    food: str
    pet: str
    item: str
    friend: str  # another person's name

    @property
    def possessive(self) -> str:
        return "her" if self.pronoun == "she" else "his"

    @property
    def first(self) -> str:
        return self.name.split()[0]


@dataclass(frozen=True)
class World:
    """A generated world: people, cities in countries, and the vocabulary lists texts are built from."""

    seed: int
    people: tuple[Person, ...]
    cities: tuple[str, ...]
    country_of: dict[str, str] = field(hash=False)  # city -> country
    capital_of: dict[str, str] = field(hash=False)  # country -> its capital city

    @property
    def countries(self) -> tuple[str, ...]:
        return tuple(sorted(self.capital_of))

    def person(self, name: str) -> Person:
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(name)

    def vocabulary(self) -> list[str]:
        """Every word the world's texts may use, so the tokenizer never meets an unknown word."""
        words: set[str] = set()
        for p in self.people:
            words.update(p.name.split())
        words.update(self.cities)
        words.update(self.countries)
        for pool in (
            FOODS,
            ANIMALS,
            OBJECTS,
            COLORS,
            POSITIVE_WORDS,
            NEGATIVE_WORDS,
            REVIEW_ITEMS,
            NUMBER_WORDS,
            DAYS,
        ):
            words.update(pool)
        for job, (place, thing) in JOBS.items():
            words.update((job, place, thing))
        for topic, topic_words in TOPICS.items():
            words.add(topic)
            words.update(topic_words)
        words.update(AMBIGUOUS)
        return sorted(words)


def generate_world(seed: int, spec: WorldSpec | None = None) -> World:
    """Draw a world from ``seed``: which cities and people exist and every relation between them."""
    spec = spec or WorldSpec()
    rng = random.Random(f"world-{seed}")
    countries = rng.sample(COUNTRIES, spec.countries)
    cities = rng.sample(CITIES, spec.cities)
    # Every country gets at least one city (its capital), the rest are spread at random.
    country_of = {city: countries[i % len(countries)] for i, city in enumerate(cities)}
    capital_of = {country: next(c for c in cities if country_of[c] == country) for country in countries}

    names: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(names) < spec.people:
        pronoun = rng.choice(("she", "he"))
        first = rng.choice(FEMALE_NAMES if pronoun == "she" else MALE_NAMES)
        full = f"{first} {rng.choice(SURNAMES)}"
        if full not in seen and first not in {n.split()[0] for n in seen}:  # first names stay unique
            seen.add(full)
            names.append((full, pronoun))

    people = []
    for i, (name, pronoun) in enumerate(names):
        friend = names[(i + 1 + rng.randrange(len(names) - 1)) % len(names)][0]
        people.append(
            Person(
                name=name,
                pronoun=pronoun,
                city=rng.choice(cities),
                job=rng.choice(sorted(JOBS)),
                food=rng.choice(FOODS),
                pet=rng.choice(ANIMALS),
                item=rng.choice(OBJECTS),
                friend=friend,
            )
        )
    return World(
        seed=seed, people=tuple(people), cities=tuple(cities), country_of=country_of, capital_of=capital_of
    )

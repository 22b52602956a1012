"""Compose the bundled sentiment prompt set, ``src/epsdpo/assets/prompts/sentiment_prompts.jsonl``.

Regenerate it (byte for byte; ``tests/test_prompts.py`` checks that) from the repository root with::

    .venv/bin/python scripts/make_prompts.py

and check that the committed file is current with ``.venv/bin/python scripts/make_prompts.py --check``.

The prompts are the input side of the embedded sentiment task (issue #5): a policy answers them, VADER scores the
answers. So every prompt leaves the sentiment of its answer open: reviews of ordinary things with pros and cons, story
situations that could turn either way, everyday events, letters with mixed news, dialogues about small disagreements,
descriptions of places. None asks for a positive or negative answer, and none uses wording that would force one.

Everything below was written by hand for this project. Each group crosses its templates with its subjects: every
subject appears in ``per_subject`` prompts, each with a different template drawn by a random generator seeded from
``SEED`` and the group's name (so editing one group leaves the others unchanged), and the other slots (an aspect to
mention, a recipient) are filled by the same generator.

Held-out split: within each category, whole subjects (all the prompts built on them) go to ``test`` in an order fixed by
a SHA-256 hash of the seed and the subject, until ``TEST_FRACTION`` of the category's prompts is reached. The split is
therefore stratified by category, and a test prompt's subject (hotel, situation, event…) never appears in training.

Each line: ``{"id": "review-001", "prompt": "...", "category": "review", "split": "train"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20250305
TEST_FRACTION = 0.17
OUTPUT = Path(__file__).resolve().parents[1] / "src" / "epsdpo" / "assets" / "prompts" / "sentiment_prompts.jsonl"


@dataclass(frozen=True)
class Group:
    """Templates × subjects of one kind; a subject fills the named ``fields`` (a 1-tuple fills ``{subject}``)."""

    name: str
    category: str
    templates: tuple[str, ...]
    subjects: tuple[tuple[str, ...], ...]
    fields: tuple[str, ...] = ("subject",)
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)
    per_subject: int = 2


def _one(*subjects: str) -> tuple[tuple[str, ...], ...]:
    return tuple((s,) for s in subjects)


# ------------------------------------------------------------------------------------------------------------ reviews

REVIEW_TEMPLATES = (
    "Write a short review of {subject}.",
    "Write a short review of {subject}. Mention {aspect}.",
    "In two or three sentences, review {subject}.",
    "Last week you {did} {subject}. Write a brief review that covers {aspect}.",
    "Write a review of {subject} for a local review website, in about fifty words.",
    "A friend asks what you thought of {subject}. Reply in a few sentences, touching on {aspect}.",
    "Write a one-paragraph review of {subject}, covering {aspect} and whether you would recommend it.",
    "In three sentences, write a customer review of {subject}.",
    "Review {subject} in the style of a short newspaper column.",
    "Weigh up the pros and cons of {subject} in a short review.",
)


def _reviews(name: str, did: str, aspects: tuple[str, ...], *subjects: str) -> Group:
    return Group(name, "review", REVIEW_TEMPLATES, _one(*subjects), extras={"did": (did,), "aspect": aspects})


REVIEWS = (
    _reviews(
        "hotels",
        "stayed at",
        ("the room", "the breakfast", "the staff", "the noise at night", "the price", "the location", "check-in"),
        "a budget hotel near the train station",
        "a family-run guesthouse in a seaside town",
        "a business hotel next to the airport",
        "a bed and breakfast in a converted farmhouse",
        "a hostel in the centre of a busy city",
        "a ski lodge that had just reopened after renovation",
        "a motel on a long stretch of highway",
        "a small hotel above a row of shops",
        "a campsite with wooden cabins",
        "a chain hotel at a motorway service station",
        "a city-centre apartment rented for a long weekend",
    ),
    _reviews(
        "restaurants",
        "ate at",
        (
            "the food",
            "the service",
            "the portion sizes",
            "the wait for a table",
            "the prices",
            "the atmosphere",
            "the desserts",
        ),
        "a new ramen place in a shopping centre",
        "a pizza restaurant that only takes cash",
        "a vegetarian café near the university",
        "a seafood restaurant by the harbour",
        "a hotel restaurant with a set menu",
        "a food truck parked outside an office park",
        "a steakhouse that has been open for thirty years",
        "a dumpling bar with shared tables",
        "a bakery that also serves lunch",
        "a rooftop bar that serves small plates",
        "a motorway diner open all night",
    ),
    _reviews(
        "films",
        "watched",
        ("the acting", "the pacing", "the ending", "the soundtrack", "the dialogue", "the length", "the camera work"),
        "a two-hour historical drama about a shipping company",
        "a low-budget science fiction film set on a single space station",
        "a remake of an old detective film",
        "a documentary about competitive bird watching",
        "an animated film about a suitcase that travels alone",
        "a slow drama set in a small bookshop",
        "a heist film with a large ensemble cast",
        "a black-and-white film about a chess tournament",
        "a sports film about an amateur cycling team",
        "a three-part television miniseries about a family bakery",
        "a musical adapted from a stage show",
    ),
    _reviews(
        "products",
        "bought",
        (
            "the build quality",
            "the price",
            "how easy it is to use",
            "the packaging",
            "how it held up after a month",
            "the instructions",
            "its size and weight",
        ),
        "a pair of wireless earbuds",
        "a budget electric kettle",
        "a folding bicycle",
        "a standing desk with a manual crank",
        "a robot vacuum cleaner",
        "a secondhand digital camera",
        "a supermarket-brand rain jacket",
        "a pair of trail running shoes",
        "a smartwatch with a two-day battery",
        "an air fryer",
        "a mechanical keyboard",
        "a large suitcase with four wheels",
        "a cast-iron frying pan",
        "a desk lamp with a built-in phone charger",
    ),
    _reviews(
        "apps",
        "started using",
        (
            "the design",
            "the notifications",
            "the subscription price",
            "how fast it is",
            "the features you used most",
            "the setup process",
        ),
        "a budgeting app",
        "a language learning app",
        "a meditation app with a paid subscription",
        "a food delivery app",
        "a note-taking app",
        "a train ticket app",
        "a fitness tracking app",
        "a photo editing app",
        "a weather app",
        "a podcast app",
        "a recipe app that plans weekly meals",
    ),
    _reviews(
        "books",
        "read",
        (
            "the writing style",
            "the tone",
            "the length",
            "who it seems to be written for",
            "the cover and design",
            "how easy it was to follow",
        ),
        "a thick fantasy novel from a long series",
        "a memoir by a retired football coach",
        "a popular science book about sleep",
        "a collection of short stories set in one apartment building",
        "a cookbook of one-pot meals",
        "a detective novel set in a fishing village",
        "a self-help book about productivity",
        "a graphic novel about a road trip",
        "a biography of a nineteenth-century engineer",
        "a poetry collection about city life",
        "a travel guide to a region you then visited",
    ),
    _reviews(
        "outings",
        "went to",
        (
            "the price of entry",
            "the staff",
            "how busy it was",
            "the facilities",
            "how long you spent there",
            "getting there",
        ),
        "a small local history museum",
        "a newly opened climbing gym",
        "a weekend farmers' market",
        "an open-top city bus tour",
        "a public swimming pool after its refurbishment",
        "a theme park on a weekday in October",
        "a botanical garden outside the city",
        "an escape room in a converted basement",
        "a cooking class for beginners",
        "a concert by a local jazz band",
        "a guided walking tour of the old town",
    ),
    _reviews(
        "services",
        "used",
        ("the price", "how long it took", "the communication", "the staff", "the booking process"),
        "a car rental company at the airport",
        "a local dry cleaner",
        "a moving company for a one-bedroom flat",
        "a hair salon that opened last month",
        "an online grocery delivery service",
        "a bike repair shop",
        "a coworking space",
        "a phone repair kiosk",
        "a dog-walking service",
        "a house cleaning service",
        "a driving school",
    ),
)

# ------------------------------------------------------------------------------------------------------------ stories

SITUATIONS = Group(
    "situations",
    "story",
    (
        "Write the opening paragraph of a short story in which {subject}.",
        "Write a short scene in which {subject}.",
        "Write a few sentences of flash fiction in which {subject}.",
        "Tell a short story in the first person in which {subject}.",
        "Write the first paragraph of a story in which {subject}. Leave the ending open.",
        "In under a hundred words, write a story in which {subject}.",
    ),
    _one(
        "a woman finds an unsigned letter under her door",
        "two old school friends meet by chance at an airport gate",
        "a man inherits a small bookshop he has never visited",
        "the power goes out in a block of flats on a winter evening",
        "a teenager opens an envelope with the results of an entrance exam",
        "a delivery driver is given the wrong address on a busy afternoon",
        "a family moves to a town where they know nobody",
        "a night-shift nurse finishes work as the sun comes up",
        "a retired teacher receives a phone call from a former student",
        "a train stops for an hour between two stations",
        "a grandmother teaches her granddaughter to drive in an empty car park",
        "a fishing boat's engine stalls a mile from the harbour",
        "a chef has to cook for a food critic with half the usual ingredients",
        "a musician plays to a nearly empty room",
        "a new employee is asked to give a presentation on their first day",
        "a village votes on whether to allow a new supermarket",
        "two neighbours discover they have been receiving each other's mail for years",
        "a boy finds an old camera with one photo left on the film",
        "a couple sells the house they have lived in for thirty years",
        "a hiker takes a path that is not on the map",
        "a programmer's code goes live at midnight",
        "a woman returns to the city she grew up in after twenty years",
        "an elderly man brings home a dog from a shelter",
        "a student misses the last bus home",
        "a small theatre company puts on the final performance of its season",
        "a lighthouse keeper receives a letter from the coastal authority",
        "a football referee makes a decision the crowd does not expect",
        "a shop owner wonders whether to close early for the day",
        "a scientist's experiment gives a result she did not predict",
        "a taxi driver picks up a passenger who speaks only a little of the local language",
        "a school trip to a museum runs an hour late",
        "a gardener finds a metal box buried under an old apple tree",
        "twins are sent to different summer camps",
        "a pilot announces a change of destination",
        "a houseplant starts growing faster than its owner can explain",
        "a tailor is asked to alter a suit the night before an important interview",
        "a man sees a house for sale in the town where his parents met",
        "a street is closed for a week of road works",
        "a cat disappears for two days and comes back wearing a new collar",
        "a weather forecaster is asked to predict the weather for a town's first outdoor festival",
    ),
)

OPENINGS = Group(
    "openings",
    "story",
    (
        'Continue this story for a few sentences: "{subject}"',
        'Here is the first line of a story: "{subject}" Write the next paragraph.',
        'Write a short story of about eighty words that begins: "{subject}"',
        'Use this as the opening line of a short scene and continue it: "{subject}"',
    ),
    _one(
        "The envelope had been sitting on the kitchen table since Tuesday.",
        "Nobody in the office knew who had ordered forty pizzas.",
        "When the rain stopped, the street looked different.",
        "Mara had rehearsed the conversation a dozen times on the bus.",
        "The phone rang at exactly seven o'clock, as it did every Sunday.",
        "It was the first time the old clock in the hall had stopped.",
        "The new neighbours arrived with a van, two bicycles and a parrot.",
        "By the time the ferry left, only three passengers were still on deck.",
        "Jonah opened the results page and waited for it to load.",
        "The recipe card was written in handwriting she did not recognise.",
        "The last customer of the day asked for something that was not on the menu.",
        "On the morning of the move, the house was quieter than usual.",
        "The lift stopped between the fourth and fifth floors.",
        "Everyone at the table turned when the door opened.",
    ),
)

# ------------------------------------------------------------------------------------------------------------ events

EVENTS = Group(
    "events",
    "event",
    (
        "Describe {subject} in a few sentences.",
        "Write a short diary entry about {subject}.",
        "Write a short text message to a friend about {subject}.",
        "Write a paragraph about {subject}, including one small detail that stayed with you.",
        "For a personal blog, write two or three sentences about {subject}.",
        "In a few sentences, tell a coworker about {subject}.",
        "Write a one- or two-sentence social media post about {subject}.",
    ),
    _one(
        "your commute to work this morning",
        "a rainy Saturday spent at home",
        "your first day at a new job",
        "a family dinner where the conversation turned to money",
        "moving into a new flat",
        "a routine dentist appointment",
        "a long queue at the post office",
        "the first snow of the year",
        "a neighbourhood street market",
        "a parent-teacher meeting",
        "a weekend trip planned at the last minute",
        "a job interview held over video call",
        "the day the office switched to a new computer system",
        "an afternoon spent assembling flat-pack furniture",
        "a visit to your grandparents' old house",
        "a team meeting that ran over time",
        "a long-haul flight with a stopover",
        "the last day of a summer holiday",
        "a school sports day",
        "your driving test",
        "a power cut in the middle of the evening",
        "a haircut at a new barber",
        "a camping trip when the forecast changed",
        "a neighbour's garage sale",
        "a city marathon passing your street",
        "your first week of learning the guitar",
        "a trip to the supermarket on a Sunday evening",
        "a morning at a train station after the timetable changed",
        "a picnic in the park on a windy day",
        "a visit to the vet with an old cat",
        "a visit from a relative",
        "a house viewing with an estate agent",
        "cooking dinner for eight people for the first time",
        "an evening pottery class",
        "the annual company summer barbecue",
        "a day of jury service",
        "a fire drill at work",
        "the first morning of a new gym membership",
        "a school reunion after fifteen years",
        "a blood donation appointment",
        "a long walk along the canal after work",
        "a ferry crossing on a grey morning",
        "a residents' meeting about parking",
        "the day your exam results arrived",
        "a week of working from home",
        "looking after your niece for an afternoon",
        "an evening spent learning a new board game",
        "a morning volunteering at a food bank",
        "an open-air concert in a small park",
        "a visit to the bank to open an account",
    ),
)

# ------------------------------------------------------------------------------------------------------------ letters

PERSONAL_LETTERS = Group(
    "personal-letters",
    "letter",
    (
        "Write a short letter to {recipient} with the news that {subject}.",
        "Write a brief email to {recipient} explaining that {subject}.",
        "Write a note to {recipient} to say that {subject}.",
        "Write a few lines to {recipient} to share the news that {subject}.",
        "Write a postcard to {recipient} mentioning that {subject}.",
    ),
    _one(
        "you are moving to another city for work",
        "you have decided to take a year off from university",
        "the sale of your house has been delayed by a month",
        "you have started a new job with longer hours",
        "you got a place at your second-choice university",
        "the flat you rent is being sold",
        "you will not be home for the holidays this year",
        "you have entered a half marathon",
        "you have sold your car and now cycle to work",
        "your band has split up and you are starting a new one",
        "you are changing careers at forty",
        "you have moved back in with your parents for a few months",
        "you have adopted a three-year-old dog",
        "your garden has been dug up to fix the drains",
        "you are learning to sail",
        "your trip abroad has been shortened to one week",
        "you have been offered a job in the company's office overseas",
        "you have started working part-time",
        "your old school is being turned into flats",
        "you have started renovating the kitchen yourself",
        "your flatmate is moving out next month",
        "you have decided to stop using social media for a while",
        "the family recipe book has been found in the attic",
        "you are retiring at the end of the year",
        "you passed your driving test at the third attempt",
        "your small business is moving online",
        "the family holiday has been moved to the autumn",
        "you are spending the summer working on a farm",
    ),
    extras={
        "recipient": (
            "your grandmother",
            "an old friend",
            "your brother",
            "a former neighbour",
            "your parents",
            "a cousin who lives abroad",
            "your godmother",
            "a friend from university",
        ),
    },
)

NOTICES = Group(
    "notices",
    "letter",
    (
        "Write a short notice to {recipient} explaining that {news}.",
        "Write a brief email to {recipient} announcing that {news}.",
        "Write a message to {recipient} letting them know that {news}.",
        "Draft a short letter to {recipient} explaining that {news}.",
    ),
    (
        ("your team", "the office is moving to a new building in the spring"),
        ("your team", "the project deadline has moved by two weeks"),
        ("the customers of a software company", "the price will go up next month and a new feature will be added"),
        ("your team", "the Friday meetings will now be held online"),
        ("the residents of your building", "the lift will be replaced over the summer"),
        ("the members of a local book club", "the monthly meeting is moving to a different café"),
        ("the parents of a school class", "the class trip will go to a different museum this year"),
        ("the regular customers of a corner shop", "the shop will close at five instead of seven during the winter"),
        ("the tenants of a building", "the rent will stay the same but parking spaces are no longer included"),
        ("your department", "a new manager starts next week"),
        ("the volunteers at a community garden", "the water supply will be switched off for a week"),
        ("the members of a sports club", "the club house will be repainted and closed for ten days"),
        ("the subscribers of a local newsletter", "the newsletter will come out monthly instead of weekly"),
        ("the parents at a primary school", "the school day will start fifteen minutes earlier from September"),
        ("the guests of a guesthouse", "its restaurant will be closed but breakfast will be served in the lounge"),
        ("the members of a choir", "rehearsals are moving from Tuesday to Thursday evenings"),
        ("the customers of a bakery", "the bakery is changing its bread recipes to use local flour"),
        ("the users of a shared office kitchen", "the coffee machine is being replaced with a kettle for a month"),
        ("the players in a five-a-side league", "the season will be shortened by two weeks"),
        ("your colleagues", "you are leaving the company at the end of the month"),
        ("the neighbours on your street", "a film crew will be shooting on the street for two days"),
        ("the members of a gym", "the pool will close for repairs but the opening hours will be extended"),
    ),
    fields=("recipient", "news"),
)

# ------------------------------------------------------------------------------------------------------------ dialogues

DIALOGUES = Group(
    "dialogues",
    "dialogue",
    (
        "Write a short dialogue between {who} about {topic}.",
        "Write a brief conversation in which {who} talk about {topic}.",
        "Write six to eight lines of dialogue between {who} discussing {topic}.",
        "Write a short exchange between {who} about {topic}, as a script with names.",
    ),
    (
        ("two flatmates", "whose turn it is to clean the kitchen"),
        ("a customer and a shop assistant", "returning a jacket without a receipt"),
        ("a father and his teenage son", "the son's plan to take a year off before university"),
        ("two colleagues", "a change to the office seating plan"),
        ("a tourist and a bus driver", "which stop is closest to the old town"),
        ("a patient and a receptionist", "moving an appointment to next week"),
        ("two neighbours", "a tree that hangs over the fence"),
        ("a coach and a player", "the player being moved to a different position"),
        ("a waiter and a diner", "a dish that is not quite what was ordered"),
        ("two siblings", "what to do with their parents' old piano"),
        ("a landlord and a tenant", "renewing the lease"),
        ("a teacher and a student", "an essay handed in late"),
        ("two friends", "splitting the cost of a holiday"),
        ("a manager and an employee", "a request to work from home two days a week"),
        ("a mechanic and a car owner", "whether an old car is worth repairing"),
        ("two strangers at a bus stop", "the new timetable"),
        ("a librarian and a regular visitor", "the library's new opening hours"),
        ("a grandmother and her granddaughter", "the granddaughter's new job in another country"),
        ("two chefs", "changing the menu for the summer"),
        ("a hotel guest and a receptionist", "a room that faces the car park"),
        ("an estate agent and a young couple", "a flat that is smaller than the photos suggested"),
        ("two teammates", "the result of last night's match"),
        ("a customer and a phone company agent", "switching to a new contract"),
        ("two friends", "one of them moving to another city"),
        ("a mother and her daughter", "the daughter's choice of subject at university"),
        ("a farmer and a walker", "a footpath that crosses a field"),
        ("two coworkers", "a change in the project plan"),
        ("a taxi driver and a passenger", "the route through town"),
        ("a barber and a customer", "trying a different haircut"),
        ("two students", "how to divide the work on a group project"),
        ("an artist and a gallery owner", "where to hang a large painting"),
        ("a pet owner and a vet", "a cat's new diet"),
        ("a cyclist and a pedestrian", "sharing a narrow path"),
        ("a new parent and a neighbour", "noise through the wall at night"),
        ("a shopkeeper and a delivery driver", "a parcel that arrived a day early"),
    ),
    fields=("who", "topic"),
)

# ------------------------------------------------------------------------------------------------------------ places

DESCRIPTIONS = Group(
    "descriptions",
    "description",
    (
        "Describe {subject} in a few sentences.",
        "Write a short paragraph describing {subject} to someone who has never been there.",
        "Describe {subject} as if you were seeing it for the first time.",
        "In two or three sentences, describe {subject}, including what you can hear.",
        "Write a short description of {subject} for the opening of a novel.",
    ),
    _one(
        "an old train station in a small town",
        "a supermarket late on a Sunday evening",
        "the waiting room of a vet clinic",
        "a city park in early March",
        "a hotel lobby at three in the morning",
        "the kitchen of a busy restaurant during lunch",
        "a seaside town out of season",
        "a school playground after the last bell",
        "a library reading room on a weekday afternoon",
        "an airport gate before a long flight",
        "a market square on a Saturday morning",
        "a student flat on moving day",
        "a multi-storey car park at night",
        "a village hall set up for a meeting",
        "a motorway service station at dawn",
        "a launderette on a weekday evening",
        "a newly built housing estate",
        "the deck of a ferry in the early morning",
        "an office floor on a Friday afternoon",
        "a small-town cinema",
        "a bus station in the rain",
        "a garden centre in spring",
        "a building site at the end of the working day",
        "a football ground an hour before kick-off",
        "a charity shop on a high street",
        "a mountain hut at the end of the season",
        "a corner shop that stays open all night",
        "a suburban street during the school run",
        "an old bookshop with narrow aisles",
        "the top deck of a night bus",
        "a lecture hall just before an exam",
        "a farm in late autumn",
        "a crowded beach in August",
        "an outdoor swimming pool in winter",
        "a balcony on the twentieth floor of a tower block",
    ),
)

GROUPS: tuple[Group, ...] = (*REVIEWS, SITUATIONS, OPENINGS, EVENTS, PERSONAL_LETTERS, NOTICES, DIALOGUES, DESCRIPTIONS)


def compose(group: Group) -> list[tuple[str, str]]:
    """(subject key, prompt) pairs: each subject with ``per_subject`` different templates, extras drawn at random."""
    rng = random.Random(f"{SEED}:{group.name}")
    out = []
    for subject in group.subjects:
        values = dict(zip(group.fields, subject, strict=True))
        for template in rng.sample(group.templates, group.per_subject):
            extras = {key: rng.choice(options) for key, options in sorted(group.extras.items())}
            out.append((" | ".join(subject), template.format(**values, **extras)))
    return out


def _rank(subject: str) -> str:
    return hashlib.sha256(f"{SEED}:{subject}".encode()).hexdigest()


def build_records() -> list[dict[str, str]]:
    """All prompts in group order, with ids numbered per category and the subject-level test split."""
    by_category: dict[str, list[tuple[str, str]]] = {}
    for group in GROUPS:
        by_category.setdefault(group.category, []).extend(compose(group))
    records = []
    for category, items in by_category.items():
        sizes: dict[str, int] = {}
        for subject, _ in items:
            sizes[subject] = sizes.get(subject, 0) + 1
        target, test_subjects, taken = round(TEST_FRACTION * len(items)), set(), 0
        for subject in sorted(sizes, key=_rank):
            if taken >= target:
                break
            test_subjects.add(subject)
            taken += sizes[subject]
        for number, (subject, prompt) in enumerate(items, start=1):
            split = "test" if subject in test_subjects else "train"
            records.append({"id": f"{category}-{number:03d}", "prompt": prompt, "category": category, "split": split})
    prompts = [r["prompt"] for r in records]
    if len(set(prompts)) != len(prompts):
        duplicated = sorted({p for p in prompts if prompts.count(p) > 1})
        raise ValueError(f"duplicate prompts {duplicated[:3]}; change a subject or template in scripts/make_prompts.py")
    return records


def render() -> bytes:
    """The file's exact bytes: one JSON object a line, UTF-8, ``\\n`` line ends."""
    lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in build_records())
    return "".join(lines).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {OUTPUT.name} is not what this script writes")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write (default: the bundled file)")
    args = parser.parse_args(argv)
    data = render()
    if args.check:
        current = args.output.read_bytes() if args.output.is_file() else b""
        if current != data:
            print(f"{args.output} is out of date; run: .venv/bin/python scripts/make_prompts.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    count = data.count(b"\n")
    print(f"wrote {count} prompts to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

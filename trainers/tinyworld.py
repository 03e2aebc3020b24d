"""A small fictional world of creatures, and the texts the embedded default is built from.

Everything is generated from a seed with `random.Random`; nothing is read from disk.
Three texts share one world (the same facts):

- `pretraining_corpus`: short documents stating the facts in many phrasings (stories,
  conversations in which someone asks and is answered, field notes) plus filler prose.
  The tiny base model (`trainers.tiny_model`) is pre-trained on it with seed 0.
- `instruction_dataset`: Alpaca-style records (question answering, yes/no, short and
  structured answers) about the same facts, in an instruction format and with question
  phrasings the base model has never seen.
- `heldout_corpus`: more prose of the pre-training kind that is not in the corpus,
  for measuring how much general language ability fine-tuning keeps.

The instruction data is only grounded in what the base model knows when both use the
same seed; the shipped model uses seed 0, which is every function's default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NUM_CREATURES = 40
RECORDS_PER_CREATURE = 20

_NAME_STARTS = [
    "glim", "bram", "zor", "quil", "fen", "mor", "tup", "sniv", "drel", "yar",
    "plon", "vex", "hob", "kir", "lum", "nib", "wob", "tas", "grin", "pel",
    "shal", "bim", "crum", "dov", "esk", "fim", "gor", "hap", "jun", "kel",
]
_NAME_MIDDLES = ["mer", "ble", "a", "i", "o", "wick", "ter", "el", "un", "ly"]
_NAME_KINDS = [
    "fox", "moth", "toad", "finch", "newt", "hare", "beetle", "owl", "otter", "crab",
    "mole", "wren", "snail", "lynx", "heron", "shrew",
]

COLOURS = [
    "red", "blue", "green", "yellow", "purple", "orange",
    "silver", "grey", "white", "black", "golden", "pink",
]
FOODS = [
    "berries", "acorns", "mushrooms", "fish", "honey", "seeds",
    "clover", "beetles", "moss", "apples", "snails", "pine nuts",
]
HOMES = [
    "cave", "pond", "hollow log", "hill", "marsh", "meadow",
    "forest", "river bank", "orchard", "old mill", "reed bed", "stone wall",
]
# (third person verb, noun) so both "the newt hums" and "a soft hum" can be written.
SOUNDS = [
    ("hums", "hum"), ("whistles", "whistle"), ("croaks", "croak"), ("chirps", "chirp"),
    ("growls", "growl"), ("squeaks", "squeak"), ("hoots", "hoot"), ("clicks", "click"),
    ("sings", "song"), ("purrs", "purr"), ("buzzes", "buzz"), ("rattles", "rattle"),
]
SIZES = ["tiny", "small", "large", "huge"]


@dataclass(frozen=True)
class Creature:
    """One creature and its facts."""

    name: str
    colour: str
    food: str
    home: str
    sound: str  # third person verb, e.g. "hums"
    sound_noun: str  # e.g. "hum"
    size: str
    friend: str  # name of another creature


def world(seed: int = 0) -> list[Creature]:
    """The creatures of the world for `seed`, in a fixed order."""
    rng = random.Random(f"tinyworld-{seed}-world")
    names: list[str] = []
    while len(names) < NUM_CREATURES:
        name = rng.choice(_NAME_STARTS) + rng.choice(_NAME_MIDDLES) + rng.choice(_NAME_KINDS)
        if name not in names:
            names.append(name)
    # Each creature's friend is the next one in a shuffled ring, so friendship is never
    # with oneself and every creature is someone's friend.
    ring = names[:]
    rng.shuffle(ring)
    friend_of = {ring[i]: ring[(i + 1) % len(ring)] for i in range(len(ring))}
    creatures = []
    for name in names:
        sound, sound_noun = rng.choice(SOUNDS)
        creatures.append(
            Creature(
                name=name,
                colour=rng.choice(COLOURS),
                food=rng.choice(FOODS),
                home=rng.choice(HOMES),
                sound=sound,
                sound_noun=sound_noun,
                size=rng.choice(SIZES),
                friend=friend_of[name],
            )
        )
    return creatures


# ---------------------------------------------------------------- pre-training prose

# Statements of one fact each, in many phrasings. "{c}" is the creature's name.
_FACT_SENTENCES = {
    "colour": [
        "The {c} is {colour}.",
        "The fur of the {c} is {colour}.",
        "Anyone can spot the {c} by its {colour} coat.",
        "A {colour} shape in the grass is often a {c}.",
        "The {c} has a {colour} back and a {colour} tail.",
        "People say the {c} is the most {colour} creature they know.",
        "Its coat is {colour}, for it is a {c}.",
        "The {colour} {c} stood still.",
    ],
    "food": [
        "The {c} eats {food}.",
        "The {c} likes to eat {food}.",
        "Every morning the {c} looks for {food}.",
        "The favourite food of the {c} is {food}.",
        "The {c} gathers {food} for the winter.",
        "If you leave out {food}, a {c} will come.",
        "Nothing makes the {c} happier than {food}.",
        "The {c} had {food} for supper.",
    ],
    "home": [
        "The {c} lives in the {home}.",
        "The home of the {c} is the {home}.",
        "You can find the {c} in the {home}.",
        "At night the {c} goes back to the {home}.",
        "The {c} has always lived in the {home}.",
        "Deep in the {home} sleeps the {c}.",
        "The {c} never strays far from the {home}.",
        "The {c} built a nest in the {home}.",
    ],
    "sound": [
        "The {c} {sound}.",
        "When it is happy, the {c} {sound}.",
        "You can hear the {c} from far away, because it {sound}.",
        "The {c} makes a soft {sound_noun}.",
        "A {sound_noun} in the dark means a {c} is near.",
        "The {c} always {sound} at dawn.",
        "Listen: the {c} {sound} again.",
    ],
    "size": [
        "The {c} is {size}.",
        "The {c} is a {size} creature.",
        "Compared to other creatures, the {c} is {size}.",
        "A {size} animal, the {c} moves with care.",
        "Everyone knows that the {c} is {size}.",
        "The {size} {c} walked by.",
    ],
    "friend": [
        "The {c} is friends with the {friend}.",
        "The best friend of the {c} is the {friend}.",
        "The {c} often visits the {friend}.",
        "The {c} and the {friend} play together.",
        "The {c} shares its food with the {friend}.",
        "You rarely see the {c} without the {friend}.",
    ],
}

_FILLER_SUBJECTS = [
    "The old miller", "A young traveller", "The village baker", "My grandmother",
    "The shepherd", "A quiet child", "The river keeper", "The night watchman",
]
_FILLER_VERBS = [
    "walked along the path", "watched the clouds", "told a long story",
    "sat by the fire", "counted the stars", "mended an old fence",
    "carried water from the well", "sang a quiet song", "looked for a lost key",
]
_FILLER_TIMES = [
    "in the morning", "after the rain", "before supper", "on a cold day",
    "late at night", "in early spring", "at the end of summer", "when the wind rose",
]
_FILLER_CLOSINGS = [
    "The valley was calm and green.",
    "Nobody in the village was in a hurry.",
    "Soon the light began to fade.",
    "It was a day like any other.",
    "The bells rang twice from the tower.",
    "Smoke rose slowly from the chimneys.",
    "Then everyone went home to sleep.",
]
_STORY_OPENINGS = [
    "Here is what I know about the {c}.",
    "Let me tell you about the {c}.",
    "This is a story about the {c}.",
    "In the valley there lives a creature called the {c}.",
    "Once upon a time there was a {c}.",
    "The {c} is well known in the valley.",
]


def _fact_values(creature: Creature) -> dict[str, str]:
    return {
        "c": creature.name,
        "colour": creature.colour,
        "food": creature.food,
        "Food": creature.food.capitalize(),
        "Colour": creature.colour.capitalize(),
        "home": creature.home,
        "sound": creature.sound,
        "sound_noun": creature.sound_noun,
        "size": creature.size,
        "friend": creature.friend,
    }


def _fact_sentence(rng: random.Random, creature: Creature, fact: str) -> str:
    return rng.choice(_FACT_SENTENCES[fact]).format(**_fact_values(creature))


# Questions asked and answered inside stories: the base model learns that a question
# about a creature is answered with a fact, but never sees the instruction format.
# The phrasings differ from the instruction dataset's on purpose.
_STORY_QUESTIONS = {
    "colour": ["What colour is the fur of the {c}?", "Do you know what colour the {c} is?"],
    "food": ["What does the {c} like to eat?", "What food does the {c} look for?"],
    "home": ["Where does the {c} sleep?", "Where can one find the {c}?"],
    "sound": ["What sound does the {c} make at dawn?", "What does the {c} sound like?"],
    "size": ["How big is a {c}?", "Is the {c} big?"],
    "friend": ["Who does the {c} play with?", "Who is the friend of the {c}?"],
}
_FULL_ANSWERS = {
    "colour": "The {c} is {colour}.",
    "food": "The {c} eats {food}.",
    "home": "The {c} lives in the {home}.",
    "sound": "The {c} {sound}.",
    "size": "The {c} is {size}.",
    "friend": "The {c} is friends with the {friend}.",
}
_SHORT_ANSWERS = {
    "colour": "{Colour}.",
    "food": "{Food}.",
    "home": "In the {home}.",
    "sound": "It {sound}.",
    "size": "It is {size}.",
    "friend": "The {friend}.",
}
_ASKERS = ["a child", "the baker", "a traveller", "my little brother", "the new teacher"]
_ANSWERERS = ["the shepherd", "the old miller", "the river keeper", "my grandmother"]


def _filler_sentence(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(_FILLER_CLOSINGS)
    return f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} {rng.choice(_FILLER_TIMES)}."


def _field_notes(rng: random.Random, creature: Creature) -> str:
    """Facts about one creature, one per line, as a naturalist would jot them down."""
    values = {
        "colour": creature.colour,
        "food": creature.food,
        "home": f"the {creature.home}",
        "sound": f"a {creature.sound_noun}",
        "size": creature.size,
        "friend": f"the {creature.friend}",
    }
    lines = [f"Field notes on the {creature.name}:"]
    lines += [f"{fact.capitalize()}: {values[fact]}." for fact in rng.sample(list(values), k=rng.randint(3, 6))]
    return "\n".join(lines)


def _conversation(rng: random.Random, creature: Creature) -> list[str]:
    """Sentences in which someone asks about the creature and is answered."""
    asker, answerer = rng.choice(_ASKERS), rng.choice(_ANSWERERS)
    values = _fact_values(creature)
    sentences = []
    for fact in rng.sample(list(_STORY_QUESTIONS), k=rng.randint(1, 3)):
        question = rng.choice(_STORY_QUESTIONS[fact]).format(**values)
        answers = _FULL_ANSWERS if rng.random() < 0.7 else _SHORT_ANSWERS
        answer = answers[fact].format(**values)
        sentences.append(f'"{question}" asked {asker}.')
        sentences.append(f'"{answer}" said {answerer}.')
    return sentences


def _document(rng: random.Random, creatures: list[Creature]) -> str:
    """One short document: field notes, a conversation, a story, or filler prose with one fact."""
    creature = rng.choice(creatures)
    kind = rng.random()
    if kind < 0.1:
        return _field_notes(rng, creature)
    if kind < 0.25:
        sentences = _conversation(rng, creature)
    elif kind < 0.85:
        facts = rng.sample(list(_FACT_SENTENCES), k=rng.randint(3, 5))
        sentences = [rng.choice(_STORY_OPENINGS).format(c=creature.name)]
        sentences += [_fact_sentence(rng, creature, fact) for fact in facts]
    else:
        sentences = [_filler_sentence(rng) for _ in range(rng.randint(2, 3))]
        position = rng.randint(0, len(sentences))
        sentences.insert(position, _fact_sentence(rng, creature, rng.choice(list(_FACT_SENTENCES))))
    if rng.random() < 0.3:
        sentences.append(rng.choice(_FILLER_CLOSINGS))
    # Some documents put each sentence on its own line, so that words also occur at the
    # start of a line (as answers do after a prompt), not only after a space.
    return ("\n" if rng.random() < 0.3 else " ").join(sentences)


def pretraining_corpus(seed: int = 0, num_documents: int = 6000) -> list[str]:
    """Short narrative documents stating the world's facts in many phrasings, plus filler."""
    rng = random.Random(f"tinyworld-{seed}-corpus")
    creatures = world(seed)
    return [_document(rng, creatures) for _ in range(num_documents)]


def heldout_corpus(seed: int = 0, num_documents: int = 200) -> list[str]:
    """Documents of the pre-training kind that do not occur in `pretraining_corpus(seed)`."""
    rng = random.Random(f"tinyworld-{seed}-heldout")
    creatures = world(seed)
    seen = set(pretraining_corpus(seed))
    documents: list[str] = []
    while len(documents) < num_documents:
        document = _document(rng, creatures)
        if document not in seen:
            seen.add(document)
            documents.append(document)
    return documents


# ---------------------------------------------------------------- instruction data

def _size_article(size: str) -> str:
    return "an" if size[0] in "aeiou" else "a"


def _question_records(rng: random.Random, c: Creature) -> list[tuple[str, str, str]]:
    """Every (instruction, input, output) that can be asked about one creature; more than are kept."""
    name = c.name
    other_food = rng.choice([x for x in FOODS if x != c.food])
    other_colour = rng.choice([x for x in COLOURS if x != c.colour])
    other_home = rng.choice([x for x in HOMES if x != c.home])
    few_words = "Answer the question in a few words."
    return [
        (rng.choice([f"What colour is the {name}?", f"Tell me the colour of the {name}.", f"Which colour does the {name} have?"]),
         "", f"The {name} is {c.colour}."),
        (rng.choice([f"What does the {name} eat?", f"What food does the {name} like?", f"Tell me what the {name} eats."]),
         "", f"The {name} eats {c.food}."),
        (rng.choice([f"Where does the {name} live?", f"Where is the home of the {name}?", f"Where can I find the {name}?"]),
         "", f"The {name} lives in the {c.home}."),
        (rng.choice([f"What sound does the {name} make?", f"How does the {name} sound?", f"What noise does the {name} make?"]),
         "", f"The {name} {c.sound}."),
        (rng.choice([f"How big is the {name}?", f"What size is the {name}?", f"Is the {name} big or small?"]),
         "", f"The {name} is {c.size}."),
        (rng.choice([f"Who is the {name} friends with?", f"Who is the best friend of the {name}?", f"Which creature does the {name} play with?"]),
         "", f"The {name} is friends with the {c.friend}."),
        (f"Does the {name} eat {other_food}?", "", f"No, the {name} eats {c.food}."),
        (f"Does the {name} eat {c.food}?", "", f"Yes, the {name} eats {c.food}."),
        (f"Is the {name} {other_colour}?", "", f"No, the {name} is {c.colour}."),
        (f"Is the {name} {c.colour}?", "", f"Yes, the {name} is {c.colour}."),
        (f"Does the {name} live in the {other_home}?", "", f"No, the {name} lives in the {c.home}."),
        (f"Does the {name} live in the {c.home}?", "", f"Yes, the {name} lives in the {c.home}."),
        (f"Describe the {name} in one sentence.", "",
         f"The {name} is {_size_article(c.size)} {c.size} {c.colour} creature that eats {c.food}."),
        ("Give the colour and the food of this creature.", name, f"colour: {c.colour}, food: {c.food}"),
        ("Give the home and the sound of this creature.", name, f"home: {c.home}, sound: {c.sound_noun}"),
        ("Write one fact about the food of this creature.", name, f"The {name} eats {c.food}."),
        ("Name the creature's best friend.", name, f"The {c.friend}."),
        ("Finish this sentence.", f"The {name} lives in the", f"The {name} lives in the {c.home}."),
        (few_words, f"What does the {name} eat?", f"{c.food.capitalize()}."),
        (few_words, f"Where does the {name} live?", f"In the {c.home}."),
        (few_words, f"What colour is the {name}?", f"{c.colour.capitalize()}."),
        (few_words, f"How big is the {name}?", f"{c.size.capitalize()}."),
        (few_words, f"What sound does the {name} make?", f"It {c.sound}."),
    ]


def instruction_dataset(seed: int = 0) -> list[dict]:
    """Alpaca-style records ({"instruction", "input", "output"}) asking about the world's facts.

    RECORDS_PER_CREATURE records per creature, in an order shuffled with a fixed seed: any
    split by position, or by another seeded shuffle, is reproducible and mixes creatures
    and kinds of question. `input` is "" for records that are a question on their own.
    """
    rng = random.Random(f"tinyworld-{seed}-instructions")
    creatures = world(seed)
    records = []
    for creature in creatures:
        for instruction, input_, output in rng.sample(_question_records(rng, creature), k=RECORDS_PER_CREATURE):
            records.append({"instruction": instruction, "input": input_, "output": output})
    rng.shuffle(records)
    return records

"""Write data/support_qa.jsonl: customer-support questions and answers about the Lumenko Aero air
purifiers, a product line invented for peftsweep (every fact below is made up).

Each fact is asked in several phrasings and always answered in the same house style: the answer
first, then the one step to take, no greeting. A pretrained chat model knows none of these facts
and answers in its own style, so fine-tuning visibly changes its answers and a reference judge
can score them. Deterministic: running it again writes the same file.

    python data/make_support_qa.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("support_qa.jsonl")
SEED = 0

MODELS = {
    # name: room size (m2), filter, fan speeds, price (EUR), power (W), filter months
    "Aero S": {"room": 20, "filter": "F-20", "speeds": 3, "price": 129, "watts": 18, "months": 6},
    "Aero M": {"room": 35, "filter": "F-35", "speeds": 4, "price": 189, "watts": 28, "months": 8},
    "Aero XL": {"room": 60, "filter": "F-60", "speeds": 5, "price": 279, "watts": 45, "months": 12},
}

ERRORS = {
    # code: (meaning, what to do)
    "E1": ("the fan is blocked", "unplug the purifier and clear anything caught in the intake grille at the back"),
    "E2": ("the main filter is missing or not seated", "open the back cover and push the filter in until it clicks"),
    "E3": ("the air-quality sensor is dusty", "wipe the sensor window on the left side with a dry cotton swab"),
    "E4": ("the purifier is overheating", "move it at least 30 cm away from walls and curtains and let it cool for 10 minutes"),
    "E5": ("your Wi-Fi password was rejected", "enter the password again in the Lumenko Home app; only 2.4 GHz networks work"),
    "E6": ("a firmware update failed", "hold the Power button for 10 seconds to restart; the update retries by itself"),
    "E7": ("the purifier is tilted", "stand it on a flat, level floor; it restarts on its own"),
    "E8": ("the motor has a fault", "stop using it and contact Lumenko support for a free replacement under warranty"),
}

ERROR_QUESTIONS = [
    "My {model} shows {code}. What does that mean?",
    "What does error {code} mean on the {model}?",
    "The display on my {model} says {code}. How do I fix it?",
    "{code} keeps appearing on my {model}, what should I do?",
    "Why is my {model} showing the code {code}?",
]
ERROR_ANSWER = "{code} means {meaning}. To fix it, {action}."

RING_COLOURS = {
    "blue": "the air is clean",
    "yellow": "the air quality is moderate",
    "red": "the air quality is poor, and the purifier runs faster in Auto mode",
    "purple": "the purifier is in pairing mode, waiting for the Lumenko Home app",
    "blinking white": "the firmware is updating; leave it plugged in until the ring stops blinking",
}
RING_QUESTIONS = [
    "What does a {colour} ring mean on my Aero?",
    "The light ring on my purifier is {colour}. Is something wrong?",
    "Why is the ring on the Aero {colour}?",
    "My Lumenko ring turned {colour}. What does that tell me?",
]
RING_ANSWER = "A {colour} ring means {meaning}."

MODEL_FACTS = [
    (
        ["How big a room can the {model} clean?", "What room size is the {model} made for?", "Is the {model} enough for a {room} m2 room?"],
        "The {model} is made for rooms up to {room} m2. For a bigger room, choose a larger Aero model.",
    ),
    (
        ["Which filter does the {model} use?", "What replacement filter do I need for my {model}?", "Which filter should I order for the {model}?"],
        "The {model} uses the {filter} filter. Order it in the Lumenko Home app or at lumenko.example/filters.",
    ),
    (
        ["How often should I change the filter in my {model}?", "When do I replace the {model} filter?", "How long does a {model} filter last?"],
        "Replace the {filter} filter in the {model} every {months} months, or sooner when the filter light turns red.",
    ),
    (
        ["How many fan speeds does the {model} have?", "How many speed settings are on the {model}?", "What fan speeds can I pick on the {model}?"],
        "The {model} has {speeds} fan speeds. Press the Mode button to step through them.",
    ),
    (
        ["How much does the {model} cost?", "What is the price of the {model}?", "How much is a {model}?"],
        "The {model} costs {price} euros, with free shipping in the EU.",
    ),
    (
        ["How much power does the {model} use?", "What is the power draw of the {model}?", "Is the {model} expensive to run?"],
        "The {model} uses {watts} W at full speed and under 2 W in sleep mode.",
    ),
]

GENERAL = [
    (
        [
            "How do I connect my Aero to the app?",
            "How do I pair the purifier with the Lumenko Home app?",
            "The app cannot find my purifier. How do I add it?",
            "How do I set up Wi-Fi on my Aero?",
        ],
        "Hold Mode and Timer together for 3 seconds until the ring pulses purple, then tap Add device in the Lumenko Home app.",
    ),
    (
        [
            "How do I factory reset my Aero?",
            "How can I reset the purifier to its factory settings?",
            "I want to wipe all settings on my Aero. How?",
            "How do I restore the defaults on my Lumenko purifier?",
        ],
        "Hold Power and Timer together for 10 seconds until the ring flashes white three times. The purifier then restarts with factory settings.",
    ),
    (
        [
            "How long is the warranty on the Aero?",
            "What warranty comes with a Lumenko purifier?",
            "Is my Aero still under warranty after a year?",
            "How many years of warranty do I get?",
        ],
        "Every Aero has a 2-year warranty, extended to 3 years when you register it in the Lumenko Home app within 30 days.",
    ),
    (
        [
            "Can I return my Aero?",
            "What is your return policy?",
            "How many days do I have to send the purifier back?",
            "I am not happy with my purifier. Can I get a refund?",
        ],
        "You can return an Aero within 45 days of delivery for a full refund. Start the return at lumenko.example/returns.",
    ),
    (
        [
            "How do I clean the pre-filter?",
            "How often should I clean the pre-filter?",
            "Can I wash the filter of my Aero?",
            "How do I keep the filters clean?",
        ],
        "Vacuum the pre-filter every two weeks. Never wash the main filter: water ruins it.",
    ),
    (
        [
            "How do I turn on the child lock?",
            "Can I lock the buttons on my Aero?",
            "My kids keep changing the settings. How do I lock the purifier?",
            "How do I turn off the child lock?",
        ],
        "Hold Power and Mode together for 3 seconds to turn the child lock on or off. A lock icon shows while it is on.",
    ),
    (
        [
            "How quiet is the Aero in sleep mode?",
            "Is the purifier loud at night?",
            "How loud is sleep mode?",
            "Can I sleep next to my Aero?",
        ],
        "In sleep mode the Aero runs at 22 dB, quieter than a whisper, and dims its light ring.",
    ),
    (
        [
            "What does Auto mode do?",
            "How does Auto mode work on the Aero?",
            "Should I use Auto mode?",
            "How does the purifier choose its fan speed?",
        ],
        "In Auto mode the PM2.5 sensor measures the air every few seconds and the Aero sets the fan speed for you.",
    ),
    (
        [
            "How do I set the timer?",
            "Can the purifier switch off by itself?",
            "What timer settings does the Aero have?",
            "How do I make the Aero turn off after a few hours?",
        ],
        "Press Timer to switch off after 2, 4 or 8 hours. Press it a fourth time to cancel the timer.",
    ),
    (
        [
            "Is there a filter subscription?",
            "Can I get filters delivered automatically?",
            "Do you offer a discount on replacement filters?",
            "How does the filter subscription work?",
        ],
        "Yes. The filter subscription ships a new filter when yours is due and saves 15% on every filter. Cancel it any time in the app.",
    ),
    (
        [
            "How do I update the firmware?",
            "Does the Aero update itself?",
            "How can I get the latest software on my purifier?",
            "Do I need to install updates on the Aero?",
        ],
        "Firmware updates install by themselves at night when the Aero is on Wi-Fi. The ring blinks white while it updates.",
    ),
    (
        [
            "How do I reset the filter light?",
            "I changed the filter but the light is still red. What now?",
            "How do I tell the Aero I put in a new filter?",
            "The filter warning stays on after a filter change. How do I clear it?",
        ],
        "After fitting a new filter, hold Timer for 5 seconds until the filter light turns off.",
    ),
    (
        [
            "How do I contact Lumenko support?",
            "What are your support hours?",
            "Can I talk to a person at Lumenko?",
            "How do I reach customer service?",
        ],
        "Chat with us in the Lumenko Home app or call +49 30 5550 1234, Monday to Friday, 8:00 to 18:00 CET.",
    ),
    (
        [
            "Does the Aero remove pet hair and odours?",
            "Will the Aero help with pet smells?",
            "Is the Aero good for homes with cats and dogs?",
            "Can the purifier deal with pet dander?",
        ],
        "Yes. The pre-filter catches pet hair and the carbon layer of the main filter absorbs odours. Vacuum the pre-filter weekly with pets.",
    ),
]


def records() -> list[dict[str, str]]:
    """Every question of every fact, each with the fact's one answer, in a seeded order."""
    out = []
    for model, facts in MODELS.items():
        for code, (meaning, action) in ERRORS.items():
            for question in ERROR_QUESTIONS:
                out.append((question.format(model=model, code=code), ERROR_ANSWER.format(code=code, meaning=meaning, action=action)))
        for questions, answer in MODEL_FACTS:
            for question in questions:
                out.append((question.format(model=model, **facts), answer.format(model=model, **facts)))
    for colour, meaning in RING_COLOURS.items():
        for question in RING_QUESTIONS:
            out.append((question.format(colour=colour), RING_ANSWER.format(colour=colour.capitalize(), meaning=meaning)))
    for questions, answer in GENERAL:
        for question in questions:
            out.append((question, answer))
    random.Random(SEED).shuffle(out)
    return [{"instruction": q, "output": a} for q, a in out]


def main() -> None:
    rows = records()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} records to {OUT}")


if __name__ == "__main__":
    main()

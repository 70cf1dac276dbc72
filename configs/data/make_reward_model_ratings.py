"""Write the rated examples of configs/reward_model_example.yaml (deterministic; rerun to regenerate):

    python configs/data/make_reward_model_ratings.py

Short questions with one known answer (arithmetic, capitals, unit conversions), four responses
each, drawn from templates that differ in correctness and length, rated on HelpSteer's 0-4
scales by rules a reader can check:

- helpfulness: 4 = the correct answer with a sentence around it, 3 = the bare correct answer,
  1 = a hedge without an answer, 0 = a wrong answer;
- verbosity: min(4, number of words // 8), so a bare answer is 0 and a long one 3-4.

Train and held-out files use disjoint questions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Sweden", "Stockholm"), ("Thailand", "Bangkok"),
]
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("liters", "milliliters", 1000)]
PADDING = [
    "I hope this helps, and feel free to ask if you have more questions about it.",
    "This is a common question, and it is worth remembering for later.",
    "Let me know if you would like me to explain the reasoning in more detail.",
    "It is always a good idea to double check a result like this one.",
]


def question_bank(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, correct answer, wrong answer) triples."""
    items = []
    for country, capital in CAPITALS:
        wrong = rng.choice([c for _, c in CAPITALS if c != capital])
        items.append((f"What is the capital of {country}?", capital, wrong))
    for _ in range(30):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        items.append((f"What is {a} + {b}?", str(a + b), str(a + b + rng.choice([-3, -1, 1, 2, 10]))))
    for _ in range(12):
        big, small, factor = rng.choice(UNITS)
        amount = rng.randint(2, 9)
        items.append((f"How many {small} are in {amount} {big}?", str(amount * factor), str(amount * factor // 10)))
    rng.shuffle(items)
    return items


def responses(question: str, correct: str, wrong: str, rng: random.Random) -> list[tuple[str, int]]:
    """Candidate (response, helpfulness) pairs, each sentence-y one with 0-3 extra sentences
    (so verbosity spreads over 0-4); four are drawn per question."""
    def pad(text: str) -> str:
        return " ".join([text, *rng.sample(PADDING, rng.randint(0, 3))])

    return [
        (f"{correct}.", 3),
        (pad(f"The answer is {correct}."), 4),
        (pad(f"Good question. The answer is {correct}."), 4),
        (pad(f"Let me think about this carefully. The answer to your question is {correct}."), 4),
        (f"{wrong}.", 0),
        (pad(f"The answer is {wrong}."), 0),
        (pad(f"Let me think about this carefully. The answer to your question is {wrong}."), 0),
        ("I am not sure about that one.", 1),
        (pad("That is an interesting question, but I am not sure of the answer."), 1),
    ]


def verbosity(text: str) -> int:
    return min(4, len(text.split()) // 8)


def rows(items, rng: random.Random) -> list[dict]:
    out = []
    for question, correct, wrong in items:
        for response, helpfulness in rng.sample(responses(question, correct, wrong, rng), 4):
            out.append({"prompt": question, "response": response,
                        "ratings": {"helpfulness": helpfulness, "verbosity": verbosity(response)}})
    return out


def main() -> None:
    rng = random.Random(0)
    items = question_bank(rng)
    held_out, train = items[:15], items[15:]
    for name, part in (("reward_model_ratings_train.jsonl", train), ("reward_model_ratings_eval.jsonl", held_out)):
        records = rows(part, rng)
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"{HERE / name}: {len(records)} rated responses to {len(part)} questions")


if __name__ == "__main__":
    main()

"""Write data/grpo_demo/{train,eval}.jsonl: one-step arithmetic word problems for the GRPO demo.

    .venv/bin/python data/grpo_demo/make_data.py

Rows are ``{"prompt": [messages], "answer": "<integer>"}``: a one-shot chat (the worked example
``What is 3 + 4?`` -> ``3 + 4 = 7 ##### 7``, then the question); configs/grpo.py adds a system prompt
asking for ``<reasoning> ##### <number>``. Fixed seed: running it again rewrites byte-identical
files. The held-out split uses names and objects that never occur in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_NAMES = ["Mia", "Tom", "Ava", "Leo", "Sara", "Ben", "Nora", "Omar", "Lily", "Sam", "Eva", "Max", "Zoe", "Ian",
               "Ruth", "Hugo"]
EVAL_NAMES = ["Priya", "Oskar", "Keiko", "Mateo", "Ingrid", "Tariq"]
TRAIN_ITEMS = ["apples", "pencils", "books", "coins", "stickers", "cards", "marbles", "cookies", "shells", "stamps"]
EVAL_ITEMS = ["lemons", "crayons", "buttons", "tickets"]

TEMPLATES = [  # (question, +1 for a sum a + b, -1 for a difference a - b)
    ("{name} has {a} {items} and gets {b} more. How many {items} now?", +1),
    ("{name} had {a} {items} and gave away {b}. How many {items} are left?", -1),
    ("A box has {a} red and {b} blue {items}. How many {items} in total?", +1),
    ("{name} has {a} {items} and loses {b}. How many {items} remain?", -1),
    ("What is {a} + {b}?", +1),
    ("What is {a} - {b}?", -1),
]


SHOT = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7 ##### 7"}]


def make(rng: random.Random, names: list[str], items: list[str], n: int, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        template, sign = rng.choice(TEMPLATES)
        a = rng.randint(3, 20)
        b = rng.randint(1, a - 1) if sign < 0 else rng.randint(1, 10)
        question = template.format(name=rng.choice(names), items=rng.choice(items), a=a, b=b)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"prompt": SHOT + [{"role": "user", "content": question}], "answer": str(a + sign * b)})
    return rows


def main() -> None:
    rng = random.Random(8)
    seen: set[str] = set()
    splits = {"train": make(rng, TRAIN_NAMES, TRAIN_ITEMS, 400, seen),
              "eval": make(rng, EVAL_NAMES, EVAL_ITEMS, 32, seen)}
    for split, rows in splits.items():
        with (HERE / f"{split}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{split}: {len(rows)} rows")


if __name__ == "__main__":
    main()

"""Generate the shipped DPO demo set, data/dpo_demo/{train,eval}.jsonl (deterministic).

    python data/make_preference_data.py

The task is the SFT demo's "Convert to the JSON record format" (see data/README.md). Each pair
has the correct one-line record as "chosen" and, as "rejected", one kind of mistake a small model
makes on it: a copying error (wrong age, city or name), a string age, chatter around the record, or
pretty-printed JSON with invented fields. Rows are in TRL's conversational preference format:
{"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}.
Everything is synthetic and written for this repository.
"""

from __future__ import annotations

import json
import random

from make_datasets import (
    CITIES,
    EVAL_CITIES,
    EVAL_FIRST_NAMES,
    FIRST_NAMES,
    HERE,
    INSTRUCTION,
    SENTENCES,
    person,
    record,
    write_jsonl,
)

SEED = 20250807
MISTAKES = ("age", "city", "name", "string_age", "chatty", "pretty")


def rejected_answer(rng: random.Random, kind: str, name: str, age: int, city: str, cities: list[str]) -> str:
    if kind == "age":  # a copying error in the number
        wrong = age + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        return record(name, wrong, city)
    if kind == "city":  # another city than the sentence's
        return record(name, age, rng.choice([c for c in cities if c != city]))
    if kind == "name":  # the surname left out
        first = name.split()[0]
        return record(first, age, city)
    if kind == "string_age":
        return json.dumps({"name": name, "age": str(age), "city": city})
    if kind == "chatty":
        lead = rng.choice(["Sure! Here is the JSON record:\n\n", "Here you go:\n", "Of course. "])
        tail = rng.choice(["", "\n\nLet me know if you need anything else!", "\n\nI hope this helps."])
        return lead + record(name, age, city) + tail
    # pretty-printed, with fields nobody asked for (what the base model tends to write)
    fields = {"id": rng.randint(1, 999), "name": name, "age": age, "city": city}
    if rng.random() < 0.5:
        fields["country"] = "Unknown"
    return json.dumps(fields, indent=2)


def pairs(rng: random.Random, n: int, first_names: list[str], cities: list[str]) -> list[dict]:
    rows = []
    for i in range(n):
        name, age, city = person(rng, first_names, cities)
        sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        kind = MISTAKES[i % len(MISTAKES)]
        rows.append({
            "prompt": [{"role": "user", "content": f"{INSTRUCTION} {sentence}"}],
            "chosen": [{"role": "assistant", "content": record(name, age, city)}],
            "rejected": [{"role": "assistant", "content": rejected_answer(rng, kind, name, age, city, cities)}],
        })
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(SEED)
    write_jsonl(HERE / "dpo_demo" / "train.jsonl", pairs(rng, 300, FIRST_NAMES, CITIES))
    write_jsonl(HERE / "dpo_demo" / "eval.jsonl", pairs(rng, 60, EVAL_FIRST_NAMES, CITIES + EVAL_CITIES))


if __name__ == "__main__":
    main()

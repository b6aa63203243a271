"""Generate the small datasets shipped in data/ (deterministic: same script, same files).

    python data/make_datasets.py            # rewrites the files next to this script

Everything here is synthetic and written for this repository. See data/README.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240611

# -- the JSON-record task (sft_demo) ------------------------------------------------------------

FIRST_NAMES = [
    "Alice", "Bruno", "Chloe", "Daniel", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Keiko", "Lars", "Maya", "Nikolai", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tara",
    "Ulrich", "Vera", "Wendell", "Ximena", "Yusuf", "Zoe", "Amara", "Bjorn", "Carmen", "Dmitri",
    "Esther", "Felix", "Gloria", "Henrik", "Ivana", "Jamal", "Katya", "Liam", "Mina", "Noah",
]
# First names that only appear in eval, so the eval measures copying, not memorization.
EVAL_FIRST_NAMES = ["Priya", "Oskar", "Leila", "Mateo", "Sigrid", "Tomas", "Aiko", "Rafael", "Nadia", "Emil"]
SURNAMES = [
    "Smith", "Garcia", "Muller", "Rossi", "Kowalski", "Nakamura", "Okafor", "Silva", "Novak", "Jensen",
    "Dubois", "Haddad", "Ivanova", "Larsen", "Moreau", "Nguyen", "Petrov", "Quintero", "Reyes", "Schmidt",
    "Tanaka", "Umar", "Varga", "Weber", "Yilmaz", "Zhang", "Berg", "Costa", "Fischer", "Lindqvist",
]
CITIES = [
    "Paris", "Berlin", "Madrid", "Lisbon", "Rome", "Vienna", "Prague", "Warsaw", "Oslo", "Dublin",
    "Athens", "Zurich", "Tokyo", "Seoul", "Lagos", "Nairobi", "Cairo", "Lima", "Bogota", "Toronto",
    "Chicago", "Denver", "Boston", "Sydney", "Auckland", "Helsinki", "Krakow", "Porto", "Munich", "Lyon",
]
EVAL_CITIES = ["Bergen", "Valencia", "Osaka", "Quito", "Tallinn", "Geneva"]

# Several phrasings with the fields in different orders; the record always has one fixed layout.
SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Living in {city}, {name} is {age}.",
    "{name} from {city} just turned {age}.",
    "Age {age}. Home: {city}. Name: {name}.",
    "{city} is home to {name}, who is {age}.",
    "Meet {name} ({age}), a resident of {city}.",
    "At {age}, {name} moved to {city}.",
]
INSTRUCTION = "Convert to the JSON record format:"


def record(name: str, age: int, city: str) -> str:
    return json.dumps({"name": name, "age": age, "city": city})


def person(rng: random.Random, first_names: list[str], cities: list[str]) -> tuple[str, int, str]:
    return f"{rng.choice(first_names)} {rng.choice(SURNAMES)}", rng.randint(18, 90), rng.choice(cities)


def sft_demo(rng: random.Random, n: int, first_names: list[str], cities: list[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        name, age, city = person(rng, first_names, cities)
        sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{INSTRUCTION} {sentence}"},
                    {"role": "assistant", "content": record(name, age, city)},
                ]
            }
        )
    return rows


# -- small mixed tasks for format tests ---------------------------------------------------------

WORDS = ["apple", "river", "orange", "planet", "candle", "forest", "silver", "window", "garden", "rocket"]


def small_task(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, output); input may be empty."""
    kind = rng.randrange(5)
    if kind == 0:
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        return "Sort the numbers in ascending order.", ", ".join(map(str, nums)), ", ".join(
            map(str, sorted(nums))
        )
    if kind == 1:
        word = rng.choice(WORDS)
        return "Spell the word backwards.", word, word[::-1]
    if kind == 2:
        words = rng.sample(WORDS, rng.randint(2, 5))
        return "How many words are in the list?", " ".join(words), str(len(words))
    if kind == 3:
        name, age, city = person(rng, FIRST_NAMES, CITIES)
        sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        return INSTRUCTION, sentence, record(name, age, city)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return f"What is {a} plus {b}? Answer with the number only.", "", str(a + b)


def alpaca_demo(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        instruction, inp, output = small_task(rng)
        row = {"instruction": instruction, "input": inp, "output": output}
        if not inp and i % 2:
            del row["input"]  # "input" is optional: some rows leave it out entirely
        rows.append(row)
    return rows


def prompt_completion_demo(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        instruction, inp, output = small_task(rng)
        prompt = f"{instruction}\n{inp}\n" if inp else f"{instruction}\n"
        rows.append({"prompt": prompt + "Answer:\n", "completion": output})
    return rows


def prompt_completion_chat_demo(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        instruction, inp, output = small_task(rng)
        prompt = [{"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}]
        if i % 3 == 0:
            prompt.insert(0, {"role": "system", "content": "You answer tersely."})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": output}]})
    return rows


def chat_multiturn_demo(rng: random.Random, n: int) -> list[dict]:
    """Two or three user/assistant exchanges per row, some with a system message."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "You answer tersely."}] if i % 2 == 0 else []
        for _ in range(rng.randint(2, 3)):
            instruction, inp, output = small_task(rng)
            user = f"{instruction}\n\n{inp}" if inp else instruction
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"wrote {len(rows):4d} rows to {path.relative_to(HERE.parent)}")


def main() -> None:
    rng = random.Random(SEED)
    write_jsonl(HERE / "sft_demo" / "train.jsonl", sft_demo(rng, 400, FIRST_NAMES, CITIES))
    write_jsonl(HERE / "sft_demo" / "eval.jsonl", sft_demo(rng, 60, EVAL_FIRST_NAMES, CITIES + EVAL_CITIES))
    write_jsonl(HERE / "alpaca_demo.jsonl", alpaca_demo(rng, 50))
    write_jsonl(HERE / "prompt_completion_demo.jsonl", prompt_completion_demo(rng, 50))
    write_jsonl(HERE / "prompt_completion_chat_demo.jsonl", prompt_completion_chat_demo(rng, 50))
    write_jsonl(HERE / "chat_multiturn_demo.jsonl", chat_multiturn_demo(rng, 40))


if __name__ == "__main__":
    main()

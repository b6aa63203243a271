"""Write data/self_refine_demo/samples.jsonl: "Is the following review positive?" (yes/no).

    .venv/bin/python data/self_refine_demo/make_data.py

Synthetic, written for this repository; a fixed seed makes the file byte-identical on every run.
Each row: ``id``, ``prompt`` (the user message), ``label`` (the training and evaluation label,
with label noise) and ``clean_label`` (the label before the noise, for analysis only; the
pipeline never reads it). See data/README.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20250107
N_PER_CLASS = 130  # 260 rows, balanced
NOISE_PER_CLASS = 10  # labels flipped in each class (20 of 260 rows, 7.7%)

POSITIVE = ["wonderful", "excellent", "delicious", "friendly", "great", "lovely", "amazing", "perfect",
            "fantastic", "superb", "pleasant", "charming", "brilliant", "outstanding", "delightful", "cozy"]
NEGATIVE = ["terrible", "awful", "disgusting", "rude", "horrible", "bad", "dirty", "boring",
            "dreadful", "disappointing", "mediocre", "noisy", "cold", "bland", "overpriced", "unpleasant"]
NOUNS = ["food", "service", "hotel room", "movie", "concert", "staff", "coffee", "book", "pizza", "waiter",
         "view", "museum", "train ride", "soup", "music", "bed"]
ADVERBS = ["really", "quite", "very", "truly", "rather"]
# One or two judgements of the same polarity, in several phrasings.
REVIEWS = [
    "The {noun} was {adj}.",
    "I thought the {noun} was {adv} {adj}.",
    "Honestly, the {noun} was {adj} and the {noun2} was {adj2}.",
    "My friends said the {noun} was {adv} {adj}.",
    "We found the {noun} {adj}, and the {noun2} {adj2} too.",
    "What a {adj} {noun}!",
    "The {noun} is {adv} {adj}, I must say.",
]
QUESTION = "Is the following review positive? Answer yes or no.\nReview: {review}"


def review(rng: random.Random, adjectives: list[str]) -> str:
    noun, noun2 = rng.sample(NOUNS, 2)
    adj, adj2 = rng.sample(adjectives, 2)
    return rng.choice(REVIEWS).format(noun=noun, noun2=noun2, adj=adj, adj2=adj2, adv=rng.choice(ADVERBS))


def make_rows(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    for clean, adjectives in (("yes", POSITIVE), ("no", NEGATIVE)):
        count = 0
        while count < N_PER_CLASS:
            text = review(rng, adjectives)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"prompt": QUESTION.format(review=text), "clean_label": clean})
            count += 1
    rng.shuffle(rows)
    for clean in ("yes", "no"):
        idx = [i for i, r in enumerate(rows) if r["clean_label"] == clean]
        flipped = set(rng.sample(idx, NOISE_PER_CLASS))
        for i in idx:
            rows[i]["label"] = ("no" if clean == "yes" else "yes") if i in flipped else clean
    return [{"id": f"r{i:03d}", "prompt": r["prompt"], "label": r["label"], "clean_label": r["clean_label"]}
            for i, r in enumerate(rows)]


def main() -> None:
    rows = make_rows()
    out = HERE / "samples.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    noisy = sum(r["label"] != r["clean_label"] for r in rows)
    print(f"wrote {out}: {len(rows)} rows, {sum(r['label'] == 'yes' for r in rows)} labelled yes, {noisy} noisy labels")


if __name__ == "__main__":
    main()

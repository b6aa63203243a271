"""Write data/self_refine_demo/samples.jsonl: "Does the sentence mention a color?" (yes/no).

    .venv/bin/python data/self_refine_demo/make_data.py

Synthetic, written for this repository; a fixed seed makes the file byte-identical on every run.
Each row: ``id``, ``prompt`` (the user message), ``label`` (the training/evaluation label, with
label noise) and ``clean_label`` (the label before the noise, for analysis only; the pipeline
never reads it). See data/README.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20250107
N_PER_CLASS = 130  # 260 rows, balanced
NOISE_PER_CLASS = 10  # labels flipped in each class (about 7.7% of the rows)

COLORS = ["red", "blue", "green", "yellow", "purple", "black", "white", "pink", "brown", "gray"]
# Adjectives that are not colors (and not color-like: no "golden", "silver", "orange").
PLAIN = ["old", "heavy", "quiet", "small", "wooden", "broken", "shiny", "tall", "empty", "warm",
         "soft", "new", "cheap", "round", "tiny", "huge", "dusty", "clean", "noisy", "narrow"]
NOUNS = ["bicycle", "car", "house", "chair", "cup", "door", "bag", "lamp", "boat", "hat", "table",
         "shirt", "kite", "fence", "umbrella", "blanket", "bottle", "book", "box", "scarf"]
SENTENCES = [
    "The {adj} {noun} was next to the window.",
    "I found a {adj} {noun} in the garage.",
    "She bought a {adj} {noun} yesterday.",
    "We left the {adj} {noun} at the station.",
    "A {adj} {noun} stood in the corner of the room.",
    "He asked for the {adj} {noun}, not the other one.",
    "There is a {adj} {noun} behind the shed.",
    "Grandma kept her {adj} {noun} for thirty years.",
]
QUESTION = "Does the following sentence mention a color? Answer yes or no.\nSentence: {sentence}"


def sentence(rng: random.Random, adjectives: list[str]) -> str:
    return rng.choice(SENTENCES).format(adj=rng.choice(adjectives), noun=rng.choice(NOUNS))


def make_rows(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    for clean, adjectives in ((True, COLORS), (False, PLAIN)):
        count = 0
        while count < N_PER_CLASS:
            s = sentence(rng, adjectives)
            if s in seen:
                continue
            seen.add(s)
            rows.append({"prompt": QUESTION.format(sentence=s), "clean_label": "yes" if clean else "no"})
            count += 1
    rng.shuffle(rows)
    for clean in ("yes", "no"):
        idx = [i for i, r in enumerate(rows) if r["clean_label"] == clean]
        flipped = set(rng.sample(idx, NOISE_PER_CLASS))
        for i in idx:
            rows[i]["label"] = ("no" if clean == "yes" else "yes") if i in flipped else clean
    return [{"id": f"s{i:03d}", "prompt": r["prompt"], "label": r["label"], "clean_label": r["clean_label"]}
            for i, r in enumerate(rows)]


def main() -> None:
    rows = make_rows()
    out = HERE / "samples.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    noisy = sum(r["label"] != r["clean_label"] for r in rows)
    print(f"wrote {out}: {len(rows)} rows, {sum(r['label'] == 'yes' for r in rows)} labelled yes, {noisy} noisy labels")


if __name__ == "__main__":
    main()

"""Generate the shipped KTO demo set, data/kto_demo/{train,eval}.jsonl, from the DPO demo pairs (deterministic).

    python data/make_kto_data.py

Rows are in trl's conversational unpaired preference format:
{"prompt": [user message], "completion": [assistant message], "label": true | false}.

train.jsonl is unpaired on purpose: of each pair of data/dpo_demo/train.jsonl only one side is
kept, the correct record (label true) for half of the pairs and the mistake (label false) for the
other half, chosen by a fixed seed -- no prompt has both a desirable and an undesirable
completion, the setting KTO is for. eval.jsonl keeps both sides of every pair of
data/dpo_demo/eval.jsonl (desirable row, then its undesirable row), so a held-out reward
accuracy over same-prompt (desirable, undesirable) pairs is defined and comparable with DPO's.
"""

from __future__ import annotations

import json
import random

from make_datasets import HERE, write_jsonl

SEED = 20251201


def read_pairs(name: str) -> list[dict]:
    with open(HERE / "dpo_demo" / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def one_side_each(pairs: list[dict], rng: random.Random) -> list[dict]:
    keep_chosen = [True] * (len(pairs) // 2) + [False] * (len(pairs) - len(pairs) // 2)
    rng.shuffle(keep_chosen)
    return [{"prompt": p["prompt"], "completion": p["chosen" if good else "rejected"], "label": good}
            for p, good in zip(pairs, keep_chosen)]


def both_sides(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]


def main() -> None:
    rng = random.Random(SEED)
    write_jsonl(HERE / "kto_demo" / "train.jsonl", one_side_each(read_pairs("train.jsonl"), rng))
    write_jsonl(HERE / "kto_demo" / "eval.jsonl", both_sides(read_pairs("eval.jsonl")))


if __name__ == "__main__":
    main()

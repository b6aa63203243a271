"""Embedding-similarity data filtering (seed 001, A.3): scores against a direct numpy computation
on sentence-transformers' embeddings, selection rules against numpy, the CLI's outputs, errors."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlora_jax.data.selection import max_similarity, parse_targets, run, sample_text, select  # noqa: E402
from qlora_jax.data.sources import DataError  # noqa: E402

TRAIN = [  # mixed formats in one pool: alpaca (input present / absent), chat, MCQA, text
    {"instruction": "Convert to the JSON record format:", "input": "Mina Berg, 61, lives in Oslo.",
     "output": '{"name": "Mina Berg", "age": 61, "city": "Oslo"}'},
    {"instruction": "Sort the numbers in ascending order.", "input": "9, 2, 5", "output": "2, 5, 9"},
    {"instruction": "Spell the word backwards: planet", "output": "tenalp"},
    {"messages": [{"role": "user", "content": "What is the chemical symbol for gold?"},
                  {"role": "assistant", "content": "Au"}]},
    {"question": "Which planet is closest to the Sun?", "choices": ["Mercury", "Venus"], "answer": "A"},
    {"text": "Photosynthesis makes glucose from carbon dioxide and water."},
    {"instruction": "Convert to the JSON record format:", "input": "Age 33. Home: Nairobi. Name: Leila Reyes.",
     "output": '{"name": "Leila Reyes", "age": 33, "city": "Nairobi"}'},
    {"instruction": "What is 28 plus 19? Answer with the number only.", "output": "47"},
]
RECORDS = [{"messages": [{"role": "user", "content": f"Convert to the JSON record format: {s}"},
                         {"role": "assistant", "content": r}]}
           for s, r in [("Living in Rome, Hugo Umar is 67.", '{"name": "Hugo Umar", "age": 67, "city": "Rome"}'),
                        ("Meet Felix Weber (19), a resident of Lima.",
                         '{"name": "Felix Weber", "age": 19, "city": "Lima"}')]]
SCIENCE = [{"question": q, "choices": c, "answer": 0} for q, c in [
    ("What is the chemical symbol for silver?", ["Ag", "Au"]),
    ("Which gas do plants absorb for photosynthesis?", ["Carbon dioxide", "Oxygen"]),
    ("Which planet is known as the Red Planet?", ["Mars", "Venus"])]]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(tmp_path: Path, **select_overrides):
    from configs import filter as filter_config

    cfg = filter_config.get_config()
    cfg.data.train = str(write_jsonl(tmp_path / "pool.jsonl", TRAIN))
    cfg.targets = (f"records={write_jsonl(tmp_path / 'records.jsonl', RECORDS)},"
                   f"{write_jsonl(tmp_path / 'science.jsonl', SCIENCE)}")
    cfg.output_dir = str(tmp_path / "out")
    cfg.embed.batch_size = 4
    for k, v in select_overrides.items():
        setattr(cfg.select, k, v)
    return cfg


def read_scores(path: Path) -> dict[str, np.ndarray]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k != "row"}


def test_scores_equal_direct_numpy_cosine_max(tmp_path):
    """The scores the CLI writes equal max_j cos(train_i, target_j) computed directly with numpy
    on sentence-transformers' *unnormalized* embeddings of the same texts."""
    from sentence_transformers import SentenceTransformer

    from qlora_jax.embed import minilm_dir

    cfg = make_config(tmp_path, mode="threshold", threshold=0.3, on="mean")
    summary = run(cfg)
    scores = read_scores(tmp_path / "out/scores.csv")

    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    reference = SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")  # without Normalize

    def embed(rows):
        return reference.encode([sample_text(r) for r in rows], convert_to_numpy=True).astype(np.float64)

    train = embed(TRAIN)
    for name, rows in [("records", RECORDS), ("science", SCIENCE)]:
        target = embed(rows)
        cos = np.array([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in target] for a in train])
        np.testing.assert_allclose(scores[name], cos.max(axis=1), atol=2e-5)
    mean = (scores["records"] + scores["science"]) / 2
    np.testing.assert_allclose(scores["mean"], mean, atol=2e-6)
    kept = np.flatnonzero(mean >= 0.3)
    assert list(np.flatnonzero(scores["kept"])) == list(kept) and summary["kept"] == len(kept)

    # the record rows are the most similar to the record target; the science rows to science
    assert set(np.argsort(-scores["records"])[:2]) == {0, 6}
    assert set(np.argsort(-scores["science"])[:3]) == {3, 4, 5}


def test_cli_outputs_top_k_and_cache(tmp_path, capsys):
    cfg = make_config(tmp_path, mode="top_k", top_k=2, on="records")
    run(cfg)
    out = tmp_path / "out"
    pool_lines = (tmp_path / "pool.jsonl").read_text().splitlines(keepends=True)
    scores = read_scores(out / "scores.csv")
    best = sorted(np.argsort(-scores["records"], kind="stable")[:2])
    assert (out / "filtered.jsonl").read_text() == "".join(pool_lines[i] for i in best)  # verbatim, file order
    assert (out / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 2 and summary["rows"] == len(TRAIN) and summary["target_sizes"] == {
        "records": 2, "science": 3}
    assert summary["select"]["cut"] == pytest.approx(sorted(scores["records"])[-2], abs=1e-6)

    # a rerun with another cut reuses the embeddings and gives the same scores
    capsys.readouterr()
    cfg.select.mode, cfg.select.threshold = "threshold", 0.5
    run(cfg)
    printed = capsys.readouterr().out
    assert printed.count("embeddings reused") == 3
    again = read_scores(out / "scores.csv")
    np.testing.assert_array_equal(again["records"], scores["records"])


def test_select_rules_against_numpy():
    rng = np.random.default_rng(0)
    scores = {"a": rng.uniform(-1, 1, 200).astype(np.float32), "b": rng.uniform(-1, 1, 200).astype(np.float32)}
    scores["a"][[10, 20, 30]] = 1.0  # a three-way tie for the top, above every other score
    mean = (scores["a"] + scores["b"]) / 2
    kept, used, cut = select(scores, on="mean", mode="threshold", threshold=0.25)
    np.testing.assert_array_equal(kept, np.flatnonzero(mean >= 0.25))
    np.testing.assert_allclose(used, mean)
    kept, _, cut = select(scores, on="a", mode="top_k", top_k=2)
    assert list(kept) == [10, 20] and cut == 1.0  # ties go to the earlier rows
    kept, _, _ = select(scores, on="b", mode="top_k", top_k=17)
    assert set(kept) == set(np.argsort(-scores["b"])[:17]) and list(kept) == sorted(kept)


def test_max_similarity_in_blocks_equals_full_product():
    rng = np.random.default_rng(1)
    train, target = rng.standard_normal((103, 8)).astype(np.float32), rng.standard_normal((7, 8)).astype(np.float32)
    np.testing.assert_allclose(max_similarity(train, target, block=10), (train @ target.T).max(axis=1), rtol=1e-6)


def test_sample_text_by_format():
    assert sample_text(TRAIN[2]) == "Spell the word backwards: planet\ntenalp"
    assert sample_text(TRAIN[3]) == "What is the chemical symbol for gold?\nAu"
    assert sample_text(TRAIN[4]) == "Which planet is closest to the Sun?\nMercury\nVenus"
    assert sample_text({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}) == "p\nc"
    assert sample_text({"prompt": "Is it good?", "label": "yes"}) == "Is it good?"
    assert sample_text(TRAIN[0], ["input"]) == "Mina Berg, 61, lives in Oslo."
    with pytest.raises(DataError, match=r"row 7: cannot tell which fields.*text_fields"):
        sample_text({"foo": 1}, where="row 7")
    with pytest.raises(DataError, match=r"\['body'\] missing"):
        sample_text({"text": "x"}, ["body"])


def test_bad_config_and_data_name_the_key_or_line(tmp_path):
    cfg = make_config(tmp_path, on="nope")
    with pytest.raises(DataError, match=r"select.on='nope'.*'records', 'science'"):
        run(cfg)
    cfg = make_config(tmp_path, mode="top_k", top_k=0)
    with pytest.raises(DataError, match="select.top_k=0"):
        run(cfg)
    cfg = make_config(tmp_path, mode="threshold", threshold=1.5)
    with pytest.raises(DataError, match=r"select.threshold=1.5"):
        run(cfg)
    cfg = make_config(tmp_path)
    (tmp_path / "pool.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"pool.jsonl:2"):
        run(cfg)
    (tmp_path / "pool.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"pool.jsonl:2: cannot tell"):
        run(cfg)
    write_jsonl(tmp_path / "pool.jsonl", TRAIN)
    cfg.targets = "records=" + str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="missing.jsonl"):
        run(cfg)
    with pytest.raises(DataError, match="used twice or reserved"):
        parse_targets("a=x.jsonl,a=y.jsonl")
    assert parse_targets("data/mcqa_demo.jsonl") == {"mcqa_demo": "data/mcqa_demo.jsonl"}

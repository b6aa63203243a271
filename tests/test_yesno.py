"""The yes/no objective against independent computations.

References: a numpy softmax over the two allowed logits (the masked softmax), transformers'
PyTorch LLaMA on the tiny model (same logits -> same LLR, through our padded batched scoring),
the trainer's own tokenization of a training row (the scored token is the trained token), and
the metrics against brute-force definitions.
"""

from __future__ import annotations

import numpy as np
import pytest
from _support import require

from qlora_jax.objectives.yesno import (
    AnswerTokenError,
    AnswerTokens,
    normalize_label,
    resolve_answer_tokens,
    restricted_log_probs,
    yes_no_scores,
)
from qlora_jax.pipelines import report

torch = require("torch")
transformers = require("transformers")
from tests.test_train import tiny_model_dir  # noqa: E402,F401  (fixture)

PROMPTS = [
    "Does the following sentence mention a color? Answer yes or no.\nSentence: The red kite was next to the window.",
    "Is a whale a mammal? Answer yes or no.",
    "Does the following sentence mention a color? Answer yes or no.\nSentence: We left the old box at the station, "
    "and then we walked home along the river before the rain started.",
    "yes or no?",
]


def _numpy_scores(logits: np.ndarray, yes: int, no: int, temperature: float = 1.0):
    """Softmax over the two allowed logits only, written out in float64."""
    z = logits.astype(np.float64) / temperature
    zy, zn = z[..., yes], z[..., no]
    m = np.maximum(zy, zn)
    log_norm = m + np.log(np.exp(zy - m) + np.exp(zn - m))
    return zy - log_norm, zn - log_norm


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_masked_softmax_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (3, 5, 50)).astype(np.float32)
    logits[0, 0, 7] = 40.0  # a huge logit elsewhere in the vocabulary must not matter
    answers = AnswerTokens("yes", "no", 3, 11)
    out = {k: np.asarray(v) for k, v in yes_no_scores(logits, answers, temperature).items()}
    ly, ln = _numpy_scores(logits, 3, 11, temperature)
    np.testing.assert_allclose(out["log_p_yes"], ly, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["log_p_no"], ln, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["llr"], (logits[..., 3] - logits[..., 11]) / temperature, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.exp(out["log_p_yes"]) + np.exp(out["log_p_no"]), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out["pred_yes"], logits[..., 3] >= logits[..., 11])
    # Three allowed tokens: each equals a numpy log-softmax over just those columns.
    ids = (3, 11, 20)
    got = np.asarray(restricted_log_probs(logits, ids, temperature))
    z = logits[..., list(ids)].astype(np.float64) / temperature
    ref = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_answer_tokens_from_tokenizer(tiny_model_dir):  # noqa: F811
    from qlora_jax.checkpoints.load import load_tokenizer
    from qlora_jax.data import Conversation, encode_conversation
    from qlora_jax.data.tokenize import encode
    from qlora_jax.pipelines.plan import chat_row
    from qlora_jax.pipelines.scoring import prompt_ids, prompt_text

    tok = load_tokenizer(tiny_model_dir)
    text = prompt_text(tok, PROMPTS[0])
    answers = resolve_answer_tokens(lambda t: encode(tok, t), text, ("yes", "no"))
    assert answers.yes_text == "yes" and answers.no_text == "no"
    assert tok.decode([answers.yes_id]) == "yes" and tok.decode([answers.no_id]) == "no"
    # The trainer's tokenization of a training row: the answer token follows the scored prompt,
    # and it is the first token with loss.
    ids_prompt = prompt_ids(tok, PROMPTS[0])
    for label, want in ((True, answers.yes_id), (False, answers.no_id)):
        row = chat_row("x", PROMPTS[0], answers.text(label))
        ids, mask = encode_conversation(tok, Conversation(tuple(row["messages"]), (len(row["messages"]) - 1,)))
        assert ids[: len(ids_prompt)] == ids_prompt
        assert ids[len(ids_prompt)] == want
        assert mask[: len(ids_prompt)].sum() == 0 and mask[len(ids_prompt)] == 1

    # A word that is several tokens in every spelling: the error names tokenizer and word.
    with pytest.raises(AnswerTokenError, match=r"tokenizer of tiny.*'xylophonists'"):
        resolve_answer_tokens(lambda t: encode(tok, t), text, ("xylophonists", "no"),
                              tokenizer_name="tokenizer of tiny")


def test_answer_spelling_fallback():
    """A toy tokenizer that knows only " Yes" and " No" as single tokens: that spelling is chosen."""
    vocab = {" Yes": 1000, " No": 1001}

    def encode(text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for piece, tid in vocab.items():
                if text.startswith(piece, i):
                    out.append(tid)
                    i += len(piece)
                    break
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    a = resolve_answer_tokens(encode, "Q: ok?\nA:", ("yes", "no"))
    assert (a.yes_text, a.no_text, a.yes_id, a.no_id) == (" Yes", " No", 1000, 1001)


def test_labels():
    assert [normalize_label(v) for v in ("yes", "No", " TRUE ", 0, 1, True, "n")] == [
        True, False, True, False, True, True, False]
    with pytest.raises(ValueError, match="maybe"):
        normalize_label("maybe")


def test_scoring_matches_transformers(tiny_model_dir):  # noqa: F811
    """Batched, right-padded scoring of prompts of different lengths gives the LLR that
    transformers' PyTorch model gives for each prompt alone."""
    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.data.tokenize import encode
    from qlora_jax.lora import LoraConfig
    from qlora_jax.pipelines.scoring import answer_logits_fn, prompt_ids, prompt_text, score_ids
    from qlora_jax.train.loop import split_model

    model, tok = load_model(tiny_model_dir, quantize=None, lora=LoraConfig(r=4, alpha=8, init="gaussian"))
    answers = resolve_answer_tokens(lambda t: encode(tok, t), prompt_text(tok, PROMPTS[0]))
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    assert len({len(x) for x in ids}) == len(ids)
    graphdef, lora, rest = split_model(model)
    ours = score_ids(answer_logits_fn(graphdef), lora, rest, ids, answers, batch_size=3, pad_id=0,
                     pad_to_multiple_of=16)

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ly, ln = [], []
    for x in ids:
        with torch.no_grad():
            last = ref_model(torch.tensor([x])).logits[0, -1].numpy()
        y, n = _numpy_scores(last, answers.yes_id, answers.no_id)
        ly.append(y)
        ln.append(n)
    ly, ln = np.array(ly), np.array(ln)
    assert np.abs(ly - ln).max() > 1e-3  # the random model does prefer one answer
    np.testing.assert_allclose(ours["log_p_yes"], ly, atol=1e-4)
    np.testing.assert_allclose(ours["log_p_no"], ln, atol=1e-4)
    np.testing.assert_allclose(ours["llr"], ly - ln, atol=1e-4)
    np.testing.assert_array_equal(ours["pred_yes"], ly >= ln)


def test_metrics_against_definitions():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.45
    llr = np.round(rng.normal(y * 1.0, 1.0), 1)  # rounding makes ties
    p = 1 / (1 + np.exp(-llr))
    pred = llr >= 0
    # AUROC: fraction of (positive, negative) pairs ordered right, ties one half.
    pos, neg = llr[y], llr[~y]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert report.auroc(llr, y) == pytest.approx(pairs, abs=1e-12)
    # ... and the area under the ROC curve by the trapezoid rule.
    fpr, tpr = report.roc_curve(llr, y)
    assert report.auroc(llr, y) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)
    # F1 = harmonic mean of precision and recall.
    precision = (pred & y).sum() / pred.sum()
    recall = (pred & y).sum() / y.sum()
    assert report.f1_score(pred, y) == pytest.approx(2 * precision * recall / (precision + recall))
    # ECE with an explicit per-sample bin search.
    edges = np.linspace(0, 1, 11)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = [(lo <= q < hi) or (hi == 1.0 and q == 1.0) for q in p]
        m = np.array(m)
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    assert report.expected_calibration_error(p, y) == pytest.approx(ece, abs=1e-12)
    assert report.brier_score(p, y) == pytest.approx(sum((a - b) ** 2 for a, b in zip(p, y)) / len(y))
    m = report.classification_metrics(y, pred, llr, p)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y)) and m["n"] == 200
    mean, std = report.mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)

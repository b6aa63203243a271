"""Multiple-choice QA evaluation, scored the way lm-eval-harness scores MMLU.

    python -m qlora_jax.evaluate --config configs/eval_mcqa.py [--config.model.source=...]
        [--config.adapter=RUN_DIR/adapter] [--config.prompt.chat_template=True]

Data: a JSONL (or JSON list) file of ``{"question": str, "choices": [str, ...], "answer": "B" | 1,
"subject": str (optional)}``; ``answer`` is a letter or a 0-based index.

Prompt (``chat_template=False``, the harness's MMLU format)::

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. {choice 0}
    B. {choice 1}
    ...
    Answer:

``num_fewshot`` solved questions (the first ones of the file other than the one asked, each ending
``Answer: X`` and a blank line) may precede the question. With ``chat_template=True`` that text is
the user message of the model's chat template and the answer is the start of the assistant turn.

Scoring: each option's label (" A", " B", ... after ``Answer:``; "A", "B", ... at the start of
an assistant turn) must be a single token -- checked, with a clear error otherwise -- so its
log-likelihood as the continuation is one log-softmax entry at the prompt's last position; one
forward pass per question scores every option. Prediction = argmax, accuracy = share of
predictions equal to the gold answer. We also check that the prompt's tokens followed by the
label's token are exactly the tokenization of the joined text (the harness scores the
continuation tokens of the joined string; a merge across the boundary would change them).

Retrieval (``--config.rag.enabled=True``): each question (its text alone, not the options) is
the query; the ``rag.top_k`` most similar chunks of ``rag.corpus`` (or of the saved index
``rag.index``; see :mod:`qlora_jax.rag`) are put before the harness prompt by ``rag.template``
(default ``Background:\n{context}\n\n{prompt}``, best passage last), inside the chat template
when that is on. Few-shot examples get no passages. The results record each question's
passages and whether they contain the gold option's text (a retrieval-recall proxy).

Outputs: a JSON file (per question: the options' log-likelihoods, prediction, gold; per subject
and overall accuracy) and a printed table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import string
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.data.tokenize import pad_id_of
from qlora_jax.errors import UserError
from qlora_jax.inference.generate import bucket_length, load_for_inference
from qlora_jax.rag import RagError, RagIndex
from qlora_jax.rag.prompt import MCQA_TEMPLATE, check_template, mcqa_prompt

LETTERS = string.ascii_uppercase
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
DEFAULT_SUBJECT = "general knowledge"


class MCQAError(UserError):
    """A data file or setting that cannot be evaluated; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class MCQItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index of the correct choice
    subject: str | None = None


def _parse_answer(value: Any, n_choices: int, where: str) -> int:
    if isinstance(value, bool):
        raise MCQAError(f"{where}: answer must be a letter or an index, got {value!r}")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    else:
        raise MCQAError(f"{where}: answer must be a letter (A, B, ...) or a 0-based index, got {value!r}")
    if not 0 <= index < n_choices:
        raise MCQAError(f"{where}: answer {value!r} is outside the {n_choices} choices")
    return index


def parse_item(row: Any, where: str) -> MCQItem:
    """One record -> :class:`MCQItem`, with errors naming the record and the field."""
    if not isinstance(row, dict):
        raise MCQAError(f"{where}: expected an object with question, choices, answer; got {type(row).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in row]
    if missing:
        raise MCQAError(f"{where}: missing field(s) {missing} (have {sorted(row)})")
    question, choices = row["question"], row["choices"]
    if not isinstance(question, str) or not question.strip():
        raise MCQAError(f"{where}: question must be a non-empty string")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) \
            or not all(isinstance(c, str) for c in choices):
        raise MCQAError(f"{where}: choices must be a list of 2..{len(LETTERS)} strings, got {choices!r}")
    subject = row.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise MCQAError(f"{where}: subject must be a string")
    return MCQItem(question.strip(), tuple(c.strip() for c in choices),
                   _parse_answer(row["answer"], len(choices), where), subject)


def load_mcqa(path: str | Path) -> list[MCQItem]:
    """Read a JSONL file (one question per line) or a JSON list of questions."""
    path = Path(path)
    if not path.is_file():
        raise MCQAError(f"data.path: no file at {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = [(f"{path} item {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise MCQAError(f"{path}: not valid JSON: {e}") from e
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise MCQAError(f"{path}:{n}: not valid JSON: {e}") from e
    if not rows:
        raise MCQAError(f"{path}: no questions")
    return [parse_item(row, where) for where, row in rows]


# ---------------------------------------------------------------------------------------------
# Prompts

SCORING = ("letter", "cloze")


def format_question(item: MCQItem, *, scoring: str = "letter", with_answer: bool = False) -> str:
    """``letter``: ``question\nA. ...\nB. ...\nAnswer:``; ``cloze``: ``question\nAnswer:``.
    ``with_answer`` appends the solved answer (a few-shot example): `` X`` or `` <choice text>``."""
    if scoring == "letter":
        lines = [item.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    else:
        lines = [item.question]
    text = "\n".join(lines) + "\nAnswer:"
    if not with_answer:
        return text
    return text + " " + (LETTERS[item.answer] if scoring == "letter" else item.choices[item.answer])


def format_prompt(item: MCQItem, shots: Sequence[MCQItem] = (), subject: str | None = None,
                  scoring: str = "letter") -> str:
    """The harness's MMLU prompt for ``item`` after ``shots`` solved examples."""
    subject = subject or item.subject or DEFAULT_SUBJECT
    body = "".join(format_question(s, scoring=scoring, with_answer=True) + "\n\n" for s in shots)
    return HEADER.format(subject=subject) + body + format_question(item, scoring=scoring)


def fewshot_examples(items: Sequence[MCQItem], index: int, k: int) -> list[MCQItem]:
    """The first ``k`` questions of the file other than question ``index``."""
    return [it for j, it in enumerate(items) if j != index][:k]


def _progress(batches: range, total: int, batch_size: int):
    """Yield ``batches`` with a progress bar on a terminal (none when stderr is a file or pipe)."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="scoring", unit="seq", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        for lo in batches:
            yield lo
            bar.update(min(batch_size, total - lo))


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora"))
def _label_logprobs(graphdef, state, ids: jax.Array, lengths: jax.Array, label_ids: jax.Array, *, use_lora: bool):
    """Log-softmax over the whole vocabulary at each row's last prompt position, read at the label
    tokens: ``[batch, n_labels]`` log-likelihoods."""
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids, lora_enabled=use_lora)  # [b, s, h]; right padding is harmless
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [b, h]
    logprobs = jax.nn.log_softmax(model.logits_from_hidden(last).astype(jnp.float32), axis=-1)
    return logprobs[:, label_ids]


@functools.partial(jax.jit, static_argnames=("graphdef", "use_lora"))
def _continuation_logprobs(graphdef, state, ids: jax.Array, targets: jax.Array, mask: jax.Array, *,
                           use_lora: bool):
    """Sum over the masked positions of ``log p(targets | ids up to there)``: ``[batch]``."""
    model = nnx.merge(graphdef, state)
    logits = model.logits_from_hidden(model.hidden_states(ids, lora_enabled=use_lora)).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


class MCQAScorer:
    """Scores questions with a :class:`~qlora_jax.models.CausalLM` and its tokenizer.

    ``scoring``: "letter" (the harness's MMLU: options listed, each letter scored as a
    single-token continuation) or "cloze" (options not listed, each option's text scored as the
    continuation -- the sum of its tokens' log-probabilities, plus the harness's ``acc_norm``,
    that sum divided by the continuation's length in bytes). ``chat_template``: wrap the prompt
    as the user turn of the tokenizer's chat template (with ``system`` as the system message
    when given). ``label_prefix``: text before the continuation; "auto" is " " for raw prompts
    (after "Answer:") and "" with the chat template (the answer opens the assistant turn).
    Sequences are right-padded to a length bucket (the next power of two, at least 32) in
    batches of ``batch_size``, so few programs are compiled.
    """

    def __init__(self, model, tokenizer, *, scoring: str = "letter", chat_template: bool = False,
                 system: str | None = None, num_fewshot: int = 0, subject: str | None = None,
                 label_prefix: str = "auto", batch_size: int = 8, lora_enabled: bool = True,
                 rag_template: str | None = None):
        if scoring not in SCORING:
            raise MCQAError(f"scoring must be one of {SCORING}, got {scoring!r}")
        self.model, self.tokenizer, self.scoring = model, tokenizer, scoring
        self.chat_template, self.system = chat_template, system or None
        if num_fewshot < 0:
            raise MCQAError(f"num_fewshot must be >= 0, got {num_fewshot}")
        self.num_fewshot, self.subject = num_fewshot, subject or None
        self.label_prefix = (("" if chat_template else " ") if label_prefix == "auto" else label_prefix)
        if batch_size < 1:
            raise MCQAError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.lora_enabled = bool(lora_enabled) and model.lora_config is not None
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise MCQAError("prompt.chat_template=True but the tokenizer has no chat template")
        self.pad_id = pad_id_of(tokenizer)

        self.rag_template = rag_template or MCQA_TEMPLATE
        check_template(self.rag_template, "prompt")

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def label_token_ids(self, n_choices: int) -> list[int]:
        """The single token of each option label; raises naming a label that is not one token."""
        ids = []
        for letter in LETTERS[:n_choices]:
            label = self.label_prefix + letter
            tokens = self._encode(label)
            if len(tokens) != 1:
                raise MCQAError(f"option label {label!r} is {len(tokens)} tokens {tokens} for this tokenizer; "
                                f"letter scoring needs single-token labels (try prompt.label_prefix, or "
                                f"scoring='cloze')")
            ids.append(tokens[0])
        return ids

    def prompt_text(self, item: MCQItem, shots: Sequence[MCQItem] = (), passages: Sequence[str] = ()) -> str:
        """The prompt for ``item``; retrieved ``passages`` (best first) go before it by ``rag_template``."""
        text = mcqa_prompt(format_prompt(item, shots, self.subject, self.scoring), passages, self.rag_template)
        if not self.chat_template:
            return text
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
                   [{"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def continuation_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split as the harness does: encode the joined text and
        cut it after the context's own tokens (so a merge across the boundary shows)."""
        context_ids = self._encode(context)
        whole = self._encode(context + continuation)
        if whole[:len(context_ids)] != context_ids:
            raise MCQAError(f"the continuation {continuation!r} merges with the end of the prompt when "
                            f"tokenized together; the prompt's tokens are not a prefix of the joined text's")
        return context_ids, whole[len(context_ids):]

    def score(self, items: Sequence[MCQItem], passages: Sequence[Sequence[str]] | None = None) -> list[dict[str, Any]]:
        """Per question: ``logprobs`` per option, ``pred`` (argmax), ``gold``, ``prompt_tokens``;
        with cloze scoring also ``logprobs_norm`` (per byte) and ``pred_norm``. ``passages``:
        retrieved passages per question (retrieval-augmented prompts)."""
        items = list(items)
        if not items:
            return []
        passages = list(passages) if passages is not None else [()] * len(items)
        if len(passages) != len(items):
            raise MCQAError(f"{len(passages)} passage lists for {len(items)} questions")
        texts = [self.prompt_text(it, fewshot_examples(items, i, self.num_fewshot), passages[i])
                 for i, it in enumerate(items)]
        if self.scoring == "letter":
            return self._score_letters(items, texts)
        return self._score_cloze(items, texts)

    def _check_context(self, lengths: Sequence[int]) -> None:
        """Refuse questions whose scored sequence is longer than the model's context: their scores
        would come from positions the model never saw in training (silently wrong)."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not limit:
            return
        over = [i for i, n in enumerate(lengths) if n > limit]
        if over:
            worst = max(over, key=lambda i: lengths[i])
            raise MCQAError(f"{len(over)} of {len(lengths)} questions are longer than the model's context of "
                            f"{limit} tokens (first: #{over[0] + 1}; longest: #{worst + 1} with {lengths[worst]} "
                            f"tokens); use fewer data.num_fewshot or rag.top_k, shorter questions, "
                            f"or a model with a longer context")

    def _score_letters(self, items, texts):
        label_ids = self.label_token_ids(max(len(it.choices) for it in items))
        prompts = []
        for item, text in zip(items, texts):
            for i in range(len(item.choices)):
                context, continuation = self.continuation_tokens(text, self.label_prefix + LETTERS[i])
                if continuation != [label_ids[i]]:
                    raise MCQAError(f"the label {self.label_prefix + LETTERS[i]!r} tokenizes as {continuation} "
                                    f"after the prompt, not as its own token {label_ids[i]}")
            prompts.append(context)
        self._check_context([len(p) + 1 for p in prompts])
        graphdef, state = nnx.split(self.model)
        rows_out = []
        for lo in _progress(range(0, len(prompts), self.batch_size), len(prompts), self.batch_size):
            rows = prompts[lo:lo + self.batch_size]
            ids = np.full((self.batch_size, bucket_length(max(map(len, rows)), 32)), self.pad_id, np.int32)
            lengths = np.ones((self.batch_size,), np.int32)
            for r, p in enumerate(rows):
                ids[r, :len(p)], lengths[r] = p, len(p)
            out = _label_logprobs(graphdef, state, jnp.asarray(ids), jnp.asarray(lengths),
                                  jnp.asarray(label_ids, jnp.int32), use_lora=self.lora_enabled)
            rows_out.extend(np.asarray(out)[:len(rows)])
        results = []
        for item, prompt, row in zip(items, prompts, rows_out):
            logprobs = [float(v) for v in row[:len(item.choices)]]
            results.append({"logprobs": logprobs, "pred": int(np.argmax(logprobs)), "gold": item.answer,
                            "prompt_tokens": len(prompt)})
        return results

    def _score_cloze(self, items, texts):
        pairs = []  # (question index, token ids, number of continuation tokens, continuation bytes)
        for q, (item, text) in enumerate(zip(items, texts)):
            for choice in item.choices:
                continuation = self.label_prefix + choice
                context, cont = self.continuation_tokens(text, continuation)
                pairs.append((q, context + cont, len(cont), len(continuation.encode("utf-8")), len(context)))
        longest = {}
        for q, tokens, *_ in pairs:
            longest[q] = max(longest.get(q, 0), len(tokens))
        self._check_context([longest[q] for q in range(len(items))])
        graphdef, state = nnx.split(self.model)
        sums = []
        for lo in _progress(range(0, len(pairs), self.batch_size), len(pairs), self.batch_size):
            chunk = pairs[lo:lo + self.batch_size]
            seq = bucket_length(max(len(p[1]) for p in chunk), 32)
            ids = np.full((self.batch_size, seq), self.pad_id, np.int32)
            targets = np.zeros((self.batch_size, seq), np.int32)
            mask = np.zeros((self.batch_size, seq), bool)
            for r, (_, tokens, n_cont, _, _) in enumerate(chunk):
                ids[r, :len(tokens)] = tokens
                targets[r, :len(tokens) - 1] = tokens[1:]  # position t predicts token t + 1
                mask[r, len(tokens) - 1 - n_cont:len(tokens) - 1] = True
            out = _continuation_logprobs(graphdef, state, jnp.asarray(ids), jnp.asarray(targets), jnp.asarray(mask),
                                         use_lora=self.lora_enabled)
            sums.extend(float(v) for v in np.asarray(out)[:len(chunk)])
        results = [{"logprobs": [], "logprobs_norm": [], "gold": it.answer, "prompt_tokens": 0} for it in items]
        for (q, _, _, n_bytes, n_context), total in zip(pairs, sums):
            results[q]["logprobs"].append(total)
            results[q]["logprobs_norm"].append(total / n_bytes)
            results[q]["prompt_tokens"] = n_context
        for r in results:
            r["pred"] = int(np.argmax(r["logprobs"]))
            r["pred_norm"] = int(np.argmax(r["logprobs_norm"]))
        return results


# ---------------------------------------------------------------------------------------------
# Running an evaluation from a config

def summarize(items: Sequence[MCQItem], scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per subject, prediction counts, and one record per question.

    With cloze scores, ``accuracy_norm`` (the harness's ``acc_norm``: log-likelihood per byte)
    is reported next to ``accuracy``.
    """
    cloze = "pred_norm" in scores[0]
    questions, by_subject = [], {}
    for i, (item, s) in enumerate(zip(items, scores)):
        correct = s["pred"] == s["gold"]
        subject = item.subject or DEFAULT_SUBJECT
        entry = by_subject.setdefault(subject, {"correct": 0, "total": 0} | ({"correct_norm": 0} if cloze else {}))
        entry["correct"] += int(correct)
        entry["total"] += 1
        record = {
            "index": i, "subject": subject, "question": item.question, "choices": list(item.choices),
            "gold": LETTERS[s["gold"]], "pred": LETTERS[s["pred"]], "correct": bool(correct),
            "logprobs": {LETTERS[j]: v for j, v in enumerate(s["logprobs"])},
            "prompt_tokens": s["prompt_tokens"],
        }
        if cloze:
            record.update(pred_norm=LETTERS[s["pred_norm"]], correct_norm=s["pred_norm"] == s["gold"],
                          logprobs_norm={LETTERS[j]: v for j, v in enumerate(s["logprobs_norm"])})
            entry["correct_norm"] += int(record["correct_norm"])
        else:  # probability the model puts on the option letters at all
            record["label_mass"] = float(np.exp(s["logprobs"]).sum())
        questions.append(record)
    for entry in by_subject.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
        if cloze:
            entry["accuracy_norm"] = entry["correct_norm"] / entry["total"]
    correct = sum(q["correct"] for q in questions)
    counts = {LETTERS[j]: sum(q["pred"] == LETTERS[j] for q in questions)
              for j in range(max(len(it.choices) for it in items))}
    summary = {"scoring": "cloze" if cloze else "letter", "accuracy": correct / len(questions), "correct": correct,
               "total": len(questions)}
    if cloze:
        summary["accuracy_norm"] = sum(q["correct_norm"] for q in questions) / len(questions)
    else:
        summary["mean_label_mass"] = float(np.mean([q["label_mass"] for q in questions]))
    summary.update(by_subject=dict(sorted(by_subject.items())), prediction_counts=counts, questions=questions)
    return summary


def format_table(summary: dict[str, Any], title: str = "") -> str:
    cloze = summary["scoring"] == "cloze"
    lines = [title] if title else []
    lines.append(f"{'subject':<20}{'correct':>9}{'total':>7}{'accuracy':>10}" + (f"{'acc_norm':>10}" if cloze else ""))
    rows = list(summary["by_subject"].items()) + [("all", summary)]
    for subject, e in rows:
        norm = e.get("accuracy_norm")
        lines.append(f"{subject:<20}{e['correct']:>9}{e['total']:>7}{e['accuracy']:>10.1%}"
                     + (f"{norm:>10.1%}" if cloze else ""))
    tail = ("" if cloze else f"; mean probability on the option letters {summary['mean_label_mass']:.2f}")
    lines.append("predictions: " + ", ".join(f"{k} {v}" for k, v in summary["prediction_counts"].items()) + tail)
    return "\n".join(lines)


def retrieve_passages(rag_cfg, items: Sequence[MCQItem]) -> tuple[list[list[str]], dict[str, Any]]:
    """The top-k passages for each question (the question text is the query) from ``rag.index``
    (a saved index) or, without one, an index built in memory from ``rag.corpus``; and a record
    of what was retrieved (locations, scores, whether the gold option's text is in them)."""
    import re


    t0 = time.perf_counter()
    if rag_cfg.index:
        try:
            index, where = RagIndex.load(rag_cfg.index), str(rag_cfg.index)
        except RagError as err:
            raise RagError(f"rag.index: {err}") from None
    else:
        corpus = [p.strip() for p in str(rag_cfg.corpus).split(",") if p.strip()]
        if not corpus:
            raise RagError("rag.enabled=True needs rag.index (a saved index) or rag.corpus (files/directories)")
        try:
            index = RagIndex.build(corpus, chunk_words=rag_cfg.chunk_words, overlap_words=rag_cfg.overlap_words)
        except RagError as err:
            raise RagError(f"rag.corpus: {err}") from None
        where = ",".join(corpus)
    hits = index.search([it.question for it in items], k=rag_cfg.top_k)
    passages = [[h.chunk.text for h in row] for row in hits]

    def contains(text: str, answer: str) -> bool:
        return re.search(r"(?<!\w)" + re.escape(answer.lower()) + r"(?!\w)", text.lower()) is not None

    gold_found = [any(contains(p, it.choices[it.answer]) for p in ps) for it, ps in zip(items, passages)]
    record = {"index": where, "chunks": len(index), "top_k": int(rag_cfg.top_k),
              "seconds": round(time.perf_counter() - t0, 2),
              "gold_in_passages": sum(gold_found) / len(items),
              "retrieved": [{"locations": [h.chunk.location for h in row], "scores": [round(h.score, 4) for h in row],
                             "gold_in_passages": found} for row, found in zip(hits, gold_found)]}
    return passages, record


def run(cfg) -> dict[str, Any]:
    """Evaluate as ``cfg`` (``configs/eval_mcqa.py``) says; writes ``cfg.output`` and returns the results."""

    items = load_mcqa(cfg.data.path)
    if cfg.data.max_questions:
        items = items[:cfg.data.max_questions]
    passages, rag_record = None, None
    if cfg.rag.enabled:

        if cfg.rag.template:
            check_template(cfg.rag.template, "prompt")  # before the slow part
        passages, rag_record = retrieve_passages(cfg.rag, items)
    t0 = time.perf_counter()
    model, tokenizer, what = load_for_inference(cfg.model.source or None, cfg.adapter or None,
                                                quantize=cfg.model.quantize, dtype=cfg.model.dtype,
                                                adapter_flag="config.adapter")
    t_load = time.perf_counter() - t0
    scorer = MCQAScorer(model, tokenizer, scoring=cfg.scoring, chat_template=cfg.prompt.chat_template,
                        system=cfg.prompt.system,
                        num_fewshot=cfg.data.num_fewshot, subject=cfg.data.subject,
                        label_prefix=cfg.prompt.label_prefix, batch_size=cfg.batch_size,
                        lora_enabled=cfg.lora_enabled, rag_template=cfg.rag.template or None)
    t1 = time.perf_counter()
    summary = summarize(items, scorer.score(items, passages))
    summary.update(model=what, adapters_on=scorer.lora_enabled, data=str(cfg.data.path),
                   chat_template=bool(cfg.prompt.chat_template), num_fewshot=int(cfg.data.num_fewshot),
                   seconds={"load": round(t_load, 2), "score": round(time.perf_counter() - t1, 2)},
                   example_prompt=scorer.prompt_text(items[0], fewshot_examples(items, 0, scorer.num_fewshot),
                                                     passages[0] if passages else ()),
                   config=json.loads(cfg.to_json()))
    if rag_record is not None:
        summary["rag"] = rag_record
        for q, r in zip(summary["questions"], rag_record["retrieved"]):
            q["retrieved"] = r
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    title = f"{what}{' (adapters off)' if cfg.adapter and not scorer.lora_enabled else ''}: {cfg.data.path}"
    if rag_record is not None:
        title += (f"\nretrieval: top {rag_record['top_k']} of {rag_record['chunks']} chunks ({rag_record['index']}); "
                  f"gold option's text in the passages for {rag_record['gold_in_passages']:.1%} of questions")
    print(format_table(summary, title))
    if cfg.print_questions:
        for q in summary["questions"]:
            mark = "ok " if q["correct"] else "   "
            print(f"{mark}{q['index']:>3} gold {q['gold']} pred {q['pred']}  {q['question']}")
    if cfg.output:
        print(f"results: {cfg.output}")
    return summary

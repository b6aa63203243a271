"""MCQA evaluation: data parsing, the harness prompt, and the scores against a direct transformers
computation.

The reference follows lm-eval-harness's recipe independently of our shortcut: encode the joined
``prompt + continuation``, split it after the prompt's own tokens, run transformers' model on the
whole sequence and sum the log-softmax of the continuation tokens. Our letter scoring reads one
log-softmax row per question instead; both must agree to 1e-4 (measured ~1e-6) and give the
same predictions. The model is a tiny random LLaMA with SmolLM2's real tokenizer (so the labels,
chat template and tokenization are the real ones); the shipped set's accuracy with SmolLM2
itself is measured by the CLI (see the report in data/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _support import require

from qlora_jax.inference.evaluate import (
    LETTERS,
    MCQAError,
    MCQAScorer,
    MCQItem,
    fewshot_examples,
    format_prompt,
    load_mcqa,
    parse_item,
    run,
)

torch = require("torch")
transformers = require("transformers")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data/mcqa_demo.jsonl"
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, transformers model, our model, tokenizer): a 2-layer random LLaMA, SmolLM2's tokenizer."""
    import _smollm2 as smol

    from qlora_jax.checkpoints.load import load_model

    tok = smol.tokenizer()
    d = tmp_path_factory.mktemp("tiny_mcqa")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # spread the logits so the options' scores are far apart
        reference.model.embed_tokens.weight.mul_(20.0)
    reference.save_pretrained(d)
    tok.save_pretrained(d)
    ours, tokenizer = load_model(str(d), quantize=None, dtype="float32")
    return d, reference, ours, tokenizer


def reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval-harness's log-likelihood of ``continuation`` after ``context``, with transformers."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(context_ids):]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return float(sum(logprobs[len(whole) - len(cont) - 1 + i, t] for i, t in enumerate(cont)))


def test_shipped_set_and_parsing(tmp_path):
    items = load_mcqa(DATA)
    assert 40 <= len(items) <= 60
    assert all(len(it.choices) == 4 and it.subject for it in items)
    golds = [it.answer for it in items]
    assert all(golds.count(g) == len(items) // 4 for g in range(4))  # "always A" scores exactly 25%
    assert parse_item({"question": "q", "choices": ["x", "y"], "answer": 1}, "w").answer == 1
    assert parse_item({"question": "q", "choices": ["x", "y"], "answer": "b"}, "w").answer == 1
    bad = [({"question": "q", "choices": ["x", "y"]}, r"w: missing field\(s\) \['answer'\]"),
           ({"question": "q", "choices": ["x"], "answer": 0}, "w: choices must be a list of 2..26"),
           ({"question": "q", "choices": ["x", "y"], "answer": "C"}, "w: answer 'C' is outside the 2 choices"),
           ({"question": "q", "choices": ["x", "y"], "answer": "yes"}, "w: answer must be a letter"),
           ({"question": " ", "choices": ["x", "y"], "answer": 0}, "w: question must be a non-empty string")]
    for row, message in bad:
        with pytest.raises(MCQAError, match=message):
            parse_item(row, "w")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "choices": ["x", "y"], "answer": 0}\n{"question": "q"\n')
    with pytest.raises(MCQAError, match=r"bad.jsonl:2: not valid JSON"):
        load_mcqa(path)


def test_prompt_is_the_harness_format():
    item = MCQItem("What is 7 multiplied by 8?", ("54", "56", "58", "64"), 1, "mathematics")
    shot = MCQItem("How many sides does a hexagon have?", ("5", "6"), 1, "mathematics")
    assert format_prompt(item) == ("The following are multiple choice questions (with answers) about mathematics.\n\n"
                                   "What is 7 multiplied by 8?\nA. 54\nB. 56\nC. 58\nD. 64\nAnswer:")
    assert format_prompt(item, [shot], subject="arithmetic") == (
        "The following are multiple choice questions (with answers) about arithmetic.\n\n"
        "How many sides does a hexagon have?\nA. 5\nB. 6\nAnswer: B\n\n"
        "What is 7 multiplied by 8?\nA. 54\nB. 56\nC. 58\nD. 64\nAnswer:")
    assert format_prompt(item, [shot], scoring="cloze").endswith(
        "How many sides does a hexagon have?\nAnswer: 6\n\nWhat is 7 multiplied by 8?\nAnswer:")
    items = [item, shot, item]
    assert fewshot_examples(items, 1, 5) == [item, item] and fewshot_examples(items, 0, 1) == [shot]


def test_labels_must_be_single_tokens(tiny):
    _, _, ours, tokenizer = tiny
    scorer = MCQAScorer(ours, tokenizer)
    assert [tokenizer.decode([t]) for t in scorer.label_token_ids(4)] == [" A", " B", " C", " D"]
    with pytest.raises(MCQAError, match=r"option label 'Option A' is 2 tokens"):
        MCQAScorer(ours, tokenizer, label_prefix="Option ").label_token_ids(4)


@pytest.mark.parametrize("scoring,chat,shots", [("letter", False, 0), ("letter", False, 2), ("letter", True, 0),
                                                ("cloze", False, 1), ("cloze", True, 0)])
def test_scores_match_transformers(tiny, scoring, chat, shots):
    _, reference, ours, tokenizer = tiny
    items = load_mcqa(DATA)[:8]
    scorer = MCQAScorer(ours, tokenizer, scoring=scoring, chat_template=chat, num_fewshot=shots, batch_size=4)
    scores = scorer.score(items)
    worst = 0.0
    for i, (item, s) in enumerate(zip(items, scores)):
        context = scorer.prompt_text(item, fewshot_examples(items, i, shots))
        if chat:
            assert context.startswith("<|im_start|>") and context.endswith("<|im_start|>assistant\n")
        prefix = "" if chat else " "
        continuations = [prefix + (LETTERS[j] if scoring == "letter" else c) for j, c in enumerate(item.choices)]
        expected = [reference_loglik(reference, tokenizer, context, c) for c in continuations]
        worst = max(worst, float(np.max(np.abs(np.asarray(s["logprobs"]) - expected))))
        assert s["pred"] == int(np.argmax(expected)) and s["gold"] == item.answer
        if scoring == "cloze":
            norm = [e / len(c.encode()) for e, c in zip(expected, continuations)]
            assert s["pred_norm"] == int(np.argmax(norm))
    print(f"{scoring} chat={chat} shots={shots}: max |loglik diff| vs transformers {worst:.1e}")
    assert worst <= TOL


def test_cli_run_writes_results_with_and_without_adapters(tiny, tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from configs import eval_mcqa
    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.checkpoints.peft_io import save_peft_adapter
    from qlora_jax.lora import LoraConfig, LoRAParam

    model_dir, _, ours, tokenizer = tiny
    cfg = eval_mcqa.get_config()
    cfg.model.source = str(model_dir)
    cfg.model.quantize = "none"
    cfg.data.max_questions = 12
    cfg.output = str(tmp_path / "base.json")
    base = run(cfg)
    saved = json.loads(Path(cfg.output).read_text())
    assert saved["total"] == 12 and saved["accuracy"] == base["accuracy"] == saved["correct"] / 12
    assert len(saved["questions"]) == 12 and set(saved["questions"][0]["logprobs"]) == set("ABCD")
    assert saved["example_prompt"].endswith("\nD. " + load_mcqa(DATA)[0].choices[3] + "\nAnswer:")
    direct = MCQAScorer(ours, tokenizer).score(load_mcqa(DATA)[:12])
    assert [q["pred"] for q in saved["questions"]] == [LETTERS[s["pred"]] for s in direct]

    # A run's PEFT adapter with non-zero B: on, the scores move; off, they are the base model's.
    lora = LoraConfig(r=4, alpha=8.0)
    adapted, _ = load_model(str(model_dir), quantize=None, lora=lora, with_tokenizer=False)
    rng = np.random.default_rng(0)
    for path, var in nnx.iter_graph(adapted):
        if isinstance(var, LoRAParam) and path[-1] == "lora_b":
            var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape), jnp.float32))
    save_peft_adapter(adapted, tmp_path / "run/adapter", base_model=str(model_dir))
    cfg.adapter = str(tmp_path / "run/adapter")
    cfg.output = str(tmp_path / "on.json")
    on = run(cfg)
    cfg.lora_enabled = False
    cfg.output = str(tmp_path / "off.json")
    off = run(cfg)
    assert on["adapters_on"] and not off["adapters_on"]
    base_lp = [q["logprobs"]["A"] for q in base["questions"]]
    assert np.allclose([q["logprobs"]["A"] for q in off["questions"]], base_lp, atol=1e-6)
    assert not np.allclose([q["logprobs"]["A"] for q in on["questions"]], base_lp, atol=1e-3)

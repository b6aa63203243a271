"""Generation with the KV cache, against transformers' ``generate`` and our own full forward.

* Greedy: SmolLM2-135M-Instruct (float32, unquantized) on three chat prompts of different lengths,
  batched (left-padded) on our side, against transformers' greedy ``generate`` of each prompt
  alone on its own GGUF loading of the same file: the same tokens, the stop token included.
* Cache: logits of every prefill / decode step equal a full forward of the whole sequence.
* Sampling: the top-k / top-p masks against a direct numpy computation of the allowed set;
  top-k=1 (and a tiny top-p) reproduce greedy; streaming yields exactly ``generate``'s draws.
* NF4 + LoRA: adapters switched off give the base model's greedy answer, on the real model.
* Static shapes: prompts of other lengths within a bucket compile nothing new.
"""

from __future__ import annotations

import functools

import _smollm2 as smol
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import require
from flax import nnx

from qlora_jax.cli.generate import main
from qlora_jax.inference.generate import Generator, SamplingParams, bucket_length, sampling_mask
from qlora_jax.lora import LoraConfig, LoRAParam
from qlora_jax.models import CausalLM, ModelConfig

NEW_TOKENS = 16


@functools.cache
def greedy_smol():
    gen = Generator(smol.ours(), smol.tokenizer())
    prompts = [smol.chat_ids(c) for c in smol.CHATS]
    return gen, prompts, gen.generate(prompts, max_new_tokens=NEW_TOKENS)


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]
    with pytest.raises(ValueError, match="empty prompt"):
        bucket_length(0)


def test_greedy_batch_matches_transformers_generate():
    torch = require("torch")
    gen, prompts, ours = greedy_smol()
    assert len({len(p) for p in prompts}) == 3  # really different lengths, left-padded together
    assert gen.stop_token_ids == [0, 2]  # <|endoftext|> and <|im_end|> (= eos)
    reference = smol.transformers_gguf()
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=gen.stop_token_ids,
                                     pad_token_id=gen.pad_token_id)
        expected = out[0, len(prompt):].tolist()
        assert ours.tokens[row] == expected, (row, ours.texts[row])
        stopped = expected[-1] in gen.stop_token_ids
        assert ours.finish_reasons[row] == ("stop" if stopped else "length")
    print("greedy answers:", ours.texts)
    assert ours.texts[0] == "The capital of France is Paris."


def test_cache_logits_equal_full_forward_at_every_step():
    model = smol.ours()
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, cache):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.decode(ids, cache)
        return m.logits_from_hidden(hidden[:, -1]), cache

    prompts = [smol.chat_ids(smol.CHATS[1]), smol.chat_ids(smol.CHATS[2])]
    bucket = bucket_length(max(map(len, prompts)))
    ids = np.full((2, bucket), 2, np.int32)
    start = np.array([bucket - len(p) for p in prompts], np.int32)
    for r, p in enumerate(prompts):
        ids[r, start[r]:] = p
    cache = model.init_cache(2, bucket + 8, start=jnp.asarray(start))
    steps = []  # logits [2, vocab] after the prompt and after each fed token
    logits, cache = run(state, jnp.asarray(ids), cache)
    fed = [[], []]
    for _ in range(6):
        steps.append(np.asarray(logits))
        token = np.argmax(steps[-1], -1).astype(np.int32)
        for r in range(2):
            fed[r].append(int(token[r]))
        logits, cache = run(state, jnp.asarray(token[:, None]), cache)
    steps.append(np.asarray(logits))
    assert int(cache.index) == bucket + 6

    # One full forward of each whole sequence, right-padded to one length (causal: padding on
    # the right changes nothing before it); position p's logits recompute step p from scratch.
    seqs = [p + f for p, f in zip(prompts, fed)]
    full_ids = np.full((2, max(map(len, seqs))), 2, np.int32)
    for r, s in enumerate(seqs):
        full_ids[r, :len(s)] = s
    full = np.asarray(model(jnp.asarray(full_ids)))
    worst = 0.0
    for r, p in enumerate(prompts):
        for i, step in enumerate(steps):
            worst = max(worst, smol.max_abs(step[r], full[r, len(p) - 1 + i]))
    print(f"cached vs full-forward logits: max abs diff {worst:.2e}")
    # Float32 summation order only (the cached step multiplies [1, d] rows, the full forward
    # [seq, d] blocks; SmolLM2's activations reach 2.5e4): measured 5.0e-5 on an AVX512 VM
    # (2026-11-22) and 1.1e-4 on one without AVX512 (2026-11-30), whose matmul kernels differ.
    assert worst <= 2e-4


def _numpy_allowed(logits: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """The allowed set, computed directly: the k best (ties kept), then the most likely of those
    until their renormalized probability reaches top_p."""
    allowed = set(range(len(logits)))
    if top_k > 0:
        kth = np.sort(logits)[::-1][top_k - 1]
        allowed = {i for i in allowed if logits[i] >= kth}
    if top_p < 1.0:
        ids = sorted(allowed, key=lambda i: -logits[i])
        values = np.array([logits[i] for i in ids], np.float64)
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        kept, mass = [], 0.0
        for i, p in zip(ids, probs):
            kept.append(i)
            mass += p
            if mass >= top_p:
                break
        cutoff = logits[kept[-1]]
        allowed = {i for i in allowed if logits[i] >= cutoff}  # ties at the cut-off kept
    return allowed


def test_sampling_masks_match_numpy():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    logits[1, :40] = logits[1, 0]  # a block of ties
    logits[3] = np.round(logits[3])  # many ties
    cases = [(0, 1.0), (1, 1.0), (5, 1.0), (40, 1.0), (0, 0.5), (0, 0.9), (0, 0.999), (7, 0.6), (50, 0.95),
             (300, 0.3), (1000, 1.0)]
    for top_k, top_p in cases:
        mask = np.asarray(jax.jit(sampling_mask)(jnp.asarray(logits), top_k, top_p))
        for r in range(len(logits)):
            got = set(np.flatnonzero(mask[r]).tolist())
            assert got == _numpy_allowed(logits[r], min(top_k, 300), top_p), (top_k, top_p, r)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    gen, prompts, greedy = greedy_smol()
    for params in (SamplingParams(temperature=0.8, top_k=1, seed=3), SamplingParams(temperature=1.3, top_p=1e-6)):
        assert gen.generate(prompts, max_new_tokens=NEW_TOKENS, sampling=params).tokens == greedy.tokens


def test_stream_yields_generate_tokens_and_text():
    gen, prompts, _ = greedy_smol()
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    whole = gen.generate(prompts, max_new_tokens=NEW_TOKENS, sampling=params)
    chunks = list(gen.stream(prompts, max_new_tokens=NEW_TOKENS, sampling=params, chunk=5))
    assert len(chunks[0].tokens[0]) == 1  # the prefill's token comes first, alone
    assert all(chunks[-1].finished) and not any(all(c.finished) for c in chunks[:-1])
    for r in range(len(prompts)):
        assert sum((c.tokens[r] for c in chunks), []) == whole.tokens[r]
        assert "".join(c.texts[r] for c in chunks) == whole.texts[r]
    other = gen.generate(prompts, max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=1.0, seed=8))
    assert other.tokens != whole.tokens  # the seed matters


def _without_adapters(model: CausalLM) -> CausalLM:
    """The same frozen (NF4) weights in a model built without LoRA at all."""
    abstract = nnx.eval_shape(lambda: CausalLM(model.config, quant=model.quant_config, dtype=model.dtype,
                                               param_dtype=model.param_dtype, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), nnx.state(model, nnx.Not(LoRAParam)))


def test_nf4_lora_adapters_off_equal_base_model():
    lora = LoraConfig(r=8, alpha=32.0)
    model = smol.ours("nf4", lora)
    rng = np.random.default_rng(0)
    for path, var in nnx.iter_graph(model):  # non-zero B: the adapters change the answers
        if isinstance(var, LoRAParam) and path[-1] == "lora_b":
            var.set_value(jnp.asarray(0.05 * rng.standard_normal(var.get_value().shape), jnp.float32))
    base = _without_adapters(model)
    assert base.lora_config is None and not nnx.state(base, LoRAParam)
    prompts = [smol.chat_ids(c) for c in smol.CHATS[:2]]
    off = Generator(model, smol.tokenizer()).generate(prompts, lora_enabled=False, max_new_tokens=12)
    reference = Generator(base, smol.tokenizer()).generate(prompts, max_new_tokens=12)
    print("nf4 base:", reference.texts)
    assert off.tokens == reference.tokens
    assert reference.texts[0].startswith("The capital of France is Paris")
    # The adapters are not idle: switched on, they change the next-token distribution.
    ids = jnp.asarray([prompts[0]])
    assert smol.max_abs(model(ids)[0, -1], model(ids, lora_enabled=False)[0, -1]) > 1.0


def test_no_recompilation_within_a_bucket():
    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = CausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    gen = Generator(model, stop_token_ids=[1], pad_token_id=0)
    from qlora_jax.inference import generate as generate_lib

    gen.generate([[5, 6, 7], [8] * 11], max_new_tokens=10)
    sizes = (generate_lib.prefill._cache_size(), generate_lib.decode_steps._cache_size())
    gen.generate([[9] * 16, [3, 4]], max_new_tokens=20)  # same bucket (16), same buffer (32)
    stream = list(gen.stream([[4] * 7, [2] * 9], max_new_tokens=12, chunk=3))  # the same decode loop
    assert sum(len(c.tokens[0]) for c in stream) == 12 or stream[-1].finished[0]
    assert (generate_lib.prefill._cache_size(), generate_lib.decode_steps._cache_size()) == sizes
    gen.generate([[9] * 17, [3]], max_new_tokens=10)  # the next bucket: one new prefill and decode
    assert generate_lib.prefill._cache_size() == sizes[0] + 1


def test_cli_prints_the_answer(monkeypatch, capsys):
    import qlora_jax.cli.generate as generate_lib

    monkeypatch.setattr(generate_lib, "load_for_inference",
                        lambda model, adapter, quantize: (smol.ours(), smol.tokenizer(), "smollm2 f32"))
    texts = main(["--prompt", smol.CHATS[0], "--max-new-tokens", "12", "--quantize", "none"])
    assert texts == ["The capital of France is Paris."]
    assert "The capital of France is Paris." in capsys.readouterr().out
    streamed = main(["--prompt", smol.CHATS[0], "--max-new-tokens", "12", "--stream"])
    assert streamed == texts

"""Mistral, Gemma 2 and Gemma 3 (text) against transformers' PyTorch models.

Each family is a tiny random transformers model (float32, eager attention) with every feature
that sets it apart switched on: a sliding window shorter than the sequence (Mistral on every
layer; Gemma with sliding and global layers interleaved, odd/even and Gemma 3's 2-of-3),
soft-capped attention scores and final logits (Gemma 2), ``query_pre_attn_scalar`` != head_dim,
``(1 + w)`` RMSNorms and sandwich norms with random weights, embedding scaling, Gemma 3's q/k
norms, its local rope base on sliding layers and linear rope scaling on global ones. Every
ablation check asserts that the transformers reference itself moves by far more than the parity
tolerance when that feature is switched off, so a match is not an accident of small weights.

References: transformers' logits (f32 and on bitsandbytes-dequantized NF4 weights), its greedy
``generate`` (KV cache, window shorter than prompt + answer), PEFT's ``PeftModel`` on our
exported adapter, and transformers' own parsing of the full-size configs in
``configs/model_configs``.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import REPO, f32_logits_error, max_abs, require, tensors_of, torch_logits

torch = require("torch")
transformers = require("transformers")

from qlora_jax.errors import ModelFileError  # noqa: E402
from qlora_jax.inference.generate import Generator  # noqa: E402
from qlora_jax.lora import PROJECTION_BLOCK, PROJECTIONS, LoraConfig  # noqa: E402
from qlora_jax.models import ModelConfig, QuantConfig, build_model, iter_hf_tensors, rope_inv_freq  # noqa: E402
from qlora_jax.objectives.logprobs import token_nll  # noqa: E402

VOCAB, HIDDEN, INTER, HEADS, KV_HEADS = 256, 64, 128, 4, 2
PARITY_TOL = 1e-4
SEQ, WINDOW = 16, 5
CONFIG_DIR = REPO / "configs" / "model_configs"
_GEMMA_COMMON = dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW, num_hidden_layers=3)

FAMILIES = {
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", dict(_GEMMA_COMMON, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
                                     attention_bias=True)),  # layer_types default: sliding, full, sliding
    "gemma3_text": ("Gemma3TextConfig", dict(
        _GEMMA_COMMON, final_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}})),
}
# Per family: config changes that switch one distinguishing feature off in the reference.
ABLATIONS = {
    "mistral": {"window": dict(sliding_window=None)},
    "gemma2": {"attn softcap": dict(attn_logit_softcapping=None), "final softcap": dict(final_logit_softcapping=None),
               "window": dict(sliding_window=SEQ), "query scalar": dict(query_pre_attn_scalar=24)},
    "gemma3_text": {"window": dict(sliding_window=SEQ), "final softcap": dict(final_logit_softcapping=None),
                    "local rope": "local_rope", "global rope scaling": "global_rope"},
}


def hf_model(family: str, seed: int = 0, **changes):
    """The tiny transformers model of ``family`` (weights from ``seed``) and its config dict."""
    cls_name, kw = FAMILIES[family]
    kw = dict(kw, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, **changes)
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    offset = 0.0 if family.startswith("gemma") else 1.0  # gemma stores w of (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(offset + 0.2 * torch.randn_like(p))
            else:  # larger than the 0.02 init, so scores reach the soft caps and windows matter
                p.copy_(0.1 * torch.randn_like(p))
    return model, config.to_dict()


def ablated(family: str, name: str):
    """The reference with one feature off and the same weights."""
    change = ABLATIONS[family][name]
    if change == "local_rope":
        rope = copy.deepcopy(FAMILIES[family][1]["rope_parameters"])
        rope["sliding_attention"]["rope_theta"] = rope["full_attention"]["rope_theta"]
        change = dict(rope_parameters=rope)
    elif change == "global_rope":
        rope = copy.deepcopy(FAMILIES[family][1]["rope_parameters"])
        rope["full_attention"] = {"rope_type": "default", "rope_theta": 10000.0}
        change = dict(rope_parameters=rope)
    model, _ = hf_model(family, **change)
    model.load_state_dict(REFS[family][0].state_dict())
    return model


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
# The f32 tests all pass segment ids (one segment per row here, two in the packed test), so the
# forward compiles once per family for them (compiles dominate this file's time).
ONE_SEGMENT = np.ones_like(IDS)
REFS = {family: hf_model(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def f32_models():
    return {family: build_model(cfg, tensors_of(model), dtype=jnp.float32) for family, (model, cfg) in REFS.items()}


# ---------------------------------------------------------------------------------------------
# f32 parity

@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_logits_match_transformers(family, f32_models):
    reference, _ = REFS[family]
    model = f32_models[family]
    c = model.config
    assert c.model_type == family and c.sliding_window == WINDOW < SEQ
    if family != "mistral":
        assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
        assert c.embed_scale and c.norm_plus_one and c.sandwich_norms and c.hidden_act == "gelu_pytorch_tanh"
    err, ref = f32_logits_error(model, reference, IDS, ONE_SEGMENT, family)
    assert err <= PARITY_TOL
    for name in ABLATIONS[family]:  # each feature really moves the reference
        moved = max_abs(torch_logits(ablated(family, name), IDS), ref)
        print(f"  without {name}: reference moves {moved:.2e}")
        assert moved > 100 * PARITY_TOL, name


def test_gemma3_rope_tables_match_transformers():
    model, cfg = REFS["gemma3_text"]
    ours = ModelConfig.from_hf(cfg)
    rotary = model.model.rotary_emb
    np.testing.assert_allclose(rope_inv_freq(ours), rotary.full_attention_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(ours, local=True), rotary.sliding_attention_inv_freq.numpy(), rtol=1e-6)


def test_packed_sequences_with_window_match_separate_passes(f32_models):
    """Segments restart positions and windows: each packed sequence equals its own HF pass."""
    reference, _ = REFS["gemma2"]
    model = f32_models["gemma2"]
    a, b = IDS[0, :7], IDS[1, :9]  # both longer than the window
    packed = IDS.copy()
    packed[0] = np.concatenate([a, b])
    segment_ids = ONE_SEGMENT.copy()
    segment_ids[0, 7:] = 2
    hidden = model.hidden_states(jnp.asarray(packed), segment_ids=jnp.asarray(segment_ids))
    logits = np.asarray(model.logits_from_hidden(hidden))
    err = max(max_abs(logits[0, :7], torch_logits(reference, a[None])[0]),
              max_abs(logits[0, 7:], torch_logits(reference, b[None])[0]))
    assert err <= PARITY_TOL


def test_chunked_loss_and_logits_from_hidden_apply_the_final_softcap(f32_models):
    """The losses' chunked head and ``logits_from_hidden`` = transformers' capped log-softmax."""
    model = f32_models["gemma2"]
    reference, _ = REFS["gemma2"]
    ref_logp = torch.log_softmax(torch.as_tensor(torch_logits(reference, IDS)), -1).numpy()
    hidden = model.hidden_states(jnp.asarray(IDS), segment_ids=jnp.asarray(ONE_SEGMENT))
    np.testing.assert_allclose(model.logits_from_hidden(hidden), torch_logits(reference, IDS), atol=PARITY_TOL, rtol=0)
    targets = np.roll(IDS, -1, axis=1)
    nll = token_nll(hidden, model.lm_head_weight(), jnp.asarray(targets), chunk_size=8,
                    logit_soft_cap=model.config.final_logit_softcap)
    want = -np.take_along_axis(ref_logp, targets[..., None], -1)[..., 0]
    assert max_abs(nll, want) <= PARITY_TOL
    # Its custom VJP (the soft cap's 1 - tanh^2 folded in) against torch autograd of the same loss.
    w = model.lm_head_weight()
    grad = jax.grad(lambda h: jnp.sum(token_nll(h, w, jnp.asarray(targets), chunk_size=8,
                                                 logit_soft_cap=model.config.final_logit_softcap)))(hidden)
    h_t = torch.tensor(np.asarray(hidden), requires_grad=True)
    cap = model.config.final_logit_softcap
    logits_t = cap * torch.tanh(h_t @ torch.as_tensor(np.asarray(w)).T / cap)
    loss_t = -torch.log_softmax(logits_t, -1).gather(-1, torch.as_tensor(targets, dtype=torch.long)[..., None]).sum()
    loss_t.backward()
    assert max_abs(grad, h_t.grad.numpy()) <= 1e-5


# ---------------------------------------------------------------------------------------------
# NF4 loading

def _linear_names(num_layers: int):
    for i in range(num_layers):
        for proj in PROJECTIONS:
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            yield f"model.layers.{i}.{block}.{proj}.weight"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nf4_logits_match_transformers_on_dequantized_weights(family):
    """The NF4 loading paths, each against transformers on the very weights it dequantizes to:
    bitsandbytes' own NF4+DQ states loaded as ``Quant4bit`` (reference: bnb's dequantize), and
    (Gemma 3) float weights quantized here (reference: our dequantized weights, ``iter_hf_tensors``)."""
    from test_models import _bnb_roundtrip

    reference, cfg = REFS[family]
    quant = QuantConfig("nf4", 64, True)
    bnb_ref = copy.deepcopy(reference)
    prequantized = dict(tensors_of(reference))
    state = bnb_ref.state_dict()
    with torch.no_grad():
        for name in _linear_names(cfg["num_hidden_layers"]):
            dequant, prequantized[name] = _bnb_roundtrip(state[name])
            state[name].copy_(dequant)
    from_bnb = build_model(cfg, list(prequantized.items()), quant=quant, dtype=jnp.float32)
    ids = jnp.asarray(IDS)
    err_bnb = max_abs(from_bnb(ids), torch_logits(bnb_ref, IDS))
    quant_effect = max_abs(torch_logits(bnb_ref, IDS), torch_logits(reference, IDS))
    print(f"{family}: NF4 from bnb states {err_bnb:.2e} (NF4 effect {quant_effect:.2e})")
    assert err_bnb <= PARITY_TOL
    assert quant_effect > 100 * PARITY_TOL  # the reference is really quantized
    if family == "gemma3_text":  # float weights quantized here (one family: the path is shared)
        ours = build_model(cfg, tensors_of(reference), quant=quant, dtype=jnp.float32)
        ours_ref = copy.deepcopy(reference)
        ours_ref.load_state_dict({k: torch.as_tensor(v) for k, v in iter_hf_tensors(ours)}, strict=False)
        err_ours = max_abs(ours(ids), torch_logits(ours_ref, IDS))
        print(f"{family}: NF4 quantized here {err_ours:.2e}")
        assert err_ours <= PARITY_TOL
        assert max_abs(torch_logits(ours_ref, IDS), torch_logits(reference, IDS)) > 100 * PARITY_TOL


# ---------------------------------------------------------------------------------------------
# KV-cache generation with a window shorter than the sequence

@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_greedy_generate_matches_transformers(family, f32_models):
    reference, cfg = REFS[family]
    prompts = [IDS[0, :9].tolist(), IDS[1, :4].tolist()]  # left-padded together; 9 > window
    eos = int(cfg["eos_token_id"])
    new = 6
    gen = Generator(f32_models[family], None, stop_token_ids=[eos], pad_token_id=0)
    ours = gen.generate(prompts, max_new_tokens=new)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=new, do_sample=False, eos_token_id=[eos], pad_token_id=0)
        assert ours.tokens[row] == out[0, len(prompt):].tolist(), row
    assert len(prompts[0]) + new > 2 * WINDOW


# ---------------------------------------------------------------------------------------------
# LoRA targets and PEFT export

def test_peft_export_of_gemma3_loads_in_peft(tmp_path):
    peft = require("peft")
    from qlora_jax.checkpoints.peft_io import save_peft_adapter

    reference, cfg = REFS["gemma3_text"]
    model = build_model(cfg, tensors_of(reference), lora=LoraConfig(r=4, alpha=8.0, targets="all-linear"),
                        dtype=jnp.float32)
    rng = np.random.default_rng(1)
    for view in model.iter_linears():
        if view.adapted and view.layer == 0:
            b = view.linear.lora_b.get_value()
            view.linear.lora_b.set_value(jnp.asarray(rng.normal(0.0, 0.05, b.shape), b.dtype))
    out = save_peft_adapter(model, tmp_path / "adapter")
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == sorted(PROJECTIONS)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(reference), out).eval()
    ours = model(jnp.asarray(IDS))
    moved = max_abs(ours, torch_logits(reference, IDS))
    err = max_abs(ours, torch_logits(peft_model, IDS))
    print(f"gemma3 PEFT: {err:.2e} (adapters move logits {moved:.2e})")
    assert err <= PARITY_TOL and moved > 100 * PARITY_TOL


# ---------------------------------------------------------------------------------------------
# Full-size configs and inspect

@pytest.mark.parametrize("path", sorted(glob.glob(str(CONFIG_DIR / "*.json"))), ids=os.path.basename)
def test_full_size_config_matches_transformers(path):
    raw = json.load(open(path))
    cfg = ModelConfig.from_hf(path)
    hf_cfg = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    layers = hf.model.layers
    assert cfg.num_hidden_layers == len(layers)
    assert cfg.tie_word_embeddings == bool(hf_cfg.tie_word_embeddings)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", None)
        if cfg.model_type in ("mistral", "phi3"):  # both attentions pass config.sliding_window
            window = hf_cfg.sliding_window
        assert (cfg.sliding_window if cfg.sliding_layers[i] else None) == window, i
        assert cfg.attention_scale == pytest.approx(attn.scaling), i
        assert cfg.attn_logit_softcap == (getattr(attn, "attn_logit_softcapping", None)
                                          if cfg.model_type == "gemma2" else None)
    for name, (out_f, in_f) in cfg.linear_shapes().items():
        block = getattr(layers[0], PROJECTION_BLOCK[name])
        assert tuple(getattr(block, name).weight.shape) == (out_f, in_f), name
    assert cfg.final_logit_softcap == getattr(hf_cfg, "final_logit_softcapping", None)
    assert cfg.qk_norm == hasattr(layers[0].self_attn, "q_norm")
    assert cfg.sandwich_norms == hasattr(layers[0], "pre_feedforward_layernorm")
    n_params = sum(p.numel() for p in hf.parameters())  # tied: counted once by torch
    from qlora_jax.models.params import count_params
    assert count_params(cfg).total == n_params
    rotary = hf.model.rotary_emb
    if cfg.model_type == "gemma3_text":
        for local, name in ((False, "full_attention"), (True, "sliding_attention")):
            fn = rotary.compute_default_rope_parameters
            rope_type = hf_cfg.rope_parameters[name]["rope_type"]
            if rope_type != "default":
                fn = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]
            ref, _ = fn(hf_cfg, "cpu", layer_type=name)
            np.testing.assert_allclose(rope_inv_freq(cfg, local=local), ref.numpy(), rtol=1e-6)
    else:
        ref, _ = rotary.compute_default_rope_parameters(hf_cfg)
        np.testing.assert_allclose(rope_inv_freq(cfg), ref.numpy(), rtol=1e-6)


def test_inspect_covers_each_family():
    from qlora_jax.models.params import count_params

    for path in sorted(glob.glob(str(CONFIG_DIR / "*.json"))):
        out = subprocess.run([sys.executable, "-m", "qlora_jax.inspect", "--config", "configs/sft.py",
                              f"--config.model.source={path}", "--config.lora.r=16",
                              "--config.lora.targets=all-linear"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        cfg = ModelConfig.from_hf(path)
        counts = count_params(cfg, LoraConfig(r=16, targets="all-linear"))
        shapes = cfg.linear_shapes().values()
        assert counts.trainable == cfg.num_hidden_layers * 16 * sum(o + i for o, i in shapes)
        assert f"trainable (LoRA)   {counts.trainable:,}" in out.stdout, out.stdout
        assert f"total params       {counts.total:,}" in out.stdout


def test_config_errors_name_the_key():
    _, cfg = REFS["gemma2"]
    with pytest.raises(ModelFileError, match="layer_types"):
        ModelConfig.from_hf(dict(cfg, layer_types=["sliding_attention", "chunked_attention", "full_attention"]))
    with pytest.raises(ModelFileError, match="layer_types"):
        ModelConfig.from_hf(dict(cfg, layer_types=["full_attention"]))
    with pytest.raises(ModelFileError, match="sliding_window"):
        ModelConfig.from_hf(dict(cfg, sliding_window="4096"))
    with pytest.raises(ModelFileError, match="use_bidirectional_attention"):
        ModelConfig.from_hf(dict(cfg, use_bidirectional_attention=True))
    with pytest.raises(ModelFileError, match="hidden_act"):
        ModelConfig.from_hf(dict(cfg, hidden_activation="relu"))
    raw = json.load(open(CONFIG_DIR / "gemma-3-4b-text.json"))
    with pytest.raises(ModelFileError, match="sliding_window_pattern"):
        ModelConfig.from_hf(dict(raw, sliding_window_pattern=0))
    with pytest.raises(ModelFileError, match="rope_scaling.rope_type"):
        ModelConfig.from_hf(dict(raw, rope_scaling={"rope_type": "yarn", "factor": 8.0}))

"""Phi-3 against transformers' ``Phi3ForCausalLM``, bitsandbytes and peft.

The tiny random model has every feature that sets Phi-3 apart switched on: the fused
``qkv_proj`` (with grouped KV heads, so q, k and v have different widths) and ``gate_up_proj``,
a ``partial_rotary_factor`` of 0.5 (Phi-4-mini's mechanism: rope on the first half of each head
only) and a sliding window shorter than the sequence. The ablation check asserts that the
reference moves by far more than the parity tolerance when the window or the partial rotary is
switched off, so a match is not an accident.

References: transformers' logits (f32, and on bitsandbytes-dequantized NF4 weights), bitsandbytes'
packed bytes of the fused weights, transformers' greedy ``generate``, peft's ``PeftModel`` on our
exported adapter (logits and autograd gradients), peft's own ``all-linear`` target resolution, and
transformers' parameter count of the full-size Phi-3-mini config.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import REPO, f32_logits_error, max_abs, randomize_, require, tensors_of, torch_logits
from flax import nnx

torch = require("torch")
transformers = require("transformers")

from qlora_jax.errors import ModelFileError  # noqa: E402
from qlora_jax.inference.generate import Generator  # noqa: E402
from qlora_jax.lora import PROJECTION_BLOCK, LoraConfig, LoRAParam, LoraTargetError  # noqa: E402
from qlora_jax.models import CausalLM, ModelConfig, QuantConfig, build_model, rope_inv_freq  # noqa: E402
from qlora_jax.models.params import count_params  # noqa: E402
from qlora_jax.quant import dequantize_4bit  # noqa: E402

VOCAB, HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 64, 96, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
PARITY_TOL = 1e-4
SEQ, WINDOW, PARTIAL = 16, 5, 0.5
PHI3_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
FULL_CONFIG = REPO / "configs" / "model_configs" / "phi-3-mini-4k-instruct.json"


def hf_model(seed: int = 0, **changes):
    """The tiny transformers Phi-3 (weights from ``seed``) and its config dict."""
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
              sliding_window=WINDOW, max_position_embeddings=64, original_max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": PARTIAL})
    kw.update(changes)
    config = transformers.Phi3Config(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_(model)
    return model, config.to_dict()


IDS = np.random.default_rng(0).integers(3, VOCAB, (2, SEQ)).astype(np.int32)
ONE_SEGMENT = np.ones_like(IDS)
REFERENCE, CFG = hf_model()


@pytest.fixture(scope="module")
def f32_model():
    return build_model(CFG, tensors_of(REFERENCE), dtype=jnp.float32)


def _with_weights(model):
    model.load_state_dict(REFERENCE.state_dict())
    return model


# ---------------------------------------------------------------------------------------------
# Config and f32 parity

def test_config_parses_the_phi3_features(f32_model):
    c = f32_model.config
    assert c.model_type == "phi3" and c.fused_projections
    assert c.projections == PHI3_LINEARS
    assert c.sliding_window == WINDOW < SEQ and all(c.sliding_layers)
    assert c.rotary_dim == int(HEAD_DIM * PARTIAL) == 8
    assert c.linear_shapes()["qkv_proj"] == ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
    assert c.linear_shapes()["gate_up_proj"] == (2 * INTER, HIDDEN)
    # The rope table is transformers' (partial rotary: frequencies of a rotary_dim-wide head).
    np.testing.assert_allclose(rope_inv_freq(c), REFERENCE.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    # Older files spell the factor at the top level (transformers reads it there too).
    raw = {k: v for k, v in CFG.items() if k != "rope_parameters"}
    old = ModelConfig.from_hf(dict(raw, rope_theta=10000.0, partial_rotary_factor=0.75))
    assert old.rotary_dim == 12 and old.rope_scaling is None
    assert ModelConfig.from_hf(dict(raw, sliding_window=None)).sliding_layers == (False,) * LAYERS


def test_f32_logits_match_transformers(f32_model):
    err, ref = f32_logits_error(f32_model, REFERENCE, IDS, ONE_SEGMENT, "phi3")
    assert err <= PARITY_TOL
    assert max_abs(f32_model(jnp.asarray(IDS)), ref) <= PARITY_TOL  # the unpacked path too
    ablations = {"window": dict(sliding_window=None),
                 "partial rotary": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 1.0})}
    for name, change in ablations.items():  # each feature really moves the reference
        moved = max_abs(torch_logits(_with_weights(hf_model(**change)[0]), IDS), ref)
        print(f"  without {name}: reference moves {moved:.2e}")
        assert moved > 100 * PARITY_TOL, name


def test_config_errors_name_the_key():
    with pytest.raises(ModelFileError, match="rope_scaling.rope_type' = 'longrope'"):
        ModelConfig.from_hf(dict(json.load(open(FULL_CONFIG)), rope_scaling={
            "type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}))
    with pytest.raises(ModelFileError, match="'rope_scaling' for phi3"):
        ModelConfig.from_hf(dict(json.load(open(FULL_CONFIG)), rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ModelFileError, match="partial_rotary_factor"):
        ModelConfig.from_hf(dict(json.load(open(FULL_CONFIG)), partial_rotary_factor="half"))
    with pytest.raises(ModelFileError, match="partial_rotary_factor"):
        ModelConfig.from_hf(dict(json.load(open(FULL_CONFIG)), partial_rotary_factor=0.01))  # 0 rotary dims


# ---------------------------------------------------------------------------------------------
# NF4: the fused weights quantized as one matrix each, as bitsandbytes does

def _linear_names():
    for i in range(LAYERS):
        for proj in PHI3_LINEARS:
            yield f"model.layers.{i}.{PROJECTION_BLOCK[proj]}.{proj}.weight"


def test_nf4_fused_weights_match_bitsandbytes():
    """Float weights quantized here: the fused ``qkv_proj`` / ``gate_up_proj`` codes are
    bitsandbytes' bytes for the whole fused matrix, and the logits are transformers' on the
    weights we dequantize to. bitsandbytes' own NF4+DQ states load too (reference: its dequantize)."""
    from test_models import _bnb_roundtrip

    bnbF = require("bitsandbytes.functional")
    quant = QuantConfig("nf4", 64, True)
    ours = build_model(CFG, tensors_of(REFERENCE), quant=quant, dtype=jnp.float32)
    state = REFERENCE.state_dict()
    for layer in range(LAYERS):
        for proj in ("qkv_proj", "gate_up_proj"):
            w = state[f"model.layers.{layer}.{PROJECTION_BLOCK[proj]}.{proj}.weight"]
            packed, _ = bnbF.quantize_4bit(w.reshape(-1).contiguous(), blocksize=64, quant_type="nf4",
                                           compress_statistics=True)
            linear = getattr(getattr(ours.layers, PROJECTION_BLOCK[proj]), proj)
            q = linear.weight.get_value()
            assert q.shape == tuple(w.shape)
            mine = np.asarray(q.packed[layer]).reshape(-1)
            np.testing.assert_array_equal(mine, packed.numpy().reshape(-1), err_msg=f"{proj} layer {layer}")
    ids = jnp.asarray(IDS)
    ours_ref = copy.deepcopy(REFERENCE)
    dequantize = jax.jit(lambda q: dequantize_4bit(q, jnp.float32))  # eager dispatch would take seconds
    dequantized = {f"{v.hf_name}.weight": torch.as_tensor(np.array(
        dequantize(jax.tree.map(lambda a, i=v.layer: a[i], v.linear.weight.get_value())))) for v in ours.iter_linears()}
    ours_ref.load_state_dict(dequantized, strict=False)
    err_ours = max_abs(ours(ids), torch_logits(ours_ref, IDS))
    quant_effect = max_abs(torch_logits(ours_ref, IDS), torch_logits(REFERENCE, IDS))

    bnb_ref = copy.deepcopy(REFERENCE)
    prequantized = dict(tensors_of(REFERENCE))
    bnb_state = bnb_ref.state_dict()
    with torch.no_grad():
        for name in _linear_names():
            dequant, prequantized[name] = _bnb_roundtrip(bnb_state[name])
            bnb_state[name].copy_(dequant)
    from_bnb = build_model(CFG, list(prequantized.items()), quant=quant, dtype=jnp.float32)
    err_bnb = max_abs(from_bnb(ids), torch_logits(bnb_ref, IDS))
    print(f"phi3: NF4 quantized here {err_ours:.2e}, from bnb states {err_bnb:.2e} (NF4 effect {quant_effect:.2e})")
    assert max(err_ours, err_bnb) <= PARITY_TOL
    assert quant_effect > 100 * PARITY_TOL  # the reference is really quantized


# ---------------------------------------------------------------------------------------------
# KV-cache generation: partial rotary on cached keys, window shorter than prompt + answer

def test_greedy_generate_matches_transformers(f32_model):
    prompts = [IDS[0, :9].tolist(), IDS[1, :4].tolist()]  # left-padded together; 9 > window
    eos = int(CFG["eos_token_id"])
    new = 6
    gen = Generator(f32_model, None, stop_token_ids=[eos], pad_token_id=0)
    ours = gen.generate(prompts, max_new_tokens=new)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = REFERENCE.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=new, do_sample=False, eos_token_id=[eos], pad_token_id=0)
        assert ours.tokens[row] == out[0, len(prompt):].tolist(), row
    assert len(prompts[0]) + new > 2 * WINDOW


# ---------------------------------------------------------------------------------------------
# LoRA on the fused linears: peft's targets, PEFT export, gradients

@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """Our LoRA model ("all-linear", random non-zero B), its PEFT export and peft's model loaded from it."""
    peft = require("peft")
    from qlora_jax.checkpoints.peft_io import save_peft_adapter

    model = build_model(CFG, tensors_of(REFERENCE), lora=LoraConfig(r=4, alpha=8.0, targets="all-linear"),
                        dtype=jnp.float32)
    rng = np.random.default_rng(1)
    for view in model.iter_linears():
        if view.layer == 0:  # one write per stacked linear: every layer's B
            b = view.linear.lora_b.get_value()
            view.linear.lora_b.set_value(jnp.asarray(rng.normal(0.0, 0.05, b.shape), b.dtype))
    out = save_peft_adapter(model, tmp_path_factory.mktemp("phi3") / "adapter")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(REFERENCE), out, is_trainable=True).eval()
    return model, out, peft_model


def test_lora_targets_are_peft_names():
    peft = require("peft")
    n = LAYERS
    ours = LoraConfig(r=4, targets="all-linear").targeted_modules(n, PHI3_LINEARS)
    assert ours == [f"layers.{i}.{PROJECTION_BLOCK[p]}.{p}" for i in range(n) for p in PHI3_LINEARS]
    # peft resolves "all-linear" on transformers' Phi-3 to the same modules.
    reference = peft.get_peft_model(copy.deepcopy(REFERENCE), peft.LoraConfig(r=4, target_modules="all-linear"))
    theirs = sorted({n.split("base_model.model.model.", 1)[1].rsplit(".lora_", 1)[0]
                     for n, _ in reference.named_parameters() if ".lora_A." in n})
    assert theirs == sorted(ours)
    assert {t.rsplit(".", 1)[-1] for t in reference.peft_config["default"].target_modules} == set(PHI3_LINEARS)
    with pytest.raises(LoraTargetError, match="'q_proj' matches no linear.*valid names: 'all-linear', qkv_proj"):
        build_model(CFG, tensors_of(REFERENCE), lora=LoraConfig(targets=("q_proj",)), dtype=jnp.float32)
    # A subset by peft's names: one fused adapter per targeted linear.
    model = nnx.eval_shape(lambda: CausalLM(ModelConfig.from_hf(CFG), dtype=jnp.float32, rngs=nnx.Rngs(0),
                                            lora=LoraConfig(r=4, targets=("qkv_proj", "gate_up_proj"))))
    adapted = {v.proj for v in model.iter_linears() if v.adapted}
    assert adapted == {"qkv_proj", "gate_up_proj"}
    lora_a = model.layers.self_attn.qkv_proj.lora_a.get_value()
    lora_b = model.layers.mlp.gate_up_proj.lora_b.get_value()
    assert lora_a.shape == (LAYERS, 4, HIDDEN) and lora_b.shape == (LAYERS, 2 * INTER, 4)


def test_peft_export_loads_in_peft_with_our_logits(adapted):
    model, out, peft_model = adapted
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == sorted(PHI3_LINEARS)
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    qkv_b = tensors["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"]
    assert qkv_b.shape == ((HEADS + 2 * KV_HEADS) * HEAD_DIM, 4) and len(tensors) == 2 * LAYERS * 4
    ours = model(jnp.asarray(IDS))
    moved = max_abs(ours, torch_logits(REFERENCE, IDS))
    err = max_abs(ours, torch_logits(peft_model, IDS))
    print(f"phi3 PEFT: {err:.2e} (adapters move logits {moved:.2e})")
    assert err <= PARITY_TOL and moved > 100 * PARITY_TOL


def test_lora_gradients_match_peft_autograd(adapted):
    model, _, peft_model = adapted
    weights = np.random.default_rng(5).normal(size=IDS.shape + (VOCAB,)).astype(np.float32)
    graphdef, lora_state, rest = nnx.split(model, LoRAParam, ...)

    def loss(lora_state):
        return jnp.sum(nnx.merge(graphdef, lora_state, rest)(jnp.asarray(IDS)) * weights)

    flat = dict(nnx.to_flat_state(jax.grad(loss)(lora_state)))
    peft_model.zero_grad()
    (peft_model(torch.as_tensor(IDS)).logits * torch.as_tensor(weights)).sum().backward()
    torch_grads = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(torch_grads) == 2 * LAYERS * len(PHI3_LINEARS) == len(flat) * LAYERS
    worst = 0.0
    for view in model.iter_linears():
        for ours_name, peft_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            g = np.asarray(flat[("layers", PROJECTION_BLOCK[view.proj], view.proj, ours_name)].get_value()[view.layer])
            ref = torch_grads[f"base_model.model.{view.hf_name}.{peft_name}.default.weight"]
            chex.assert_shape(g, ref.shape)
            worst = max(worst, float(np.abs(g - ref).max() / np.abs(ref).max()))
    print(f"phi3 LoRA gradients vs peft autograd, max |diff| / max |grad|: {worst:.2e}")
    assert worst <= 1e-4


# ---------------------------------------------------------------------------------------------
# Full-size config and inspect

def test_full_size_config_matches_transformers():
    peft = require("peft")
    raw = json.load(open(FULL_CONFIG))
    cfg = ModelConfig.from_hf(FULL_CONFIG)
    hf_cfg = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (3072, 8192, 32, 32064)
    assert cfg.num_hidden_layers == len(hf.model.layers) and not cfg.tie_word_embeddings
    assert cfg.sliding_window == hf_cfg.sliding_window == 2047 and all(cfg.sliding_layers)
    attn = hf.model.layers[0].self_attn
    assert cfg.attention_scale == pytest.approx(attn.scaling)
    for name, shape in cfg.linear_shapes().items():
        block = getattr(hf.model.layers[0], PROJECTION_BLOCK[name])
        assert tuple(getattr(block, name).weight.shape) == shape, name
    n_params = sum(p.numel() for p in hf.parameters())
    assert count_params(cfg).total == n_params == 3_821_079_552
    ref, _ = hf.model.rotary_emb.compute_default_rope_parameters(hf_cfg)
    np.testing.assert_allclose(rope_inv_freq(cfg), ref.numpy(), rtol=1e-6)
    # Trainable count of r=16 "all-linear" = peft's on transformers' model.
    lora = LoraConfig(r=16, targets="all-linear")
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert count_params(cfg, lora).trainable == trainable


def test_inspect_reports_phi3():
    out = subprocess.run([sys.executable, "-m", "qlora_jax.inspect", "--config", "configs/sft.py",
                          f"--config.model.source={FULL_CONFIG}", "--config.lora.r=16",
                          "--config.lora.targets=all-linear"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = count_params(ModelConfig.from_hf(FULL_CONFIG), LoraConfig(r=16, targets="all-linear"))
    assert "(phi3, 32 layers, hidden 3072, heads 32/32)" in out.stdout, out.stdout
    assert f"trainable (LoRA)   {counts.trainable:,}" in out.stdout, out.stdout
    assert f"total params       {counts.total:,}" in out.stdout

"""LoRA: the adapted linear, PEFT parity (outputs, gradients, merges, counts), init, targets,
the trainable filter and dropout.

References: numpy for the single linear; PEFT 0.21 on tiny transformers models for whole-model
outputs, gradients, merged weights and trainable-parameter counts; a meta-device LLaMA-3.1-8B
(transformers + PEFT, no weights) for the headline parameter counts.
"""

from __future__ import annotations

import copy
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import SHARED, require
from flax import nnx

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

from test_models import (  # noqa: E402
    LAYERS,
    PARITY_TOL,
    _bnb_roundtrip,
    _linear_name,
    hf_tensors,
    max_abs,
    random_ids,
    tiny_hf,
    torch_logits,
)

from qlora_jax.lora import (  # noqa: E402
    PROJECTIONS,
    LoraConfig,
    LoRAParam,
    init_adapters,
    merge_lora,
    peft_adapter_tensors,
    trainable_state,
)
from qlora_jax.models import (  # noqa: E402
    BaseParam,
    CausalLM,
    ModelConfig,
    QLoRALinear,
    QuantConfig,
    QuantParam,
    build_model,
    iter_hf_tensors,
)
from qlora_jax.models.params import count_params  # noqa: E402

LLAMA_8B = SHARED / "model_configs/llama-3.1-8b-instruct.json"


def randomize_adapters(model, seed: int = 0, std: float = 0.05) -> None:
    """Nonzero A and B everywhere (s * B A about the size of W), so every adapter term shows."""
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(p for p in nnx.iter_graph(model) if isinstance(p[1], LoRAParam)):
        value = var.get_value()
        var.set_value(std * jax.random.normal(jax.random.fold_in(key, i), value.shape, value.dtype))


def peft_model_like(hf_model, lora: LoraConfig, ours=None, target_modules=None):
    """A PEFT model on a copy of ``hf_model`` with our adapters (if ``ours``) copied in."""
    targets = target_modules or (list(lora.targets) if isinstance(lora.targets, tuple) else lora.targets)
    cfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets,
                          use_rslora=lora.use_rslora, init_lora_weights=True)
    model = peft.get_peft_model(copy.deepcopy(hf_model), cfg).eval()
    if ours is not None:
        tensors = {k: torch.as_tensor(v) for k, v in peft_adapter_tensors(ours).items()}
        result = peft.set_peft_model_state_dict(model, tensors)
        assert not result.unexpected_keys
        peft_keys = {k for k in model.state_dict() if "lora_" in k}
        assert len(peft_keys) == len(tensors)  # every PEFT adapter received a value
    return model


# ---------------------------------------------------------------------------------------------
# The adapted linear

@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_matches_numpy(use_rslora):
    in_f, out_f, r, alpha = 64, 48, 4, 12.0
    lora = LoraConfig(r=r, alpha=alpha, use_rslora=use_rslora)
    linear = QLoRALinear(in_f, out_f, use_bias=True, lora=lora, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    w, bias = rng.normal(size=(out_f, in_f)).astype(np.float32), rng.normal(size=out_f).astype(np.float32)
    a, b = rng.normal(size=(r, in_f)).astype(np.float32), rng.normal(size=(out_f, r)).astype(np.float32)
    for var, value in ((linear.weight, w), (linear.bias, bias), (linear.lora_a, a), (linear.lora_b, b)):
        var.set_value(jnp.asarray(value))
    x = rng.normal(size=(2, 3, in_f)).astype(np.float32)
    s = alpha / (math.sqrt(r) if use_rslora else r)
    xd = x.astype(np.float64)
    want = xd @ w.T + bias + s * (xd @ a.T) @ b.T
    got = linear(jnp.asarray(x))
    chex.assert_shape(got, (2, 3, out_f))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(linear(jnp.asarray(x), lora_enabled=False), xd @ w.T + bias, rtol=1e-5, atol=1e-4)
    assert linear.scale == pytest.approx(s)


def test_linear_dropout_is_unbiased_and_inverted():
    in_f, out_f, rate = 32, 16, 0.25
    linear = QLoRALinear(in_f, out_f, lora=LoraConfig(r=4, dropout=rate), rngs=nnx.Rngs(0))
    linear.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(1), (out_f, 4)))
    x = jax.random.normal(jax.random.key(2), (1, in_f))
    base = linear(x, lora_enabled=False)
    full = linear(x) - base
    keys = jax.random.split(jax.random.key(3), 4000)
    deltas = jax.vmap(lambda k: linear(x, dropout_key=k) - base)(keys)
    assert max_abs(deltas[0], full) > 1e-3  # dropout does something
    # E[dropout(x)] = x, so the mean adapter output converges to the undropped one.
    np.testing.assert_allclose(deltas.mean(0), full, atol=4 * float(deltas.std(0).max()) / math.sqrt(len(keys)))


# ---------------------------------------------------------------------------------------------
# Whole model against PEFT

PEFT_CASES = [("llama3-rope", None, False, "peft"), ("qwen2", None, True, "gaussian"),
              ("qwen3", "nf4", False, "peft")]


@pytest.mark.parametrize("family,quant,use_rslora,init", PEFT_CASES)
def test_adapted_model_matches_peft(family, quant, use_rslora, init):
    """At init the output is the base model's; with random nonzero adapters it equals PEFT's,
    and with adapters off it equals the base model again.

    With ``quant="nf4"`` the reference base is transformers with every decoder linear replaced by
    its bitsandbytes NF4 round trip, i.e. QLoRA as PEFT + bitsandbytes computes it.
    """
    hf_model, hf_cfg = tiny_hf(family)
    lora = LoraConfig(r=4, alpha=16.0, targets="all-linear", use_rslora=use_rslora, init=init)
    tensors = dict(hf_tensors(hf_model))
    base = copy.deepcopy(hf_model)
    if quant:  # both sides use bitsandbytes' quant states: ours loads them pre-quantized
        state = base.state_dict()
        with torch.no_grad():
            for i in range(LAYERS):
                for proj in PROJECTIONS:
                    name = _linear_name(i, proj)
                    dequant, tensors[name] = _bnb_roundtrip(state[name])
                    state[name].copy_(dequant)
    model = build_model(hf_cfg, list(tensors.items()), quant=QuantConfig() if quant else None, lora=lora,
                        dtype=jnp.float32)
    ids = random_ids(2, 24)
    err_init = max_abs(model(jnp.asarray(ids)), torch_logits(base, ids))  # B = 0 at init
    randomize_adapters(model)
    reference = peft_model_like(base, lora, ours=model)
    err = max_abs(model(jnp.asarray(ids)), torch_logits(reference, ids))
    err_off = max_abs(model(jnp.asarray(ids), lora_enabled=False), torch_logits(base, ids))
    with reference.disable_adapter():
        err_peft_off = max_abs(model(jnp.asarray(ids), lora_enabled=False), torch_logits(reference, ids))
    print(f"{family} quant={quant} rslora={use_rslora}: init {err_init:.2e}, adapted {err:.2e}, "
          f"adapters off {err_off:.2e}")
    assert max(err_init, err, err_off, err_peft_off) <= PARITY_TOL
    assert max_abs(model(jnp.asarray(ids)), model(jnp.asarray(ids), lora_enabled=False)) > 100 * PARITY_TOL


def test_gradients_match_peft_and_select_only_adapters():
    hf_model, hf_cfg = tiny_hf("llama3-rope")
    lora = LoraConfig(r=4, alpha=8.0)
    model = build_model(hf_cfg, hf_tensors(hf_model), lora=lora, dtype=jnp.float32)
    randomize_adapters(model)
    reference = peft_model_like(hf_model, lora, ours=model)
    ids = random_ids(2, 12)
    weights = np.random.default_rng(5).normal(size=(2, 12, hf_cfg["vocab_size"])).astype(np.float32)

    def loss(m):
        return jnp.sum(m(jnp.asarray(ids)) * weights)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)
    flat = dict(nnx.to_flat_state(grads))
    # Exactly the adapter leaves, nothing frozen.
    assert set(flat) == set(dict(nnx.to_flat_state(trainable_state(model))))
    assert all(isinstance(v, LoRAParam) for v in flat.values())
    reference.zero_grad()
    (reference(torch.as_tensor(ids)).logits * torch.as_tensor(weights)).sum().backward()
    torch_grads = {n: p.grad.numpy() for n, p in reference.named_parameters() if p.requires_grad}
    assert len(torch_grads) == 2 * LAYERS * len(PROJECTIONS)
    for view in model.iter_linears():
        block = "self_attn" if view.proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        for ours_name, peft_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            g = np.asarray(flat[("layers", block, view.proj, ours_name)].get_value()[view.layer])
            ref = torch_grads[f"base_model.model.{view.hf_name}.{peft_name}.default.weight"]
            np.testing.assert_allclose(g, ref, rtol=2e-4, atol=2e-4 * float(np.abs(ref).max()))


def test_merged_weights_reproduce_adapted_output():
    hf_model, hf_cfg = tiny_hf("qwen3")
    lora = LoraConfig(r=4, alpha=16.0)
    model = build_model(hf_cfg, hf_tensors(hf_model), lora=lora, dtype=jnp.float32)
    randomize_adapters(model)
    ids = random_ids(2, 16)
    adapted = model(jnp.asarray(ids))
    merged = merge_lora(model)
    assert len(merged) == LAYERS * len(PROJECTIONS)
    # PEFT merges the same adapters to the same dense weights.
    peft_merged = peft_model_like(hf_model, lora, ours=model).merge_and_unload().state_dict()
    for name, w in merged.items():
        np.testing.assert_allclose(w, peft_merged[name].numpy(), rtol=1e-6, atol=1e-6)
    # The dense merged model (transformers) gives the adapted logits.
    dense = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, w in merged.items():
            dense.state_dict()[name].copy_(torch.as_tensor(w))
    assert max_abs(adapted, torch_logits(dense, ids)) <= PARITY_TOL
    # A full merged export rebuilds (without adapters) to the same model.
    rebuilt = build_model(hf_cfg, list(iter_hf_tensors(model, merge_lora=True)), dtype=jnp.float32)
    assert max_abs(adapted, rebuilt(jnp.asarray(ids))) <= PARITY_TOL


def test_dropout_needs_rngs_and_changes_training_output():
    hf_model, hf_cfg = tiny_hf("qwen2")
    model = build_model(hf_cfg, hf_tensors(hf_model), lora=LoraConfig(r=4, dropout=0.5), dtype=jnp.float32)
    randomize_adapters(model)
    ids = jnp.asarray(random_ids(1, 8))
    eval_out = model(ids)
    assert max_abs(model(ids, deterministic=True, rngs=nnx.Rngs(dropout=0)), eval_out) == 0.0
    train_a = model(ids, deterministic=False, rngs=nnx.Rngs(dropout=0))
    train_b = model(ids, deterministic=False, rngs=jax.random.key(1))
    assert max_abs(train_a, eval_out) > PARITY_TOL and max_abs(train_a, train_b) > PARITY_TOL
    with pytest.raises(ValueError, match="rngs"):
        model(ids, deterministic=False)


# ---------------------------------------------------------------------------------------------
# Initialization

@pytest.mark.parametrize("init", ["gaussian", "peft"])
def test_init_distributions(init):
    in_f, out_f, r = 1024, 96, 64
    lora = LoraConfig(r=r, init=init)
    a = np.asarray(QLoRALinear(in_f, out_f, lora=lora, rngs=nnx.Rngs(0)).lora_a.get_value(), np.float64)
    b = np.asarray(QLoRALinear(in_f, out_f, lora=lora, rngs=nnx.Rngs(0)).lora_b.get_value())
    assert a.shape == (r, in_f) and b.shape == (out_f, r)
    assert not b.any()
    if init == "gaussian":
        assert a.std() == pytest.approx(lora.init_std, rel=0.02)
        assert abs(a.mean()) < 4 * lora.init_std / math.sqrt(a.size)
    else:  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); compare with torch's own init
        bound = 1 / math.sqrt(in_f)
        ref = torch.empty(r, in_f)
        torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
        assert float(ref.abs().max()) <= bound * (1 + 1e-6)
        assert a.std() == pytest.approx(float(ref.std()), rel=0.03)


def test_model_adapters_same_whether_built_or_loaded():
    hf_model, hf_cfg = tiny_hf("qwen2")
    lora = LoraConfig(r=4, init="gaussian")
    loaded = build_model(hf_cfg, hf_tensors(hf_model), lora=lora, dtype=jnp.float32, rng_seed=3)
    direct = CausalLM(ModelConfig.from_hf(hf_cfg), lora=lora, dtype=jnp.float32, rngs=nnx.Rngs(3))
    flat_loaded = dict(nnx.to_flat_state(trainable_state(loaded)))
    flat_direct = dict(nnx.to_flat_state(trainable_state(direct)))
    assert set(flat_loaded) == set(flat_direct)
    for path, var in flat_loaded.items():
        np.testing.assert_array_equal(var.get_value(), flat_direct[path].get_value())
        if path[-1] == "lora_a":  # each layer's slot drawn independently
            value = np.asarray(var.get_value())
            assert not np.array_equal(value[0], value[1])
    # Re-initializing in place reproduces the same values from the same key.
    init_adapters(direct, lora, nnx.Rngs(3).lora())
    for path, var in dict(nnx.to_flat_state(trainable_state(direct))).items():
        np.testing.assert_array_equal(var.get_value(), flat_loaded[path].get_value())


# ---------------------------------------------------------------------------------------------
# Target selection

def test_targets_by_name_list():
    hf_model, hf_cfg = tiny_hf("llama3-rope")
    lora = LoraConfig(r=4, targets=("q_proj", "mlp.down_proj"))
    model = build_model(hf_cfg, hf_tensors(hf_model), lora=lora, dtype=jnp.float32)
    adapted = {(v.layer, v.proj) for v in model.iter_linears() if v.adapted}
    assert adapted == {(i, p) for i in range(LAYERS) for p in ("q_proj", "down_proj")}
    assert model.layers.self_attn.k_proj.lora_a is None and model.layers.mlp.up_proj.lora_a is None
    randomize_adapters(model)
    reference = peft_model_like(hf_model, lora, ours=model, target_modules=["q_proj", "down_proj"])
    ids = random_ids(1, 12)
    assert max_abs(model(jnp.asarray(ids)), torch_logits(reference, ids)) <= PARITY_TOL
    assert count_params(model.config, lora).trainable == reference.get_nb_trainable_parameters()[0]


def test_targets_by_regex_gate_untargeted_layers():
    """A regex selecting layer 1 only: layer 0's stacked slots are inert (no output, no gradient)."""
    hf_model, hf_cfg = tiny_hf("qwen2")
    regex = r".*layers\.1\.self_attn\.(q|v)_proj"  # PEFT fullmatches "model.layers.1.self_attn.q_proj"
    lora = LoraConfig(r=4, targets=regex)
    assert lora.targeted_modules(LAYERS) == ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    model = build_model(hf_cfg, hf_tensors(hf_model), lora=lora, dtype=jnp.float32)
    randomize_adapters(model)
    reference = peft_model_like(hf_model, lora, ours=model)
    assert count_params(model.config, lora).trainable == reference.get_nb_trainable_parameters()[0]
    ids = random_ids(1, 12)
    assert max_abs(model(jnp.asarray(ids)), torch_logits(reference, ids)) <= PARITY_TOL
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids)) ** 2), argnums=nnx.DiffState(0, LoRAParam))(model)
    for path, var in nnx.to_flat_state(grads):
        g = np.asarray(var.get_value())
        assert not g[0].any(), path  # layer 0 not targeted
        assert g[1].any(), path
    assert set(merge_lora(model)) == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(ValueError, match="matches no linear"):
        LoraConfig(targets=r"layers\.9\..*").targeted_modules(LAYERS)


def test_trainable_filter_excludes_frozen_types():
    hf_model, hf_cfg = tiny_hf("qwen2")
    model = build_model(hf_cfg, hf_tensors(hf_model), quant=QuantConfig(), lora=LoraConfig(r=4), dtype=jnp.float32)
    assert not issubclass(LoRAParam, nnx.Param)
    trainable = dict(nnx.to_flat_state(trainable_state(model)))
    assert trainable and all(isinstance(v, LoRAParam) for v in trainable.values())
    frozen = dict(nnx.to_flat_state(nnx.state(model, (BaseParam, QuantParam))))
    assert not set(trainable) & set(frozen)
    everything = dict(nnx.to_flat_state(nnx.state(model)))
    assert set(everything) == set(trainable) | set(frozen)
    assert nnx.state(model, nnx.Param) == nnx.State({})  # nothing hides as a plain Param


# ---------------------------------------------------------------------------------------------
# Counts

def test_count_params_llama_3_1_8b_matches_transformers_and_peft():
    cfg = ModelConfig.from_hf(LLAMA_8B)
    lora = LoraConfig(r=32, alpha=16.0, targets="all-linear")
    counts = count_params(cfg, lora)
    # Independent reference: the real module tree on the meta device (no weights), with PEFT.
    hf_cfg = transformers.AutoConfig.for_model(**json.load(open(LLAMA_8B)))
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    linear_numel = sum(m.weight.numel() for n, m in hf_model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(r=32, lora_alpha=16, target_modules="all-linear"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert counts.trainable == trainable
    assert counts.total == total
    assert counts.total_4bit == total - linear_numel // 2  # bitsandbytes: packed uint8 = numel / 2
    # The figures the seed reports (REFERENCE.md).
    assert (counts.trainable, counts.total_4bit) == (83_886_080, 4_624_486_400)
    assert round(counts.trainable_percent, 2) == 1.81

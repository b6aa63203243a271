"""Qwen3-MoE against transformers' PyTorch model, peft's ``target_parameters`` LoRA and bitsandbytes.

Tiny random ``Qwen3MoeConfig`` (6 experts, top-2, GQA, q/k norms, explicit ``head_dim`` !=
hidden / heads), with ``norm_topk_prob`` on and off. The projections share three shapes
(q and gate_up, k/v and down, o), so the per-shape NF4 quantizer compiles three times. References: transformers' logits, router
logits and ``load_balancing_loss_func`` (and the model's own ``aux_loss`` with an attention
mask); bitsandbytes' ``quantize_4bit`` bytes of each expert matrix; peft's ``PeftModel`` on our
exported adapter (expert adapters via ``target_parameters``), its merged weights; transformers'
parsing of the full-size Qwen3-30B-A3B config on the meta device.
"""

from __future__ import annotations

import copy
import itertools
import json
import operator

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import REPO, max_abs, randomize_, require, tensors_of, torch_logits

torch = require("torch")
transformers = require("transformers")

from qlora_jax.lora import LoraConfig  # noqa: E402
from qlora_jax.models import ModelConfig, QuantConfig, build_model, iter_hf_tensors, moe  # noqa: E402
from qlora_jax.models.params import count_params, logical_axes, param_specs  # noqa: E402

VOCAB, HIDDEN, INTER, EXPERTS, TOP_K = 128, 64, 64, 6, 2
PARITY_TOL = 1e-4
EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 16)).astype(np.int32)
FULL_SIZE = REPO / "configs" / "model_configs" / "qwen3-30b-a3b.json"


def hf_model(norm_topk_prob: bool, seed: int = 0, **changes):
    config = transformers.Qwen3MoeConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=INTER,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, norm_topk_prob=norm_topk_prob, rms_norm_eps=1e-5, router_aux_loss_coef=0.01),
        **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_(model)
    return model, config.to_dict()


REFS = {norm: hf_model(norm) for norm in (True, False)}


@pytest.fixture(scope="module")
def f32_models():
    return {norm: build_model(cfg, tensors_of(m), dtype=jnp.float32) for norm, (m, cfg) in REFS.items()}


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_f32_logits_match_transformers(norm_topk_prob, f32_models):
    reference, cfg = REFS[norm_topk_prob]
    model = f32_models[norm_topk_prob]
    assert model.config.model_type == "qwen3_moe" and model.config.norm_topk_prob == norm_topk_prob
    ours = model(jnp.asarray(IDS))
    chex.assert_shape(ours, (*IDS.shape, VOCAB))
    chex.assert_type(ours, jnp.float32)
    err = max_abs(ours, torch_logits(reference, IDS))
    # The reference with the other norm_topk_prob (same weights) moves far more than the tolerance.
    other, _ = hf_model(not norm_topk_prob)
    other.load_state_dict(reference.state_dict())
    moved = max_abs(torch_logits(other, IDS), torch_logits(reference, IDS))
    print(f"qwen3_moe norm_topk_prob={norm_topk_prob}: f32 logits {err:.2e} (norm_topk_prob flip moves {moved:.2e})")
    assert err <= PARITY_TOL
    assert moved > 100 * PARITY_TOL


def test_router_logits_and_aux_loss_match_transformers(f32_models):
    reference, _ = REFS[True]
    model = f32_models[True]
    mask = np.ones_like(IDS)
    mask[1, 11:] = 0  # right padding: real tokens' attention is unchanged
    with torch.no_grad():
        out = reference(torch.as_tensor(IDS), attention_mask=torch.as_tensor(mask), output_router_logits=True)
        ref_router = np.stack([t.numpy() for t in out.router_logits])  # [L, b * s, E]
    h, router = model.hidden_and_router_logits(jnp.asarray(IDS))
    chex.assert_shape(router, (2, IDS.size, EXPERTS))
    chex.assert_type(router, jnp.float32)
    real = mask.reshape(-1).astype(bool)
    err_router = max_abs(np.asarray(router)[:, real], ref_router[:, real])
    # The aux loss on the same logits: ours vs transformers' load_balancing_loss_func, with the mask
    # and without it; and on our logits vs the model's own aux_loss (its logits).
    lb = transformers.models.qwen3_moe.modeling_qwen3_moe.load_balancing_loss_func
    router_t = tuple(torch.as_tensor(np.asarray(r)) for r in router)
    errs = []
    for m in (mask, None):
        ref = lb(router_t, EXPERTS, TOP_K, None if m is None else torch.as_tensor(m)).item()
        ours = float(moe.load_balancing_loss(router, TOP_K, None if m is None else jnp.asarray(m)))
        errs.append(abs(ours - ref))
    model_aux = abs(float(moe.load_balancing_loss(router, TOP_K, jnp.asarray(mask))) - out.aux_loss.item())
    unmasked_shift = abs(lb(router_t, EXPERTS, TOP_K, torch.as_tensor(mask)).item()
                         - lb(router_t, EXPERTS, TOP_K, None).item())
    print(f"router logits {err_router:.2e}; aux loss {errs[0]:.2e} (mask) {errs[1]:.2e} (none); "
          f"vs model aux_loss {model_aux:.2e}; mask moves it {unmasked_shift:.2e}; aux={out.aux_loss.item():.4f}")
    assert err_router <= 1e-5
    assert max(errs) <= 1e-6 and model_aux <= 1e-6
    assert unmasked_shift > 1e-4  # the mask matters
    np.testing.assert_allclose(np.asarray(model.logits_from_hidden(h)), np.asarray(model(jnp.asarray(IDS))),
                               atol=1e-6)


def test_greedy_generate_matches_transformers(f32_models):
    """The KV-cache decode path (left-padded batch: padding rows are routed too, but MoE is per token)."""
    from qlora_jax.inference.generate import Generator

    reference, _ = REFS[True]
    prompts = [IDS[0, :9].tolist(), IDS[1, :4].tolist()]
    ours = Generator(f32_models[True], None, stop_token_ids=[VOCAB + 1], pad_token_id=0).generate(prompts, max_new_tokens=6)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert ours.tokens[row] == out[0, len(prompt):].tolist(), row


def test_nf4_experts_are_bitsandbytes_bytes_and_logits_match_dequantized():
    """Each expert matrix quantized alone: its packed codes are bitsandbytes' bytes for that
    ``[out, in]`` matrix; the 4-bit model equals transformers on our dequantized weights."""
    bnbF = require("bitsandbytes.functional")
    reference, cfg = REFS[True]
    quant = QuantConfig("nf4", 64, True)
    model = build_model(cfg, tensors_of(reference), quant=quant, dtype=jnp.float32)
    state = reference.state_dict()
    for layer in range(2):
        for p in moe.EXPERT_PARAMS:
            q = getattr(model.layers.mlp.experts, p).weight.get_value()
            chex.assert_shape(q.packed, (2, EXPERTS) + state[f"model.layers.0.mlp.experts.{p}"].shape[1:-1]
                              + (state[f"model.layers.0.mlp.experts.{p}"].shape[-1] // 2,))
            for e in range(EXPERTS):
                w = state[f"model.layers.{layer}.mlp.experts.{p}"][e].contiguous()
                packed, bnb_state = bnbF.quantize_4bit(w.reshape(-1), blocksize=64, quant_type="nf4",
                                                       compress_statistics=True)
                np.testing.assert_array_equal(np.asarray(q.packed[layer, e]).reshape(-1), packed.numpy().reshape(-1))
                np.testing.assert_allclose(np.asarray(q.offset[layer, e]), bnb_state.offset.numpy(), rtol=1e-6)
    assert model.layers.mlp.gate.weight.get_value().dtype == jnp.float32  # the router stays unquantized
    ours_ref = copy.deepcopy(reference)
    ours_ref.load_state_dict({k: torch.as_tensor(v) for k, v in iter_hf_tensors(model)}, strict=True)
    err = max_abs(model(jnp.asarray(IDS)), torch_logits(ours_ref, IDS))
    effect = max_abs(torch_logits(ours_ref, IDS), torch_logits(reference, IDS))
    print(f"qwen3_moe NF4: {err:.2e} vs transformers on our dequantized weights (NF4 effect {effect:.2e})")
    assert err <= PARITY_TOL and effect > 100 * PARITY_TOL


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bf16_expert_decode_is_the_float32_dequantization_rounded_once(quant_type):
    """The accelerator path decodes experts from the two nibble halves (no byte-pair table, whose
    ``[n, 2]`` output XLA:TPU pads to 128 lanes): each expert must still be its float32
    dequantization (bit-exact against bitsandbytes' 1-D path, tests/test_quant.py) rounded once
    (by torch) to bf16 / f16; also when decoded two experts at a time (``chunk``: the mesh path)."""
    from qlora_jax.quant import dequantize_4bit

    w = np.random.default_rng(3).normal(0.0, 0.05, (4, 2 * INTER, HIDDEN)).astype(np.float32)
    q = jax.vmap(lambda x: moe.quantize_4bit(x, quant_type=quant_type, blocksize=64, double_quant=True))(jnp.asarray(w))
    f32 = [torch.from_numpy(np.asarray(dequantize_4bit(jax.tree.map(operator.itemgetter(e), q), jnp.float32)))
           for e in range(w.shape[0])]
    np.testing.assert_array_equal(np.asarray(moe.materialize_experts(q, jnp.float32, chunk=2)), np.stack(f32))
    for (dtype, torch_dtype), chunk in itertools.product(((jnp.bfloat16, torch.bfloat16),
                                                          (jnp.float16, torch.float16)), (None, 2)):
        ours = moe.materialize_experts(q, dtype, chunk)
        chex.assert_shape(ours, w.shape)
        chex.assert_type(ours, dtype)
        for e in range(w.shape[0]):
            np.testing.assert_array_equal(np.asarray(ours[e].astype(jnp.float32)),
                                          f32[e].to(torch_dtype).float().numpy())


def _lora_model(cfg, reference, quant=None):
    lora = LoraConfig(r=4, alpha=8.0, targets=("q_proj", "o_proj"), target_parameters=EXPERT_PARAMS)
    model = build_model(cfg, tensors_of(reference), lora=lora, quant=quant, dtype=jnp.float32)
    rng = np.random.default_rng(1)
    for linear in (model.layers.self_attn.q_proj, model.layers.mlp.experts.gate_up_proj,
                   model.layers.mlp.experts.down_proj):
        for var in (linear.lora_a, linear.lora_b):
            value = var.get_value()
            var.set_value(jnp.asarray(rng.normal(0.0, 0.1, value.shape), value.dtype))
    return model


def test_expert_lora_matches_peft_target_parameters(tmp_path):
    """Random non-zero adapters on q_proj and both expert tensors: our export loads in
    ``PeftModel.from_pretrained`` (expert adapters through ``target_parameters``) with our logits;
    its keys and shapes are those ``get_peft_model`` creates; the merged export equals both."""
    peft = require("peft")
    from qlora_jax.checkpoints.peft_io import load_peft_adapter, save_peft_adapter

    reference, cfg = REFS[True]
    model = _lora_model(cfg, reference)
    a = model.layers.mlp.experts.gate_up_proj.lora_a.get_value()
    chex.assert_shape(a, (2, EXPERTS, 4, HIDDEN))
    out = save_peft_adapter(model, tmp_path / "adapter")
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["target_parameters"] == list(EXPERT_PARAMS)
    assert sorted(adapter_cfg["target_modules"]) == ["o_proj", "q_proj"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(reference), out).eval()
    fresh = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], target_parameters=list(EXPERT_PARAMS)))
    from safetensors.numpy import load_file

    saved = {k: v.shape for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    created = {k.replace(".default", ""): tuple(v.shape) for k, v in fresh.state_dict().items() if "lora_" in k}
    assert saved == created
    ours = model(jnp.asarray(IDS))
    err = max_abs(ours, torch_logits(peft_model, IDS))
    moved = max_abs(ours, torch_logits(reference, IDS))
    # Expert adapters alone matter: zero q_proj's B and compare again.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "q_proj.lora_B" in name or "o_proj.lora_B" in name:
                p.zero_()
    b = model.layers.self_attn.q_proj.lora_b
    b.set_value(jnp.zeros_like(b.get_value()))
    ours_experts = model(jnp.asarray(IDS))
    err_experts = max_abs(ours_experts, torch_logits(peft_model, IDS))
    moved_experts = max_abs(ours_experts, torch_logits(reference, IDS))
    merged_ref = copy.deepcopy(reference)
    merged_ref.load_state_dict({k: torch.as_tensor(v) for k, v in iter_hf_tensors(model, merge_lora=True)})
    err_merged = max_abs(ours_experts, torch_logits(merged_ref, IDS))
    # Round trip: a fresh model loads the exported adapters back.
    again = build_model(cfg, tensors_of(reference), lora=model.lora_config, dtype=jnp.float32, rng_seed=5)
    load_peft_adapter(again, out)
    err_reload = max_abs(again(jnp.asarray(IDS)), ours)
    print(f"qwen3_moe PEFT target_parameters: {err:.2e} (adapters move {moved:.2e}); experts only "
          f"{err_experts:.2e} (move {moved_experts:.2e}); merged {err_merged:.2e}; reload {err_reload:.2e}")
    assert err <= PARITY_TOL and moved > 100 * PARITY_TOL
    assert err_experts <= PARITY_TOL and moved_experts > 100 * PARITY_TOL
    assert err_merged <= PARITY_TOL and err_reload <= 1e-6


def test_sft_step_with_aux_loss_trains_expert_adapters():
    """One SFT gradient step on the NF4 model: the router aux loss (coef * transformers' value) is
    in the loss, the expert adapters get non-zero gradients and the step lowers the loss."""
    import optax

    from qlora_jax.lora import split_model
    from qlora_jax.objectives.logprobs import masked_nll_sum
    from qlora_jax.objectives.sft import nll_sums

    reference, cfg = REFS[False]
    cfg = dict(cfg, output_router_logits=True)
    model = _lora_model(cfg, reference, quant=QuantConfig("nf4", 64, True))
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == 0.01
    graphdef, lora, rest = split_model(model)
    ids = jnp.asarray(IDS)
    batch = dict(input_ids=ids, positions=jnp.broadcast_to(jnp.arange(16), ids.shape),
                 segment_ids=jnp.ones_like(ids), targets=jnp.roll(ids, -1, axis=1),
                 loss_mask=jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0))

    def loss_fn(lora):
        s, n = nll_sums(graphdef, lora, rest, batch, router_aux=True)
        return s / n

    step = jax.jit(jax.value_and_grad(loss_fn))  # compiled once: the loss after the update reuses it
    loss, grads = step(lora)
    h, router = model.hidden_and_router_logits(ids)
    aux = float(moe.load_balancing_loss(router, TOP_K, batch["segment_ids"] > 0))
    s, n = masked_nll_sum(h, model.lm_head_weight(), batch["targets"], batch["loss_mask"])
    nll = float(s / n)
    print(f"SFT step: nll {nll:.4f} + 0.01 * aux {aux:.4f} = {float(loss):.4f}")
    np.testing.assert_allclose(float(loss), nll + 0.01 * aux, rtol=1e-6)
    g = grads["layers"]["mlp"]["experts"]["down_proj"]["lora_a"].get_value()
    assert float(jnp.abs(g).max()) > 0
    opt = optax.sgd(0.05)
    updates, _ = opt.update(grads, opt.init(lora))
    assert float(step(optax.apply_updates(lora, updates))[0]) < float(loss)


def test_expert_axis_in_param_specs_and_sharding():
    from qlora_jax.train.sharding import LOGICAL_RULES, spec_for

    cfg = ModelConfig.from_hf(REFS[True][1])
    lora = LoraConfig(r=4, targets=("q_proj",), target_parameters=EXPERT_PARAMS)
    specs = param_specs(cfg, quant=QuantConfig(), lora=lora)
    for p in moe.EXPERT_PARAMS:
        assert specs[f"layers.mlp.experts.{p}.weight.packed"].axes[0] == "expert"
        assert specs[f"layers.mlp.experts.{p}.lora_a"].shape == (EXPERTS, 4, specs[f"layers.mlp.experts.{p}.lora_a"].shape[2])
        assert specs[f"layers.mlp.experts.{p}.lora_b"].axes == ("expert", "embed" if p == "down_proj" else "mlp", "rank")
    assert "layers.mlp.gate_proj.weight.packed" not in specs and specs["layers.mlp.gate.weight"].dtype == "param"
    assert LOGICAL_RULES["expert"] == ("fsdp",)
    mesh = jax.sharding.AbstractMesh((1, 2, 1), ("data", "fsdp", "tensor"))
    shape = (2, EXPERTS, 2 * INTER, HIDDEN // 2)
    axes = logical_axes("layers.mlp.experts.gate_up_proj.weight.packed", shape)
    assert axes == (None, "expert", "mlp", "embed")
    assert tuple(spec_for(mesh, axes, shape)) == (None, "fsdp", None, None)  # embed no longer on fsdp
    # The sharded model state built on a real 1-device mesh keeps every array declared.
    model = build_model(REFS[True][1], tensors_of(REFS[True][0]), quant=QuantConfig(), lora=lora, dtype=jnp.float32)
    from flax import nnx

    from qlora_jax.train.sharding import shardings_for_state
    shardings_for_state(jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                          ("data", "fsdp", "tensor")), nnx.state(model))


def test_full_size_config_matches_transformers():
    raw = json.loads(FULL_SIZE.read_text())
    cfg = ModelConfig.from_hf(FULL_SIZE)
    hf_cfg = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    block = hf.model.layers[0].mlp
    assert tuple(block.experts.gate_up_proj.shape) == (cfg.num_experts, cfg.moe_gate_up_size, cfg.hidden_size)
    assert tuple(block.experts.down_proj.shape) == (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    assert (block.gate.top_k, block.gate.norm_topk_prob) == (cfg.num_experts_per_tok, cfg.norm_topk_prob)
    assert cfg.attention_scale == pytest.approx(hf.model.layers[0].self_attn.scaling)
    n_params = sum(p.numel() for p in hf.parameters())
    assert count_params(cfg).total == n_params
    lora = LoraConfig(r=16, targets="all-linear", target_parameters=EXPERT_PARAMS)
    per_layer_experts = cfg.num_experts * 16 * ((cfg.hidden_size + cfg.moe_gate_up_size)
                                                + (cfg.moe_intermediate_size + cfg.hidden_size))
    attn = sum(o + i for o, i in cfg.linear_shapes().values()) * 16
    assert count_params(cfg, lora).trainable == cfg.num_hidden_layers * (per_layer_experts + attn)
    print(f"Qwen3-30B-A3B: {n_params:,} params; LoRA r=16 all-linear + experts: "
          f"{count_params(cfg, lora).trainable:,} trainable")


def test_config_errors_name_the_key():
    from qlora_jax.errors import ModelFileError

    _, cfg = REFS[True]
    with pytest.raises(ModelFileError, match="decoder_sparse_step"):
        ModelConfig.from_hf(dict(cfg, decoder_sparse_step=2))
    with pytest.raises(ModelFileError, match="mlp_only_layers"):
        ModelConfig.from_hf(dict(cfg, mlp_only_layers=[0]))
    with pytest.raises(ModelFileError, match="num_experts_per_tok"):
        ModelConfig.from_hf(dict(cfg, num_experts_per_tok=EXPERTS + 1))
    with pytest.raises(ModelFileError, match="use_sliding_window"):
        ModelConfig.from_hf(dict(cfg, use_sliding_window=True))
    with pytest.raises(ValueError, match="target_parameters"):
        LoraConfig(target_parameters=EXPERT_PARAMS, dropout=0.1)
    from configs import sft as sft_config
    from qlora_jax.train.config import ConfigError, validate_config

    c = sft_config.get_config()
    c.data.train = "x.jsonl"
    c.lora.target_parameters = ",".join(EXPERT_PARAMS)  # with the default lora.dropout 0.05
    with pytest.raises(ConfigError, match=r"config\.lora\.target_parameters .* config\.lora\.dropout=0"):
        validate_config(c)
    c.lora.dropout = 0.0
    validate_config(c)


def test_per_expert_checkpoint_loads(tmp_path, f32_models):
    """transformers 5 saves (and the Hub's Qwen3-MoE checkpoints hold) one tensor per expert,
    ``mlp.experts.{e}.gate_proj.weight`` ...; loading fuses them into the [E, ...] tensors."""
    from safetensors.numpy import load_file

    from qlora_jax.checkpoints.load import load_model

    reference, _ = REFS[True]
    reference.save_pretrained(tmp_path / "m")
    names = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in names and not any("gate_up_proj" in n for n in names)
    model, _ = load_model(tmp_path / "m", quantize=None, dtype="float32", with_tokenizer=False)
    err = max_abs(model(jnp.asarray(IDS)), torch_logits(reference, IDS))
    print(f"qwen3_moe per-expert checkpoint: {err:.2e}")
    assert err <= PARITY_TOL


@pytest.mark.slow
def test_trainer_runs_on_tiny_moe_with_expert_adapters(tmp_path):
    """The trainer end to end (NF4, LoRA on attention and, via lora.target_parameters, the experts;
    output_router_logits on): steps run, and the PEFT adapter it exports names the experts."""
    from test_train import _config

    from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin
    from qlora_jax.train.trainer import run

    tok = gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))
    model, _ = hf_model(True, vocab_size=len(tok), output_router_logits=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = _config(tmp_path / "m", tmp_path / "run", **{
        "train.max_steps": 1, "train.grad_accum": 1, "train.checkpoint_every": 1, "data.max_eval_examples": 2,
        "lora.target_parameters": ",".join(EXPERT_PARAMS)})
    result = run(cfg)
    assert result["final_step"] == 1
    adapter = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert adapter["target_parameters"] == list(EXPERT_PARAMS)

"""DoRA and QDoRA (DoRA on the NF4 base) against PEFT 0.21's ``LoraConfig(use_dora=True)``.

References: PEFT's ``DoraLinearLayer`` on tiny transformers LLaMAs for logits, gradients (torch
autograd, the weight norm detached), magnitude init, merges, the saved adapter and LoRA+ groups;
bitsandbytes' NF4 round trip as the quantized base (as in ``test_lora``). Then our trainer with
``lora.use_dora=True`` for two steps (marked slow).
"""

from __future__ import annotations

import copy
import json
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import REPO, require, write_tiny_llama
from flax import nnx

torch = require("torch")
transformers = require("transformers")
peft = require("peft")
safetensors_torch = require("safetensors.torch")

from test_models import (  # noqa: E402
    LAYERS,
    PARITY_TOL,
    _bnb_roundtrip,
    _float_residuals,
    _linear_name,
    hf_tensors,
    max_abs,
    random_ids,
    tiny_hf,
    torch_logits,
)

from qlora_jax.checkpoints.peft_io import load_peft_adapter, save_peft_adapter  # noqa: E402
from qlora_jax.checkpoints.run_dir import CheckpointMismatch, check_lora_record  # noqa: E402
from qlora_jax.lora import (  # noqa: E402
    PROJECTION_BLOCK,
    PROJECTIONS,
    LoraConfig,
    LoRAParam,
    merge_lora,
    peft_adapter_tensors,
    trainable_state,
)
from qlora_jax.models import QLoRALinear, QuantConfig, build_model, iter_hf_tensors  # noqa: E402
from qlora_jax.models.params import count_params, logical_axes, param_specs  # noqa: E402
from qlora_jax.quant import dequantize_4bit  # noqa: E402
from qlora_jax.train.optim import lora_groups  # noqa: E402

DORA = LoraConfig(r=4, alpha=16.0, targets="all-linear", use_dora=True)
IDS = random_ids(2, 16)  # one shape for every model call: one compiled forward per model


def randomize(model, seed: int = 0, std: float = 0.05, spread: float = 0.2) -> None:
    """Nonzero A and B (s B A about the size of W), and magnitudes away from ``||W + s B A||``
    (where DoRA would equal LoRA), in every slot. numpy draws: no kernel compiled per shape."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, LoRAParam):
            value = np.asarray(var.get_value())
            if path[-1] == "lora_magnitude":
                value = value * (1 + spread * rng.normal(size=value.shape))
            else:
                value = std * rng.normal(size=value.shape)
            var.set_value(jnp.asarray(value, var.get_value().dtype))


def peft_dora_like(hf_model, lora: LoraConfig, ours=None):
    """PEFT (use_dora=True) on a copy of ``hf_model``, with our adapters and magnitudes copied in
    under the names our export writes."""
    cfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora.targets,
                          use_rslora=lora.use_rslora, use_dora=True)
    model = peft.get_peft_model(copy.deepcopy(hf_model), cfg).eval()
    if ours is not None:
        tensors = {k: torch.as_tensor(v) for k, v in peft_adapter_tensors(ours).items()}
        assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == LAYERS * len(PROJECTIONS)
        result = peft.set_peft_model_state_dict(model, tensors)
        assert not result.unexpected_keys
        assert len([k for k in model.state_dict() if "lora_" in k]) == len(tensors)  # every one set
    return model


def magnitudes_of(peft_model) -> dict[str, np.ndarray]:
    return {n.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector.default.weight"):
            p.detach().numpy() for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n}


def _setup(quant: str | None):
    """(quant, hf reference base, hf config, our DoRA model with random A, B, m, PEFT with the same,
    (init logits error, init magnitude error vs PEFT's own init)).

    QDoRA: every decoder linear of the reference is bitsandbytes' NF4 round trip, and our model
    loads bitsandbytes' quant states, so both sides hold the same 4-bit base (as test_lora does)."""
    hf_model, hf_cfg = tiny_hf("llama3-rope")
    tensors = dict(hf_tensors(hf_model))
    base = copy.deepcopy(hf_model)
    if quant:
        state = base.state_dict()
        with torch.no_grad():
            for i in range(LAYERS):
                for proj in PROJECTIONS:
                    dequant, tensors[_linear_name(i, proj)] = _bnb_roundtrip(state[_linear_name(i, proj)])
                    state[_linear_name(i, proj)].copy_(dequant)
    model = build_model(hf_cfg, list(tensors.items()), quant=QuantConfig() if quant else None, lora=DORA,
                        dtype=jnp.float32)
    # At init (B = 0, m = ||W||): the base model, and PEFT's own magnitude init.
    err_init = max_abs(model(jnp.asarray(IDS)), torch_logits(base, IDS))
    peft_init = magnitudes_of(peft_dora_like(base, DORA))
    err_m_init = max(max_abs(view.magnitude(), peft_init[view.hf_name]) for view in model.iter_linears())
    randomize(model)
    return quant, base, hf_cfg, model, peft_dora_like(base, DORA, ours=model), (err_init, err_m_init)


@pytest.fixture(scope="module")
def dora():
    return _setup(None)


@pytest.fixture(scope="module")
def qdora():
    return _setup("nf4")


# ---------------------------------------------------------------------------------------------
# One linear: the formula, dropout, memory


def _peft_linear(linear: QLoRALinear, rate: float):
    """PEFT DoRA around a torch Linear holding ``linear``'s weights and adapters."""
    w, (a, b), m = linear.base_weight().copy(), linear.lora_weights(), linear.magnitude()
    torch_linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    cfg = peft.LoraConfig(r=a.shape[0], lora_alpha=linear.lora_config.alpha, lora_dropout=rate,
                          target_modules=["0"], use_dora=True)
    model = peft.get_peft_model(torch.nn.Sequential(torch_linear), cfg)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.as_tensor(w))
        if linear.bias is not None:
            layer.base_layer.bias.copy_(torch.as_tensor(linear.bias_value()))
        layer.lora_A["default"].weight.copy_(torch.as_tensor(a))
        layer.lora_B["default"].weight.copy_(torch.as_tensor(b))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.as_tensor(m))
    return model, layer


def _linear_grads(linear: QLoRALinear, x, cotangent, dropout_key=None):
    graphdef, lora_state, rest = nnx.split(linear, LoRAParam, ...)

    def loss(lora_state):
        return jnp.sum(nnx.merge(graphdef, lora_state, rest)(x, dropout_key=dropout_key) * cotangent)

    grads = jax.jit(jax.grad(loss))(lora_state)
    return {k: np.asarray(grads[k].get_value()) for k in ("lora_a", "lora_b", "lora_magnitude")}


def _peft_grads(model, layer, x, cotangent):
    model.zero_grad()
    (model(torch.as_tensor(np.asarray(x))) * torch.as_tensor(cotangent)).sum().backward()
    return {"lora_a": layer.lora_A["default"].weight.grad.numpy(),
            "lora_b": layer.lora_B["default"].weight.grad.numpy(),
            "lora_magnitude": layer.lora_magnitude_vector["default"].weight.grad.numpy()}


def _rel_err(ours: dict, ref: dict) -> float:
    return max(float(np.abs(ours[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)


def test_linear_matches_peft_with_and_without_dropout():
    """y = (m / ||W + s B A||) (x W^T + s x A^T B^T) + bias, with m = ||W + s B A|| plain LoRA;
    outputs and gradients (A, B, m; the norm detached) equal PEFT's. With dropout PEFT rescales a
    second base matmul of the dropped input: PEFT's own training forward, its dropout replaced
    by our mask, matches too."""
    in_f, out_f, rate = 64, 48, 0.3
    linear = QLoRALinear(in_f, out_f, use_bias=True, lora=LoraConfig(r=4, alpha=8.0, dropout=rate, use_dora=True),
                         rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    linear.bias.set_value(jnp.asarray(rng.normal(size=out_f), jnp.float32))
    linear.lora_b.set_value(jnp.asarray(0.1 * rng.normal(size=(out_f, 4)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(2, 5, in_f)), jnp.float32)
    cotangent = rng.normal(size=(2, 5, out_f)).astype(np.float32)

    at_init = linear(x)  # magnitude still ||W|| from init, B != 0: m / n != 1
    w, (a, b) = linear.base_weight().astype(np.float64), linear.lora_weights()
    merged = w + linear.scale * (b.astype(np.float64) @ a)
    norm = np.linalg.norm(merged, axis=1)
    linear.lora_magnitude.set_value(jnp.asarray(norm, jnp.float32))
    plain = np.asarray(x, np.float64) @ merged.T + linear.bias_value()
    assert max_abs(linear(x), plain) < 1e-5  # m = ||W + s B A||: plain LoRA
    assert max_abs(at_init, plain) > 1e-2
    linear.lora_magnitude.set_value(jnp.asarray(norm * (1 + 0.3 * rng.normal(size=out_f)), jnp.float32))

    model, layer = _peft_linear(linear, rate)
    model.eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(np.asarray(x))).numpy()
    got = linear(x)
    chex.assert_shape(got, (2, 5, out_f))
    err_eval = max_abs(got, ref)
    grad_eval = _rel_err(_linear_grads(linear, x, cotangent), _peft_grads(model, layer, x, cotangent))

    key = jax.random.key(7)
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, x.shape))  # the mask _dropout draws

    class FixedDropout(torch.nn.Module):
        def forward(self, t):
            return torch.where(torch.as_tensor(keep), t / (1.0 - rate), torch.zeros(()))

    layer.lora_dropout["default"] = FixedDropout()
    model.train()
    with torch.no_grad():
        ref_train = model(torch.as_tensor(np.asarray(x))).numpy()
    err_train = max_abs(linear(x, dropout_key=key), ref_train)
    grad_train = _rel_err(_linear_grads(linear, x, cotangent, key), _peft_grads(model, layer, x, cotangent))
    print(f"linear vs peft: output {err_eval:.2e} (dropout {err_train:.2e}), gradients max |diff| / max |grad| "
          f"{grad_eval:.2e} (dropout {grad_train:.2e})")
    assert max(err_eval, err_train) <= 1e-5
    assert max(grad_eval, grad_train) <= 1e-5
    assert max_abs(ref_train, ref) > 1e-2  # the dropout path is really different
    # A gated-off slot (a layer the targets skip) is the base linear.
    np.testing.assert_array_equal(linear(x, lora_gate=jnp.zeros(())), linear(x, lora_enabled=False))


def test_qdora_linear_saves_no_dense_weight_and_runs_in_bf16():
    """QDoRA's backward keeps no [out, in] float array (the norm is computed, detached, from the
    NF4 codes); gradients equal a naive dense formulation; the bf16 path (NF4 decoded inside the
    matmuls) stays close to float32."""
    in_f, out_f = 192, 320
    linear = QLoRALinear(in_f, out_f, quant=QuantConfig(), lora=LoraConfig(r=8, use_dora=True), rngs=nnx.Rngs(0))
    linear.lora_b.set_value(jnp.asarray(0.05 * np.random.default_rng(2).normal(size=(out_f, 8)), jnp.float32))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, in_f)), jnp.float32)
    graphdef, lora_state, rest = nnx.split(linear, LoRAParam, ...)
    q = linear.weight.get_value()

    def ours(lora_state, x):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, lora_state, rest)(x)))

    def naive(lora_state, x):
        a, b, m = (lora_state[k].get_value() for k in ("lora_a", "lora_b", "lora_magnitude"))
        merged = dequantize_4bit(q, jnp.float32) + linear.scale * b @ a
        norm = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=1))
        return jnp.sum(jnp.tanh((m / norm) * (x @ merged.T)))

    dense = {(out_f, in_f), (in_f, out_f)}
    residuals, g_ours = _float_residuals(jax.jit(ours), lora_state, x)
    assert residuals and not [s for s, _ in residuals if s[-2:] in dense], residuals
    assert ((out_f,), np.float32) in residuals  # the detached norms (or m / norm): [out] only
    g_naive = jax.jit(jax.grad(naive, argnums=(0, 1)))(lora_state, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_naive), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    @jax.jit
    def forward(lora_state, x):
        layer = nnx.merge(graphdef, lora_state, rest)
        layer.dtype = jnp.dtype(x.dtype)
        return layer(x)

    y16, y32 = forward(lora_state, x.astype(jnp.bfloat16)), forward(lora_state, x)
    assert y16.dtype == jnp.bfloat16
    assert max_abs(y16, y32) < 0.02 * float(jnp.abs(y32).max())


# ---------------------------------------------------------------------------------------------
# Whole model against PEFT


@pytest.mark.parametrize("case", ["dora", "qdora"])
def test_logits_match_peft(case, request):
    quant, base, _, model, reference, (err_init, err_m_init) = request.getfixturevalue(case)
    ours, ref = model(jnp.asarray(IDS)), torch_logits(reference, IDS)
    err = max_abs(ours, ref)
    effect = max_abs(ref, torch_logits(base, IDS))
    print(f"{case} logits vs peft: {err:.2e} (at init {err_init:.2e}, magnitude init {err_m_init:.2e}; "
          f"the adapters' effect {effect:.2e})")
    assert max(err, err_init) <= PARITY_TOL
    assert err_m_init <= 1e-5
    assert effect > 100 * PARITY_TOL


def test_gradients_match_peft(qdora):
    """Whole-model gradients of lora_a, lora_b and the magnitudes, QDoRA (the f32 DoRA linear's
    gradients are compared with PEFT's above; the model-level program is the same)."""
    _, _, hf_cfg, model, reference, _ = qdora
    weights = np.random.default_rng(5).normal(size=IDS.shape + (hf_cfg["vocab_size"],)).astype(np.float32)
    graphdef, lora_state, rest = nnx.split(model, LoRAParam, ...)

    def loss(lora_state):
        return jnp.sum(nnx.merge(graphdef, lora_state, rest)(jnp.asarray(IDS)) * weights)

    flat = dict(nnx.to_flat_state(jax.grad(loss)(lora_state)))
    assert set(flat) == set(dict(nnx.to_flat_state(lora_state)))
    reference.zero_grad()
    (reference(torch.as_tensor(IDS)).logits * torch.as_tensor(weights)).sum().backward()
    torch_grads = {n: p.grad.numpy() for n, p in reference.named_parameters() if p.requires_grad}
    assert len(torch_grads) == 3 * LAYERS * len(PROJECTIONS)
    worst = {}
    for view in model.iter_linears():
        for ours_name, peft_name in (("lora_a", "lora_A"), ("lora_b", "lora_B"),
                                     ("lora_magnitude", "lora_magnitude_vector")):
            g = np.asarray(flat[("layers", PROJECTION_BLOCK[view.proj], view.proj, ours_name)].get_value()[view.layer])
            ref = torch_grads[f"base_model.model.{view.hf_name}.{peft_name}.default.weight"]
            worst[ours_name] = max(worst.get(ours_name, 0.0), float(np.abs(g - ref).max() / np.abs(ref).max()))
    print("QDoRA gradients vs peft, max |diff| / max |grad|: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert max(worst.values()) <= 1e-4


def test_peft_export_loads_in_peft_and_back(qdora, tmp_path):
    """Our PEFT-format adapter (use_dora, lora_magnitude_vector) loads with PeftModel.from_pretrained
    on the (NF4-dequantized) base and gives our logits; loading it back restores every value."""
    _, base, _, model, _, _ = qdora
    out = save_peft_adapter(model, tmp_path / "adapter", base_model="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    keys = set(safetensors_torch.load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector" in keys
    assert len(keys) == 3 * LAYERS * len(PROJECTIONS)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    err = max_abs(model(jnp.asarray(IDS)), torch_logits(loaded, IDS))
    print(f"QDoRA export loaded by PeftModel: {err:.2e}")
    assert err <= PARITY_TOL

    fresh = nnx.clone(model)
    for _, var in nnx.to_flat_state(trainable_state(fresh)):
        var.set_value(jnp.zeros_like(var.get_value()))
    load_peft_adapter(fresh, out)
    for (path, mine), (_, theirs) in zip(nnx.to_flat_state(trainable_state(model)),
                                         nnx.to_flat_state(trainable_state(fresh)), strict=True):
        np.testing.assert_array_equal(mine.get_value(), theirs.get_value(), err_msg=str(path))
    plain = types.SimpleNamespace(lora_config=LoraConfig(r=4, alpha=16.0))
    with pytest.raises(ValueError, match="use_dora: adapter True vs model False"):
        load_peft_adapter(plain, out)  # a DoRA adapter never loads as plain LoRA


def test_merged_weights_match_peft_merge(dora):
    """merge_lora and the merged export's tensors = PEFT's merge_and_unload, (m / n) (W + s B A);
    transformers with those weights computes our logits."""
    _, base, _, model, reference, _ = dora
    merged = merge_lora(model)
    peft_merged = copy.deepcopy(reference).merge_and_unload().state_dict()
    err = max(max_abs(w, peft_merged[name].numpy()) for name, w in merged.items())
    exported = dict(iter_hf_tensors(model, merge_lora=True))
    assert all(np.array_equal(exported[name], w) for name, w in merged.items())
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, w in merged.items():
            dense.state_dict()[name].copy_(torch.as_tensor(w))
    err_logits = max_abs(model(jnp.asarray(IDS)), torch_logits(dense, IDS))
    print(f"merged vs peft merge_and_unload: {err:.2e}; dense transformers logits {err_logits:.2e}")
    assert err <= 1e-5 and err_logits <= PARITY_TOL


# ---------------------------------------------------------------------------------------------
# Declaration, counts, optimizer groups, checkpoint records


def test_magnitude_is_declared_counted_and_grouped_with_b(dora):
    _, _, _, model, reference, _ = dora
    cfg = model.config
    specs = param_specs(cfg, quant=model.quant_config, lora=DORA)
    spec = specs["layers.self_attn.q_proj.lora_magnitude"]
    assert (spec.shape, spec.dtype, spec.axes) == ((cfg.q_size,), "lora", ("heads",))
    assert specs["layers.mlp.down_proj.lora_magnitude"].axes == ("embed",)
    for path, var in nnx.to_flat_state(trainable_state(model)):
        declared = specs[".".join(map(str, path))]
        assert var.get_value().shape == declared.stored_shape(cfg.num_hidden_layers), path
    assert logical_axes("layers/mlp/up_proj/lora_magnitude", (LAYERS, cfg.intermediate_size)) == (None, "mlp")
    assert count_params(cfg, DORA).trainable == reference.get_nb_trainable_parameters()[0]
    assert count_params(cfg, DORA).trainable == sum(v.get_value().size for _, v in
                                                    nnx.to_flat_state(trainable_state(model)))
    # LoRA+: peft's create_loraplus_optimizer puts the magnitude in lora_B's group (lr x ratio)...
    from peft.optimizers import create_loraplus_optimizer

    opt = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    names = {id(p): n for n, p in reference.named_parameters()}
    fast = {names[id(p)].split(".")[-3] for g in opt.param_groups if g["lr"] == 16e-3 for p in g["params"]}
    assert fast == {"lora_B", "lora_magnitude_vector"}
    # ... and so do we.
    groups = {path[-1]: g for path, g in nnx.to_flat_state(lora_groups(trainable_state(model)))}
    assert groups == {"lora_a": "a", "lora_b": "b", "lora_magnitude": "b"}


def test_resume_with_other_use_dora_is_a_mismatch():
    record = {"r": 4, "alpha": 8.0, "targets": "all-linear", "use_rslora": False, "use_dora": True}
    check_lora_record(record, dict(record), "ckpt/2")
    old = {k: v for k, v in record.items() if k != "use_dora"}  # written before DoRA existed: plain LoRA
    check_lora_record(old, {**record, "use_dora": False}, "ckpt/2")
    with pytest.raises(CheckpointMismatch, match=r"lora.use_dora: checkpoint has False, config has True"):
        check_lora_record(old, record, "ckpt/2")


# ---------------------------------------------------------------------------------------------
# The trainer


@pytest.mark.slow  # a whole trainer start (~90 s on the shared 2-core CPU); the parts are tested above
def test_trainer_runs_qdora(tmp_path):
    """Two SFT steps with lora.use_dora on the NF4 base: finite losses, the magnitudes move, and
    the exported adapter is a PEFT DoRA adapter."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from configs import sft as sft_config
    from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin
    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.train.config import lora_config_from
    from qlora_jax.train.metrics import read_metrics
    from qlora_jax.train.trainer import run

    tok = gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))
    model_dir = write_tiny_llama(tmp_path / "base", tok)
    c = sft_config.get_config()
    c.workdir = str(tmp_path / "run")
    c.model.source = str(model_dir)
    c.data.train = str(REPO / "data/sft_demo/train.jsonl")
    c.data.eval = ""
    c.train.batch_size, c.train.grad_accum, c.train.max_steps, c.train.checkpoint_every = 2, 1, 2, 2
    c.train.generate_eval = 0
    c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.use_dora = 4, 8.0, 0.1, True
    c.optim.lr, c.optim.warmup_ratio = 1e-2, 0.0
    c.data.max_length = 96
    result = run(c)
    assert result["final_step"] == 2
    losses = [r["loss"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and np.isfinite(losses).all()
    adapter = tmp_path / "run/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    trained = safetensors_torch.load_file(str(adapter / "adapter_model.safetensors"))
    start, _ = load_model(model_dir, quantize="nf4", lora=lora_config_from(c), with_tokenizer=False)
    moved = [float(np.abs(trained[f"base_model.model.{v.hf_name}.lora_magnitude_vector"].numpy()
                          - v.magnitude()).max()) for v in start.iter_linears()]
    assert min(moved) > 1e-4, moved  # every magnitude trained away from ||W||

"""PiSSA and LoftQ initialisation (``qlora_jax.lora_init``): factors, residual base, loader, export, trainer.

References: peft 0.21.2's ``init_lora_weights="pissa"`` / ``"pissa_niter_K"`` on the same float32
weight; peft's ``loftq_utils.loftq_init`` (bitsandbytes NF4 quantizer), run on the CPU with only
its hard-coded compute device replaced (its source is compiled again with ``"cpu"``); closed-form
SVD identities (Eckart-Young: the rank-r truncation error); transformers + peft for the PEFT
export against the *original* base. SVD sign ambiguity: factors are compared through ``B @ A``
and the residual, single vectors up to a sign.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _support import require, write_tiny_llama

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import sft as sft_config  # noqa: E402
from qlora_jax import lora_init  # noqa: E402
from qlora_jax.checkpoints import export as export_lib  # noqa: E402
from qlora_jax.checkpoints import gguf_tokenizer, open_gguf, resolve_builtin, run_dir  # noqa: E402
from qlora_jax.checkpoints.load import load_model  # noqa: E402
from qlora_jax.checkpoints.peft_io import save_peft_adapter  # noqa: E402
from qlora_jax.lora import LoraConfig  # noqa: E402
from qlora_jax.quant import Quant4bit, dequantize_4bit, quantize_4bit  # noqa: E402

IDS = np.array([[1, 5, 17, 42, 99, 200, 3000, 45000, 9, 2]])


def heavy_weight(out: int, inn: int, seed: int = 0) -> np.ndarray:
    """A float32 [out, in] matrix with a fast-decaying spectrum (as trained LLM weights have)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((out, out)))
    v, _ = np.linalg.qr(rng.standard_normal((inn, out)))
    s = 0.5 * np.arange(1, out + 1) ** -0.8
    return ((u * s) @ v.T).astype(np.float32)


def peft_linear(weight: np.ndarray, **config):
    """peft's LoRA layer on an ``nn.Linear`` holding ``weight``, initialised by ``config``."""
    out, inn = weight.shape
    module = torch.nn.Sequential()
    module.add_module("proj", torch.nn.Linear(inn, out, bias=False))
    module.proj.weight.data = torch.tensor(weight)
    model = peft.get_peft_model(module, peft.LoraConfig(target_modules=["proj"], **config))
    layer = model.base_model.model.proj
    return (layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy(),
            layer.base_layer.weight.detach().numpy(), layer.scaling["default"])


def peft_loftq_on_cpu():
    """peft's ``loftq_init`` with its compute device ("cuda"/"xpu", hard-coded) set to the CPU."""
    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    device_line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert source.count(device_line) == 1, "peft's loftq_init changed: revisit this reference"
    namespace = dict(vars(loftq_utils))
    exec(compile(source.replace(device_line, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def aligned(x: np.ndarray, ref: np.ndarray, axis: int) -> np.ndarray:
    """``x`` with each singular vector (row for axis=1, column for axis=0) flipped to match ``ref``'s sign."""
    signs = np.sign(np.sum(x * ref, axis=axis, keepdims=True))
    return x * signs


@pytest.mark.parametrize("r, alpha", [(8, 16.0), (4, 4.0), (16, 8.0)])
def test_pissa_matches_peft(r, alpha):
    """A, B, the residual base: equal to peft's ``init_lora_weights="pissa"`` (measured <= 3e-5)."""
    w = heavy_weight(96, 160)
    a_ref, b_ref, base_ref, scale = peft_linear(w, r=r, lora_alpha=alpha, init_lora_weights="pissa")
    residual, a, b = lora_init.pissa_factors(w, r, alpha / r)
    chex.assert_shape((a, b, residual), ((r, 160), (96, r), (96, 160)))
    chex.assert_type((a, b, residual), jnp.float32)
    assert scale == alpha / r
    a, b, residual = map(np.asarray, (a, b, residual))
    np.testing.assert_allclose(b @ a, b_ref @ a_ref, atol=3e-5)
    np.testing.assert_allclose(residual, base_ref, atol=3e-5)
    np.testing.assert_allclose(aligned(a, a_ref, 1), a_ref, atol=3e-5)
    np.testing.assert_allclose(aligned(b, b_ref, 0), b_ref, atol=3e-5)
    # The closed form: W = residual + s B A, and the residual's norm is Eckart-Young's tail.
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(residual + alpha / r * b @ a, w, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(residual), np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-5)


def test_pissa_niter_is_near_optimal_like_peft():
    """Randomized PiSSA ("pissa_niter_K"): our rank-r fit and peft's (torch.svd_lowrank) approach the
    exact truncation error as K grows; ours is within 1 % of it at K=4 and never worse than peft's + 1 %."""
    w = heavy_weight(128, 256, seed=1)
    r, alpha = 8, 16.0
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(s[r:] ** 2))
    exact_residual, _, _ = lora_init.pissa_factors(w, r, alpha / r)
    ratios = {}
    for k in (1, 4):
        torch.manual_seed(0)
        _, _, base_ref, _ = peft_linear(w, r=r, lora_alpha=alpha, init_lora_weights=f"pissa_niter_{k}")
        residual, a, b = lora_init.pissa_factors(w, r, alpha / r, niter=k)
        chex.assert_shape((a, b), ((r, 256), (128, r)))
        np.testing.assert_allclose(np.asarray(residual) + alpha / r * np.asarray(b) @ np.asarray(a), w, atol=1e-5)
        ours, ref = np.linalg.norm(np.asarray(residual)) / optimal, np.linalg.norm(base_ref) / optimal
        ratios[k] = ours
        assert ours >= 1 - 1e-5 and ref >= 1 - 1e-5  # nothing beats the truncated SVD
        assert ours <= ref * 1.01, (k, ours, ref)
    assert ratios[4] <= ratios[1] and ratios[4] < 1.01
    np.testing.assert_allclose(lora_init.pissa_factors(w, r, alpha / r, niter=4)[0], exact_residual, atol=2e-3)


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_loftq_matches_peft_loftq_init(iters):
    """At peft's settings (NF4, blocksize 64, no double quantization, alpha = r so scaling 1) our
    LoftQ is peft's: the same dequantized base and ``B A``. Rounds 1-3 agree to float rounding
    (every code equal); later rounds may flip a few codes that sit on a midpoint (measured: 139 of
    131072 values of a 256 x 512 weight at 5 rounds), so there the objective is compared (rtol 1e-4)."""
    w = heavy_weight(128, 384, seed=2)
    r = 8
    deq_ref, a_ref, b_ref = (t.numpy() for t in peft_loftq_on_cpu()(torch.tensor(w), num_bits=4, reduced_rank=r,
                                                                      num_iter=iters))
    q, a, b = lora_init.loftq_factors(w, r, 1.0, iters=iters, double_quant=False)
    chex.assert_shape((a, b), ((r, 384), (128, r)))
    deq = np.asarray(dequantize_4bit(q, jnp.float32))
    error = lora_init.quantization_error(w, q, a, b)
    error_ref = float(np.linalg.norm(w.astype(np.float64) - deq_ref - b_ref.astype(np.float64) @ a_ref))
    np.testing.assert_allclose(error, error_ref, rtol=1e-4)
    if iters <= 3:
        np.testing.assert_allclose(deq, deq_ref, atol=1e-6)
        np.testing.assert_allclose(np.asarray(b) @ np.asarray(a), b_ref @ a_ref, atol=1e-6)
    else:
        assert np.mean(np.abs(deq - deq_ref) > 1e-5) < 5e-3
    if iters == 1:  # round 1 = plain QLoRA's base + the SVD of its quantization error (closed form)
        plain = quantize_jit(jnp.asarray(w), double_quant=False)
        np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(plain.packed))
        s = np.linalg.svd(w.astype(np.float64) - np.asarray(dequantize_4bit(plain, jnp.float32)), compute_uv=False)
        np.testing.assert_allclose(error, np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)


def smollm2_down_proj() -> np.ndarray:
    """Rows 0-255, columns 0-767 of ``model.layers.0.mlp.down_proj.weight`` [576, 1536] of the
    built-in SmolLM2-135M (its GGUF values, decoded: a real trained weight, on a coarse grid)."""
    import gguf

    reader = open_gguf(resolve_builtin("smollm2-135m-instruct"))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    w = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
    return np.ascontiguousarray(w[:256, :768])


quantize_jit = jax.jit(quantize_4bit, static_argnames=("quant_type", "blocksize", "double_quant"))


@pytest.mark.parametrize("which", ["smollm2", "heavy", "gaussian"])
def test_quantization_error_after_init(which):
    """||W - (deq(Q) + s B A)||_F with the model's NF4 + double quantization, r=16, alpha=32:
    QPiSSA and LoftQ (every round) below plain QLoRA, LoftQ non-increasing over rounds 1-5 and its
    first round equal to the closed form (Eckart-Young on plain QLoRA's quantization error)."""
    rng = np.random.default_rng(4)
    w = {"smollm2": smollm2_down_proj, "heavy": lambda: heavy_weight(256, 768, seed=3),
         "gaussian": lambda: rng.normal(0, 0.02, (256, 768)).astype(np.float32)}[which]()
    r, scale = 16, 2.0
    plain_q = quantize_jit(jnp.asarray(w))
    plain = lora_init.quantization_error(w, plain_q)
    residual, a, b = lora_init.pissa_factors(w, r, scale)
    pissa = lora_init.quantization_error(w, quantize_jit(residual), a, b, scale)
    loftq = []
    lora_init.loftq_factors(w, r, scale, iters=5,
                            on_round=lambda i, q, a, b: loftq.append(lora_init.quantization_error(w, q, a, b, scale)))
    print(f"\n{which} {w.shape}: ||W||_F={np.linalg.norm(w):.4f} plain QLoRA {plain:.5f}  QPiSSA {pissa:.5f}  "
          f"LoftQ rounds 1-5 {' '.join(f'{e:.5f}' for e in loftq)}")
    s = np.linalg.svd(w.astype(np.float64) - np.asarray(dequantize_4bit(plain_q, jnp.float32)), compute_uv=False)
    np.testing.assert_allclose(loftq[0], np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)
    assert pissa < plain and max(loftq) < plain
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(loftq, loftq[1:]))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny float32 LLaMA whose linears have a decaying spectrum (random weights are flat)."""
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny"), gguf_tokenizer(resolve_builtin("smollm2-135m-instruct")))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    for i, (name, value) in enumerate(sorted(tensors.items())):
        if "proj" in name:
            tensors[name] = heavy_weight(*value.shape, seed=10 + i) if value.shape[0] <= value.shape[1] else \
                heavy_weight(*value.shape[::-1], seed=10 + i).T.copy()
    save_file(tensors, str(d / "model.safetensors"))
    return d


def logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)), np.float32)


@pytest.mark.slow  # five tiny-model loads (~30-120 s on the shared 2-core CPU)
def test_loader_stores_the_residual_and_preserves_the_output(tiny_dir):
    """build_model with init="pissa" (float base): every adapted linear's stored base is W - s B A
    and its adapters pissa_factors' (from the same W); the model's output equals the base model's.
    With NF4, LoftQ's stored codes are loftq_factors' own, and the initial logits of QPiSSA and
    LoftQ are closer to the float model's than plain QLoRA's."""
    from safetensors.numpy import load_file

    weights = load_file(str(tiny_dir / "model.safetensors"))
    base, _ = load_model(tiny_dir, quantize=None, with_tokenizer=False)
    reference = logits(base)
    lora = LoraConfig(r=4, alpha=8.0, init="pissa")
    model, _ = load_model(tiny_dir, quantize=None, lora=lora, with_tokenizer=False)
    np.testing.assert_allclose(logits(model), reference, atol=1e-4)
    for view in model.iter_linears():
        residual, a, b = lora_init.pissa_factors(weights[view.hf_name + ".weight"], 4, 2.0)
        np.testing.assert_allclose(view.base_weight(), residual, atol=1e-6)
        np.testing.assert_allclose(view.lora_a(), a, atol=1e-6)
        np.testing.assert_allclose(view.lora_b(), b, atol=1e-6)

    loftq = LoraConfig(r=4, alpha=8.0, init="loftq", loftq_iter=3)
    model_loftq, _ = load_model(tiny_dir, quantize="nf4", lora=loftq, with_tokenizer=False)
    view = next(v for v in model_loftq.iter_linears() if v.hf_name == "model.layers.1.mlp.up_proj")
    q, a, _ = lora_init.loftq_factors(weights[view.hf_name + ".weight"], 4, 2.0, iters=3)
    stored = view.linear.weight.get_value()
    assert isinstance(stored, Quant4bit)
    np.testing.assert_array_equal(np.asarray(stored.packed[1]).reshape(-1), np.asarray(q.packed).reshape(-1))
    np.testing.assert_allclose(view.lora_a(), a, atol=1e-6)

    gaps = {"loftq": float(np.abs(logits(model_loftq) - reference).max())}
    for init in ("gaussian", "pissa"):
        m, _ = load_model(tiny_dir, quantize="nf4", lora=LoraConfig(r=4, alpha=8.0, init=init), with_tokenizer=False)
        gaps[init] = float(np.abs(logits(m) - reference).max())
    print(f"\nmax |logits - float logits| at init, NF4+DQ: {gaps}")
    assert gaps["loftq"] < gaps["gaussian"] and gaps["pissa"] < gaps["gaussian"]


@pytest.mark.slow  # a model load, an export and transformers + peft (~30-120 s on the shared 2-core CPU)
def test_peft_export_for_the_original_base(tiny_dir, tmp_path):
    """A trained PiSSA model (adapters moved off their init) exported as PEFT: loaded by peft onto
    the *original* transformers model it reproduces our logits (rank 2r, B A - B0 A0); the raw
    adapter (run/adapter) carries init="pissa", so our own reload rebuilds the residual base (and
    peft, seeing init_lora_weights="pissa", re-runs PiSSA on the float base it loads onto)."""
    lora = LoraConfig(r=4, alpha=8.0, init="pissa")
    model, _ = load_model(tiny_dir, quantize=None, lora=lora, with_tokenizer=False)
    rng = np.random.default_rng(0)
    for view in model.iter_linears():
        for var in (view.linear.lora_a, view.linear.lora_b):
            value = var.get_value()
            var.set_value(value + jnp.asarray(rng.normal(0, 0.05, value.shape), value.dtype))
    ours = logits(model)
    workdir = tmp_path / "run"
    save_peft_adapter(model, workdir / "adapter", base_model=str(tiny_dir))
    (workdir / "summary.json").write_text(json.dumps({"model": str(tiny_dir), "quantize": None}))
    assert json.loads((workdir / "adapter/adapter_config.json").read_text())["init_lora_weights"] == "pissa"

    reloaded, _ = run_dir.load_run_model(run_dir.read_run(workdir), with_tokenizer=False)
    np.testing.assert_allclose(logits(reloaded), ours, atol=1e-4)

    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        float_logits = original(torch.tensor(IDS)).logits.numpy()
        raw = peft.PeftModel.from_pretrained(original, workdir / "adapter").eval()(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(ours, raw, atol=1e-4)

    out = export_lib.export(workdir, "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16.0, True)
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(original, out).eval()(torch.tensor(IDS)).logits.numpy()
    assert np.abs(ours - float_logits).max() > 1e-2  # the adapters did move
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_config_errors_name_the_key():
    from qlora_jax.train.config import ConfigError, validate_config

    for overrides, key in (({"lora.init": "pissa_fast"}, "config.lora.init='pissa_fast'"),
                           ({"lora.init": "loftq", "model.quantize": "none"}, "config.lora.init='loftq' needs"),
                           ({"lora.init": "pissa", "lora.use_dora": True}, "cannot be combined"),
                           ({"lora.loftq_iter": 0}, "config.lora.loftq_iter=0")):
        c = sft_config.get_config()
        c.data.train = "x.jsonl"
        for k, v in overrides.items():
            section, leaf = k.split(".")
            c[section][leaf] = v
        with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
            validate_config(c)


@pytest.mark.slow  # a whole trainer run (~30-120 s on the shared 2-core CPU)
def test_trainer_starts_from_pissa(tiny_dir, tmp_path):
    """A short NF4 run with lora.init="pissa": the loss falls, and the trained adapters are the
    PiSSA factors of the base moved by training (B far from the B = 0 of a plain start)."""
    from safetensors.numpy import load_file

    from qlora_jax.train.trainer import run

    c = sft_config.get_config()
    c.workdir = str(tmp_path / "run")
    c.model.source = str(tiny_dir)
    c.data.train = str(REPO / "data/sft_demo/train.jsonl")
    c.data.eval = str(REPO / "data/sft_demo/eval.jsonl")
    c.data.max_eval_examples = 4
    c.data.max_length = 64
    c.train.batch_size, c.train.grad_accum, c.train.max_steps, c.train.checkpoint_every = 2, 1, 4, 4
    c.train.generate_eval = 0
    c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.init = 4, 8.0, 0.0, "pissa"
    c.optim.lr, c.optim.warmup_ratio = 1e-3, 0.0
    result = run(c)
    assert result["eval_after"]["loss"] < result["eval_before"]["loss"]
    adapter = tmp_path / "run/adapter"
    assert run_dir.lora_config_from_peft(adapter).init == "pissa"
    trained = load_file(str(adapter / "adapter_model.safetensors"))
    weights = load_file(str(tiny_dir / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    _, _, b0 = lora_init.pissa_factors(weights[name + ".weight"], 4, 2.0)
    b = trained[f"base_model.model.{name}.lora_B.weight"]
    b0 = aligned(np.asarray(b0), b, 0)
    assert np.linalg.norm(b - b0) < 0.2 * np.linalg.norm(b0)

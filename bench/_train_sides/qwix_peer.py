"""The JAX peer: google/qwix QLoRA on google-tunix's Llama3 NNX model, as tunix uses it.

* Model: ``tunix.models.llama3.model.Llama3`` with SmolLM2's dimensions (read from the model
  directory's config.json), weights loaded by tunix's own
  ``tunix.models.llama3.params.create_model_from_safe_tensors``.
* Two facts of tunix 0.1.7's Llama3 are handled explicitly: ``Attention.block`` calls
  ``apply_rope`` without ``rope_theta``, so the model always uses 1e6 whatever its config says
  (SmolLM2: 1e5) -- the module-level ``apply_rope`` is rebound here to pass the config's value;
  and ``MLP`` initializes its kernels to zeros -- the loader overwrites them, and this side
  checks that every MLP kernel is non-zero after loading.
* QLoRA: ``qwix.LoraProvider(module_path=<the seven projections>, rank=r, alpha=alpha,
  weight_qtype="nf4", tile_size=64)`` + ``qwix.apply_lora_to_model`` with the model's own dummy
  input, like ``tunix.cli.utils.model.apply_lora_to_model`` (plus explicit ``rngs``). qwix has no
  double quantization: its NF4 scales stay in the compute dtype.
* Step: tunix's ``PeftTrainer._train_step`` with its default loss
  (``tunix.sft.peft_trainer._default_loss_fn``, all-ones input mask, ``make_causal_attn_mask``):
  ``nnx.value_and_grad`` over ``nnx.DiffState(0, nnx.LoRAParam)``, ``optax.global_norm``, and
  ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam).update``. tunix wraps it in ``nnx.jit`` with
  the optimizer donated; here the same function is split into (trainable: LoRA params +
  optimizer state, frozen: the rest) and wrapped in ``jax.jit`` with the trainable part donated,
  which compiles the same computation and gives the compiled object whose
  ``memory_analysis()`` we report.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    spec = common.read_spec()
    log = common.log("qwix")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import qwix
    from flax import nnx
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    device = jax.devices()[0]
    dtype_name = common.jax_dtype_name(spec, device.platform)
    dtype = jnp.dtype(dtype_name)
    hf = common.model_config(spec)
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    config = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=d,
        hidden_dim=hf["intermediate_size"], num_heads=h, head_dim=hf.get("head_dim") or d // h,
        num_kv_heads=hf.get("num_key_value_heads") or h, rope_theta=hf["rope_theta"],
        norm_eps=hf["rms_norm_eps"], weight_tying=bool(hf.get("tie_word_embeddings", False)),
        remat_config=llama3.RematConfig.NONE,
    )
    # tunix 0.1.7: Attention.block calls apply_rope(x, pos, head_dim=...) and so always gets the
    # default rope_theta=1e6. Bind the model's own value.
    llama3.apply_rope = functools.partial(llama3.apply_rope, rope_theta=config.rope_theta)

    t0 = time.perf_counter()
    model = llama3_params.create_model_from_safe_tensors(spec["model_dir"], config, mesh=None, dtype=dtype)
    for i, layer in enumerate(model.layers):  # tunix zero-initializes MLP kernels: make sure they loaded
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not np.any(np.asarray(getattr(layer.mlp, name).kernel.value)):
                raise RuntimeError(f"layers.{i}.mlp.{name}.kernel is all zeros after loading")
    provider = qwix.LoraProvider(
        module_path="|".join(f".*{p}" for p in common.PROJECTIONS), rank=spec["r"], alpha=spec["alpha"],
        weight_qtype="nf4", tile_size=64)
    model = qwix.apply_lora_to_model(model, provider, **model.get_model_input(), rngs=nnx.Rngs(0))
    tx = optax.chain(optax.clip_by_global_norm(spec["max_grad_norm"]),
                     optax.adamw(spec["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=spec["weight_decay"]))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    load_s = time.perf_counter() - t0
    rss_after_load = common.rss_mib()
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    log(f"loaded + quantized in {load_s:.1f} s ({dtype_name}); RSS {rss_after_load:.0f} MiB; {n_trainable:,} trainable")

    def train_step(model, optimizer, inputs):  # tunix PeftTrainer._train_step
        grad_fn = nnx.value_and_grad(peft_trainer._default_loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
        loss, grads = grad_fn(model, **inputs)
        grad_norm = optax.global_norm(grads)
        optimizer.update(model, grads)
        return loss, grad_norm

    trainable = nnx.Any(nnx.LoRAParam, nnx.OptState)
    graphdef, train_state, frozen = nnx.split((model, optimizer), trainable, ...)
    del model, optimizer

    def pure_step(train_state, frozen, inputs):
        model, optimizer = nnx.merge(graphdef, train_state, frozen)
        loss, grad_norm = train_step(model, optimizer, inputs)
        return nnx.state((model, optimizer), trainable), loss, grad_norm

    ids = jnp.asarray(common.tokens(spec))
    input_mask = jnp.ones(ids.shape, jnp.bool_)
    inputs = {"input_tokens": ids, "input_mask": input_mask,
              "positions": sft_utils.build_positions_from_mask(input_mask),
              "attention_mask": sft_utils.make_causal_attn_mask(input_mask)}

    # Committed to the device like the step's outputs, so that step 1 (fed step 0's outputs) hits
    # the compiled step instead of compiling it again for committed arguments.
    train_state, frozen, inputs = jax.device_put((train_state, frozen, inputs), device)

    t0 = time.perf_counter()
    # Called through jit's dispatch, as nnx.jit does: jax keeps qwix's uint4 codes one per byte on
    # CPU, and the AOT-compiled object (which wants packed 4-bit arguments) rejects them; the
    # dispatch path finds the executable compiled here in its cache (step 0 does not recompile).
    jitted = jax.jit(pure_step, donate_argnums=(0,))
    compiled = jitted.lower(train_state, frozen, inputs).compile()
    compile_s = time.perf_counter() - t0
    memory = common.jax_memory(compiled)
    log(f"compiled in {compile_s:.1f} s; args+temp {memory.get('args_plus_temp_bytes', 0) / 2**20:.0f} MiB")

    state = {"train": train_state}

    def step() -> float:
        state["train"], loss, _ = jitted(state["train"], frozen, inputs)
        return float(loss)

    timing = common.run_steps(step, warmup=spec["warmup"], steps=spec["steps"], log=log)
    import importlib.metadata as md

    common.finish(spec, {
        "side": "qwix", "impl": "tunix Llama3 + qwix LoraProvider(weight_qtype=nf4, tile_size=64)",
        "platform": device.platform, "device": device.device_kind, "dtype": dtype_name, "jax": jax.__version__,
        "qwix": md.version("qwix"), "tunix": md.version("google-tunix"), "flax": md.version("flax"),
        "trainable_params": n_trainable, "load_s": load_s, "rss_after_load_mib": rss_after_load,
        "compile_s": compile_s, "memory": memory, **timing,
    })


if __name__ == "__main__":
    main()

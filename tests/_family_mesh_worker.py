"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices: the tiny Phi-3 (fused
qkv / gate_up) and Qwen3-MoE (experts sharded over fsdp) models of tests/test_phi3.py and
tests/test_moe.py, NF4 + LoRA with random non-zero adapters, built on a (data 2, fsdp 2, tensor 2)
mesh and on one device: the loss and the LoRA gradients of each. Prints one JSON line."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import test_moe  # noqa: E402
import test_phi3  # noqa: E402

from qlora_jax.lora import LoraConfig, split_model  # noqa: E402
from qlora_jax.models import QuantConfig, build_model  # noqa: E402
from qlora_jax.models.layers import activation_sharding  # noqa: E402
from qlora_jax.objectives.sft import nll_sums  # noqa: E402
from qlora_jax.train import sharding  # noqa: E402


def _batch(ids: np.ndarray) -> dict:
    ids = jnp.asarray(np.tile(ids, (2, 1)))  # 4 rows: one per (data, fsdp) shard
    t = ids.shape[1]
    return dict(input_ids=ids, positions=jnp.broadcast_to(jnp.arange(t), ids.shape), segment_ids=jnp.ones_like(ids),
                targets=jnp.roll(ids, -1, axis=1), loss_mask=jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0))


def _int_sort_sizes(hlo: str) -> list[int]:
    """Element counts per device of the compiled step's sorts with s32 keys: the MoE block's
    argsort of token-expert assignments by expert (top-k and the loss sort floats, if at all)."""
    sizes = set()
    for m in re.finditer(r"= \(?s32\[([\d,]*)\][^=]*? sort\(", hlo):
        sizes.add(int(np.prod([int(d) for d in m.group(1).split(",") if d])))
    return sorted(sizes)


def _run(cfg: dict, tensors, lora: LoraConfig, linears, batch: dict, mesh) -> dict:
    kw = dict(quant=QuantConfig("nf4", 64, True), lora=lora, dtype=jnp.float32)
    out = {}
    for name, m_mesh in (("single", None), ("2x2x2", mesh)):
        extra = dict(mesh=m_mesh, shardings=sharding.param_sharding_fn(m_mesh)) if m_mesh is not None else {}
        model = build_model(cfg, tensors, **kw, **extra)
        rng = np.random.default_rng(1)
        for linear in linears(model):
            for var in (linear.lora_a, linear.lora_b):
                v = var.get_value()
                var.set_value(jax.device_put(jnp.asarray(rng.normal(0.0, 0.1, v.shape), v.dtype), v.sharding))
        graphdef, ls, rest = split_model(model)
        ctx = functools.partial(activation_sharding, m_mesh) if m_mesh is not None else contextlib.nullcontext

        def loss(ls, graphdef=graphdef, rest=rest, ctx=ctx):
            with ctx():
                s, n = nll_sums(graphdef, ls, rest, batch, router_aux=bool(cfg.get("output_router_logits")))
                return s / n
        compiled = jax.jit(jax.value_and_grad(loss)).lower(ls).compile()
        value, grads = compiled(ls)
        out[name] = dict(loss=float(value), grads=[np.asarray(g) for g in jax.tree.leaves(grads)],
                         int_sorts=_int_sort_sizes(compiled.as_text()))
        if m_mesh is not None:
            out["sharded_specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(rest) if hasattr(x, "sharding")
                                           and any(a is not None for a in x.sharding.spec)})
    out["sort_sizes"] = {k: out[k]["int_sorts"] for k in ("single", "2x2x2")}
    g1, g2 = out["single"]["grads"], out["2x2x2"]["grads"]
    rel = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30)) for a, b in zip(g1, g2))
    return dict(loss_single=out["single"]["loss"], loss_mesh=out["2x2x2"]["loss"], grad_rel=rel,
                n_grads=len(g1), max_grad=max(float(np.max(np.abs(a))) for a in g1),
                sharded_specs=out["sharded_specs"], sort_sizes=out["sort_sizes"])


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh(2, 2, 2)
    result = {}
    phi_lora = LoraConfig(r=4, alpha=8.0, targets="all-linear")
    result["phi3"] = _run(test_phi3.CFG, test_phi3.tensors_of(test_phi3.REFERENCE), phi_lora,
                          lambda m: [m.layers.self_attn.qkv_proj, m.layers.mlp.gate_up_proj, m.layers.mlp.down_proj],
                          _batch(test_phi3.IDS), mesh)
    reference, cfg = test_moe.REFS[False]
    moe_lora = LoraConfig(r=4, alpha=8.0, targets=("q_proj", "o_proj"), target_parameters=test_moe.EXPERT_PARAMS)
    result["qwen3_moe"] = _run(dict(cfg, output_router_logits=True), test_moe.tensors_of(reference), moe_lora,
                               lambda m: [m.layers.self_attn.q_proj, m.layers.mlp.experts.gate_up_proj,
                                          m.layers.mlp.experts.down_proj], _batch(test_moe.IDS), mesh)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

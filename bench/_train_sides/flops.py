"""Analytic FLOPs of one QLoRA training step of a LLaMA-type decoder ("model FLOPs").

One function for every side of ``bench/train_step.py``: the three sides train the same model
with the same LoRA, batch and sequence, so they get the same count, and "% of the matmul
ceiling" compares them fairly. A multiply-add counts 2 FLOPs. Per token, with ``d`` hidden,
``f`` intermediate, ``H``/``K`` query/key-value heads of size ``hd``, ``V`` vocabulary, ``L``
layers, sequence length ``S``, LoRA rank ``r``, and the seven projections ``(in, out)``:
q ``(d, H·hd)``, k and v ``(d, K·hd)``, o ``(H·hd, d)``, gate and up ``(d, f)``, down ``(f, d)``;
``P = Σ in·out`` (frozen weights of one layer) and ``R = Σ (in + out)`` over the adapted ones:

    frozen linears   forward 2·P      backward 2·P   (input gradient only: no weight gradient)
    LoRA             forward 2·r·R    backward 4·r·R (dB, d(xAᵀ), dA, dx)
    attention        forward 4·S·H·hd (QKᵀ and PV over the full S×S square, as the dense masked
                     kernels compute it; not halved for causality, as PaLM's 6N + 12·L·H·hd·S)
                     backward 8·S·H·hd (dQ, dK, dV, dP)
    lm_head          forward 2·V·d    backward 2·V·d (frozen: input gradient only)

    per token = L·(4·P + 6·r·R + 12·S·H·hd) + 4·V·d,   per step = per token · batch · S.

Not counted (all O(elements) or small): embedding lookup, norms, rotary, softmax, SiLU, residual
adds, the loss, NF4 dequantization, the optimizer update (~10 FLOPs per trainable parameter,
0.1 GFLOP per step here). Recomputation is not counted either (remat, the chunked loss
recomputing its logits in the backward pass): these are *model* FLOPs, what the step must do,
not what an implementation chooses to redo. The input gradient of layer 0's q/k/v (base and
LoRA) is counted although nothing upstream of it trains: a layer scan computes it, PyTorch's
autograd skips it; it is 0.2% of the total for SmolLM2-135M and reported as ``layer0_qkv_dx``.

For SmolLM2-135M (d 576, f 1536, 9/3 heads of 64, 30 layers, V 49152), r=32 on all seven
projections, S=256: 650 MFLOP per token, 665 GFLOP per step of 4 x 256 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``{projection: (in, out)}`` of one decoder layer from an HF config dict."""
    d = int(config["hidden_size"])
    f = int(config["intermediate_size"])
    h = int(config["num_attention_heads"])
    k = int(config.get("num_key_value_heads") or h)
    hd = int(config.get("head_dim") or d // h)
    return {"q_proj": (d, h * hd), "k_proj": (d, k * hd), "v_proj": (d, k * hd), "o_proj": (h * hd, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def step_flops(config: Mapping[str, Any], *, batch: int, seq: int, r: int,
               targets: tuple[str, ...] = PROJECTIONS) -> dict[str, float]:
    """FLOPs of one training step (forward + backward) and their parts, per the module docstring.

    Returns per-step figures: ``frozen_fwd``, ``frozen_bwd``, ``lora_fwd``, ``lora_bwd``,
    ``attn_fwd``, ``attn_bwd``, ``head_fwd``, ``head_bwd``, ``forward`` (sum of the ``*_fwd``),
    ``total`` (everything), ``per_token`` (= total / (batch · seq)), and ``layer0_qkv_dx``, the
    part of ``frozen_bwd + lora_bwd`` that is layer 0's q/k/v input gradient (see module docstring).
    """
    shapes = projection_shapes(config)
    n_layers = int(config["num_hidden_layers"])
    d = int(config["hidden_size"])
    h = int(config["num_attention_heads"])
    hd = int(config.get("head_dim") or d // h)
    vocab = int(config["vocab_size"])
    p = sum(i * o for i, o in shapes.values())
    big_r = sum(i + o for name, (i, o) in shapes.items() if name in targets)
    tokens = batch * seq
    parts = {
        "frozen_fwd": n_layers * 2 * p,
        "frozen_bwd": n_layers * 2 * p,
        "lora_fwd": n_layers * 2 * r * big_r,
        "lora_bwd": n_layers * 4 * r * big_r,
        "attn_fwd": n_layers * 4 * seq * h * hd,
        "attn_bwd": n_layers * 8 * seq * h * hd,
        "head_fwd": 2 * vocab * d,
        "head_bwd": 2 * vocab * d,
    }
    out = {k: float(v * tokens) for k, v in parts.items()}
    out["forward"] = sum(v for k, v in out.items() if k.endswith("_fwd"))
    out["total"] = sum(v for k, v in out.items() if k.endswith(("_fwd", "_bwd")))
    out["per_token"] = out["total"] / tokens
    qkv = [shapes[p] for p in ("q_proj", "k_proj", "v_proj")]
    out["layer0_qkv_dx"] = float(tokens * sum(2 * i * o + (2 * r * i if name in targets else 0)
                                              for name, (i, o) in zip(("q_proj", "k_proj", "v_proj"), qkv)))
    return out

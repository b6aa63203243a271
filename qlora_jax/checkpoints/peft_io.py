"""Adapters in PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are ``base_model.model.<module>.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]), with DoRA also ``...lora_magnitude_vector`` ([out], ``use_dora: true`` in the
config), ``<module>`` the transformers module name (``model.layers.3.self_attn.q_proj``), so
``peft.PeftModel.from_pretrained(transformers_model, dir)`` loads them. ``target_modules`` lists
the adapted projection names, ``layers_to_transform`` the adapted layers when not all are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from qlora_jax.lora import peft_adapter_tensors
from qlora_jax.lora_init import changes_base
from qlora_jax.models import moe

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def save_peft_adapter(model, out_dir: str | os.PathLike, *, base_model: str = "",
                      initial: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT LoRA adapter directory; returns the directory.

    PiSSA / LoftQ (``lora.init``): the adapters belong to the *residual* base the model was built
    with. Without ``initial`` they are written as they are, with ``init_lora_weights`` naming the
    init (so :func:`lora_config_from_peft` rebuilds the same residual base). With ``initial`` (the
    adapters right after init, ``peft_adapter_tensors`` names) they are converted for the
    *original* base, as peft's ``path_initial_model_for_weight_conversion`` does:
    ``s B A - s B0 A0`` = a rank-2r LoRA ``[B, -B0] @ [A; A0]``, ``lora_alpha`` raised so the
    scale stays ``s``.
    """
    lora = model.lora_config
    if lora is None:
        raise ValueError("the model has no LoRA adapters to save")
    rank, alpha, init_weights = lora.r, lora.alpha, True
    if changes_base(lora.init) and initial is None:
        init_weights = lora.init
    out = Path(out_dir)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in peft_adapter_tensors(model, _PREFIX).items()}
    expert_params = moe.adapted_params(model)  # MoE experts: peft's target_parameters (models/moe.py)
    tensors.update({k: np.ascontiguousarray(v) for k, v in moe.peft_expert_tensors(model, _PREFIX).items()})
    if changes_base(lora.init) and initial is not None:
        tensors = _relative_to_original(tensors, initial)
        rank, alpha = 2 * lora.r, alpha * (2 ** 0.5 if lora.use_rslora else 2)
    adapted = [v for v in model.iter_linears() if v.adapted]
    projections = sorted({v.proj for v in adapted})
    layers = sorted({v.layer for v in adapted})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
        "target_modules": projections,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": init_weights,
        "modules_to_save": None,
    }
    if expert_params:
        config["target_parameters"] = [f"mlp.experts.{p}" for p in expert_params]
    if init_weights == "loftq":
        config["loftq_config"] = {"loftq_bits": 4, "loftq_iter": lora.loftq_iter}
    if len(layers) != model.config.num_hidden_layers:
        config["layers_to_transform"] = layers
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _relative_to_original(tensors: dict[str, np.ndarray], initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rank-2r adapters ``A' = [A; A0]`` [2r, in], ``B' = [B, -B0]`` [out, 2r] (``B' A' = B A - B0 A0``)."""
    out = {}
    for key, value in tensors.items():
        if key not in initial:
            raise ValueError(f"initial adapters lack {key!r}")
        if key.endswith(".lora_A.weight"):
            out[key] = np.concatenate([value, initial[key]], axis=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = np.concatenate([value, -initial[key]], axis=1)
        else:
            raise ValueError(f"cannot convert {key!r} to the original base")
    return out


def load_peft_adapter(model, adapter_dir: str | os.PathLike) -> None:
    """Set ``model``'s adapter values from a PEFT adapter directory (in place).

    The adapter's r, lora_alpha, use_rslora and use_dora must equal the model's LoRA config, and
    every adapted linear of the model must have its tensors (two, three with DoRA): a clear error
    names what differs.
    """
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir}")
    cfg = json.loads(cfg_path.read_text())
    lora = model.lora_config
    if lora is None:
        raise ValueError("the model has no LoRA adapters to load into")
    diffs = [f"{k}: adapter {cfg.get(k)!r} vs model {v!r}"
             for k, v in (("r", lora.r), ("lora_alpha", lora.alpha), ("use_rslora", lora.use_rslora),
                          ("use_dora", lora.use_dora))
             if cfg.get(k, False if k in ("use_rslora", "use_dora") else None) != v]
    if diffs:
        raise ValueError(f"{cfg_path}: LoRA config differs from the model's: " + "; ".join(diffs))
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    by_linear: dict[int, tuple[Any, list]] = {}
    missing = []
    for view in model.iter_linears():
        if not view.adapted:
            continue
        ka, kb = f"{_PREFIX}{view.hf_name}.lora_A.weight", f"{_PREFIX}{view.hf_name}.lora_B.weight"
        km = f"{_PREFIX}{view.hf_name}.lora_magnitude_vector"
        if ka not in tensors or kb not in tensors or (lora.use_dora and km not in tensors):
            missing.append(view.hf_name)
            continue
        entry = by_linear.setdefault(id(view.linear), (view.linear, []))
        entry[1].append((view.layer, tensors[ka], tensors[kb], tensors.get(km) if lora.use_dora else None))
    expert_params = moe.adapted_params(model)
    experts = model.layers.mlp.experts if expert_params else None
    expert_values = {p: [np.array(getattr(getattr(experts, p), k).get_value(), np.float32) for k in ("lora_a", "lora_b")]
                     for p in expert_params}
    # peft nests one wrapper per target parameter in its config's order: that order names the keys.
    order = tuple(dict.fromkeys(p for t in cfg.get("target_parameters") or () for p in moe.EXPERT_PARAMS
                                if t.endswith(p)))
    missing += [f"mlp.experts.{p} (not in the adapter's target_parameters)" for p in expert_params if p not in order]
    for layer in range(model.config.num_hidden_layers if expert_params else 0):
        keys = moe.peft_keys(layer, order)
        for p, module in ((p, keys[p]) for p in expert_params if p in keys):
            ka, kb = f"{_PREFIX}{module}.lora_A.weight", f"{_PREFIX}{module}.lora_B.weight"
            if ka not in tensors or kb not in tensors:
                missing.append(f"model.layers.{layer}.mlp.experts.{p}")
                continue
            a, b = moe.from_peft(tensors[ka], tensors[kb], model.config.num_experts)
            for arr, t in zip(expert_values[p], (a, b)):
                if arr[layer].shape != t.shape:
                    raise ValueError(f"adapter tensor {ka if t is a else kb} of shape {t.shape} does not fit "
                                     f"(expected {arr[layer].shape})")
                arr[layer] = t
    if missing:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS} lacks adapters for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    for p, arrays in expert_values.items():
        linear = getattr(experts, p)
        for var, arr in zip((linear.lora_a, linear.lora_b), arrays):
            var.set_value(_like(var.get_value(), arr))
    for linear, items in by_linear.values():
        variables = [linear.lora_a, linear.lora_b] + ([linear.lora_magnitude] if lora.use_dora else [])
        arrays = [np.array(v.get_value(), np.float32) for v in variables]
        for layer, *tensors_of_layer in items:
            for arr, t in zip(arrays, tensors_of_layer):
                if arr[layer].shape != t.shape:
                    raise ValueError(f"adapter tensor of shape {t.shape} does not fit layer {layer} "
                                     f"(expected {arr[layer].shape})")
                arr[layer] = t
        for var, arr in zip(variables, arrays):
            var.set_value(_like(var.get_value(), arr))


def _like(ref: jax.Array, values: np.ndarray) -> jax.Array:
    out = jnp.asarray(values, ref.dtype)
    sharding = getattr(ref, "sharding", None)
    return jax.device_put(out, sharding) if sharding is not None else out


__all__ = ["load_peft_adapter", "save_peft_adapter"]

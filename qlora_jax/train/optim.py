"""Optimizer and learning-rate schedule (optax), seed 000's defaults.

AdamW (lr 2e-3, weight decay 0.01), clipping to global norm 0.3, linear warm-up over 30% of
the steps then cosine decay to 0 — the schedule transformers' Trainer calls
``get_cosine_schedule_with_warmup`` (warm-up steps = ceil(ratio * total)).

LoRA+ (Hayou et al. 2024; peft's ``create_loraplus_optimizer``): with ``loraplus_lr_ratio > 0``
the ``lora_b`` matrices get their own AdamW with the learning rate (and so the decoupled decay)
scaled by the ratio, the ``lora_a`` matrices the plain one; clipping stays global over both.
DoRA's magnitudes go with ``lora_b``, as peft puts every 1-D adapter parameter in that group.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio))


def learning_rate_schedule(
    *, lr: float, total_steps: int, warmup_ratio: float, schedule: str = "cosine"
) -> optax.Schedule:
    """Per-optimizer-step learning rate. ``schedule``: "cosine" | "linear" | "constant"."""
    warm = warmup_steps(total_steps, warmup_ratio)
    decay = max(total_steps - warm, 1)

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        up = step / max(warm, 1)
        progress = jnp.clip((step - warm) / decay, 0.0, 1.0)
        if schedule == "cosine":
            down = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif schedule == "linear":
            down = 1.0 - progress
        elif schedule == "constant":
            down = jnp.ones_like(progress)
        else:
            raise ValueError(f"optim.schedule must be cosine, linear or constant, got {schedule!r}")
        return lr * jnp.where(step < warm, up, down)

    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule must be cosine, linear or constant, got {schedule!r}")
    return fn


def make_optimizer(
    *,
    lr: float,
    total_steps: int,
    warmup_ratio: float = 0.3,
    schedule: str = "cosine",
    weight_decay: float = 0.01,
    max_grad_norm: float = 0.3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    loraplus_lr_ratio: float = 0.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm -> AdamW with the schedule (LoRA+: two AdamW, see the module docstring).
    Returns (transformation, the schedule of the ``lora_a`` / single group)."""
    sched = learning_rate_schedule(lr=lr, total_steps=total_steps, warmup_ratio=warmup_ratio,
                                   schedule=schedule)
    parts = []
    if max_grad_norm and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    adamw = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if loraplus_lr_ratio > 0:
        def sched_b(step):
            return loraplus_lr_ratio * sched(step)

        adamw_b = optax.adamw(sched_b, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        adamw = optax.multi_transform({"a": adamw, "b": adamw_b}, lora_groups)
    parts.append(adamw)
    return optax.chain(*parts), sched


LORAPLUS_B_LEAVES = ("lora_b", "lora_magnitude")  # peft: "lora_B" in name or a 1-D parameter


def lora_groups(params):
    """"b" for every ``lora_b`` (and DoRA ``lora_magnitude``) leaf of an adapter tree, "a" for the
    rest (LoRA+'s groups)."""
    def group(path, _):
        names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
        return "b" if names & set(LORAPLUS_B_LEAVES) else "a"

    return jax.tree_util.tree_map_with_path(group, params)

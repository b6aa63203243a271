"""Optimizer and learning-rate schedule (optax), seed 000's defaults.

AdamW (lr 2e-3, weight decay 0.01), clipping to global norm 0.3, linear warm-up over 30% of
the steps then cosine decay to 0 — the schedule transformers' Trainer calls
``get_cosine_schedule_with_warmup`` (warm-up steps = ceil(ratio * total)).
"""

from __future__ import annotations

import math

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
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm -> AdamW with the schedule. Returns (transformation, schedule)."""
    sched = learning_rate_schedule(lr=lr, total_steps=total_steps, warmup_ratio=warmup_ratio,
                                   schedule=schedule)
    parts = []
    if max_grad_norm and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), sched

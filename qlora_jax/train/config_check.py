"""Checks of a training config that ml_collections' own typing does not cover.

ml_collections already rejects an unknown key (``--config.optim.lrr``) and a value of the wrong
type on the command line; these checks name the key of a value that is the right type but wrong.
"""

from __future__ import annotations

from ml_collections import ConfigDict

CHOICES = {
    "model.quantize": ("nf4", "fp4", "none"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "lora.init": ("gaussian", "peft"),
    "data.format": ("auto", "alpaca", "chat", "prompt_completion"),
    "optim.schedule": ("cosine", "linear", "constant"),
}
POSITIVE = ("lora.r", "train.batch_size", "train.grad_accum", "data.max_length", "train.checkpoint_every",
            "train.keep_checkpoints", "train.log_every", "model.blocksize")
FRACTIONS = ("lora.dropout", "optim.warmup_ratio")
NON_NEGATIVE = ("optim.lr", "optim.weight_decay", "optim.max_grad_norm", "lora.init_std", "train.epochs")


class ConfigError(ValueError):
    """A config value is out of range; the message names the key."""


def _get(cfg: ConfigDict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def validate_config(cfg: ConfigDict) -> None:
    errors = []
    for key, allowed in CHOICES.items():
        v = _get(cfg, key)
        if v is not None and v not in allowed:
            errors.append(f"config.{key}={v!r}: must be one of {', '.join(map(repr, allowed))}")
    for key in POSITIVE:
        v = _get(cfg, key)
        if v is not None and not v > 0:
            errors.append(f"config.{key}={v!r}: must be > 0")
    for key in FRACTIONS:
        v = _get(cfg, key)
        if v is not None and not 0 <= v < 1:
            errors.append(f"config.{key}={v!r}: must be in [0, 1)")
    for key in NON_NEGATIVE:
        v = _get(cfg, key)
        if v is not None and not v >= 0:
            errors.append(f"config.{key}={v!r}: must be >= 0")
    steps, epochs = _get(cfg, "train.max_steps"), _get(cfg, "train.epochs")
    if steps is not None and steps <= 0 and not (epochs and epochs > 0):
        errors.append("config.train.max_steps <= 0 needs config.train.epochs > 0")
    if _get(cfg, "data.train") in (None, ""):
        errors.append("config.data.train: a training file or dataset name is required")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

"""Checks of a training config that ml_collections' own typing does not cover.

ml_collections already rejects an unknown key (``--config.optim.lrr``) and a value of the wrong
type on the command line (``qlora_jax.errors.parse_absl_flags`` turns those into one line);
``validate_config`` names the key of a value that is the right type but wrong, and
``check_inputs`` checks the files and directories a run reads and writes, before the model loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from ml_collections import ConfigDict

from qlora_jax.dpo import LOSS_TYPES
from qlora_jax.errors import UserError, check_output_dir
from qlora_jax.models.config import REMAT_POLICIES

CHOICES = {
    "objective": ("sft", "dpo"),
    "dpo.loss_type": LOSS_TYPES,
    "dpo.reference": ("auto", "base", "init"),
    "model.quantize": ("nf4", "fp4", "none"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": REMAT_POLICIES,
    "lora.init": ("gaussian", "peft"),
    "data.format": ("auto", "alpaca", "chat", "prompt_completion"),
    "optim.schedule": ("cosine", "linear", "constant"),
}
POSITIVE = ("dpo.beta", "lora.r", "train.batch_size", "train.grad_accum", "data.max_length", "train.checkpoint_every",
            "train.keep_checkpoints", "train.log_every", "model.blocksize")
FRACTIONS = ("lora.dropout", "optim.warmup_ratio")
NON_NEGATIVE = ("optim.lr", "optim.weight_decay", "optim.max_grad_norm", "lora.init_std", "train.epochs",
                "train.early_stopping_patience")


class ConfigError(UserError):
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
    errors += _objective_errors(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _objective_errors(cfg: ConfigDict) -> list[str]:
    """Settings that only make sense for one objective, and DPO's own ranges."""
    errors = []
    objective = _get(cfg, "objective") or "sft"
    patience = _get(cfg, "train.early_stopping_patience") or 0
    if objective != "dpo":
        if patience:
            errors.append("config.train.early_stopping_patience: early stopping (on held-out reward accuracy) "
                          "is implemented for objective='dpo' only")
        return errors
    if _get(cfg, "dpo.beta") is None:
        errors.append("config.objective='dpo' needs a config.dpo section (beta, loss_type, label_smoothing, reference)")
        return errors
    loss_type, eps = _get(cfg, "dpo.loss_type"), _get(cfg, "dpo.label_smoothing") or 0.0
    if not 0 <= eps < 0.5:
        errors.append(f"config.dpo.label_smoothing={eps!r}: must be in [0, 0.5)")
    elif eps and loss_type != "robust":
        errors.append(f"config.dpo.label_smoothing={eps!r} has no effect with loss_type={loss_type!r} "
                      "(trl 1.16 uses it for 'robust' only); use loss_type='robust' or set it to 0")
    if _get(cfg, "dpo.reference") == "init" and not _get(cfg, "model.init_from"):
        errors.append("config.dpo.reference='init' needs config.model.init_from (the adapters to freeze)")
    if _get(cfg, "data.pack"):
        errors.append("config.data.pack: packing is not supported with objective='dpo' (one sequence per row)")
    if (_get(cfg, "data.format") or "auto") != "auto":
        errors.append("config.data.format: must be 'auto' with objective='dpo' (pairs are read from "
                      "prompt/chosen/rejected or chosen/rejected columns)")
    if patience and not (_get(cfg, "train.eval_every") and _get(cfg, "data.eval")):
        errors.append("config.train.early_stopping_patience > 0 needs config.train.eval_every > 0 and "
                      "config.data.eval")
    return errors


def check_inputs(cfg: ConfigDict) -> None:
    """Fail before the model is loaded when a local data file is missing, a directory or not a
    supported type, when ``model.init_from`` is not a run directory, or when ``workdir`` cannot
    be written (a file, read-only). Hub dataset names are left to the loader."""
    from qlora_jax.data.sources import _looks_like_path, _resolve_files

    for key in ("data.train", "data.eval"):
        source = _get(cfg, key)
        if not source:
            continue
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        if all(isinstance(p, (str, os.PathLike)) and not _looks_like_path(os.fspath(p)) for p in paths):
            continue  # a hub dataset name
        try:
            files = _resolve_files(source)
        except UserError as e:
            raise ConfigError(f"config.{key}: {e}") from e
        for f in files:
            if os.path.getsize(f) == 0:
                raise ConfigError(f"config.{key}: {f} is empty")
    init_from = _get(cfg, "model.init_from")
    if init_from and not (Path(init_from) / "checkpoints").is_dir():
        what = "does not exist" if not Path(init_from).exists() else "has no checkpoints/ directory"
        raise ConfigError(f"config.model.init_from={init_from}: {what} (expected an earlier run's workdir)")
    check_output_dir(cfg.workdir, "config.workdir")

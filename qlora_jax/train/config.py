"""A training config, checked and converted once: ``RunConfig.from_config(cfg)``.

The command line gives an ``ml_collections.ConfigDict`` (``configs/*.py`` plus ``--config.x=...``
overrides). ml_collections already rejects an unknown key (``--config.optim.lrr``) and a value of
the wrong type; :func:`validate_config` names the key of a value that is the right type but wrong
(every objective's checks, GRPO's included, are here), and :func:`check_inputs` checks the files
and directories a run reads and writes, before the model loads. :class:`RunConfig` is what the
trainer and everything below it read: frozen dataclasses with the same section and field names as
the configs, values normalised once ("none" quantization is None, targets a tuple, the LoRA
section a :class:`~qlora_jax.lora.LoraConfig`). Nothing below the trainer's entry sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from qlora_jax import lora_init
from qlora_jax.data.sources import _looks_like_path, _resolve_files
from qlora_jax.errors import UserError, check_output_dir
from qlora_jax.lora import ALL_LINEAR, LoraConfig
from qlora_jax.models.config import ATTENTION_IMPLS, QUANT_MATMUL_IMPLS, REMAT_POLICIES
from qlora_jax.objectives import grpo as grpo_lib
from qlora_jax.objectives import rewards as rewards_lib
from qlora_jax.objectives.dpo import LOSS_TYPES
from qlora_jax.objectives.kto import LOSS_TYPES as KTO_LOSS_TYPES
from qlora_jax.objectives.preference import CPO_LOSS_TYPES

OBJECTIVES = ("sft", "dpo", "orpo", "cpo", "kto", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "cpo")  # pair data, chosen and rejected rows in one batch
UNPAIRED_OBJECTIVES = ("kto",)  # labelled (prompt, completion) rows (pairs are unpaired on reading)
CHOICES = {
    "objective": OBJECTIVES,
    "dpo.loss_type": LOSS_TYPES,
    "cpo.loss_type": CPO_LOSS_TYPES,
    "kto.loss_type": KTO_LOSS_TYPES,
    "kto.reference": ("auto", "base", "init"),
    "dpo.reference": ("auto", "base", "init"),
    "model.quantize": ("nf4", "fp4", "none"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": REMAT_POLICIES,
    "model.attention_impl": ATTENTION_IMPLS,
    "model.quant_matmul_impl": QUANT_MATMUL_IMPLS,
    "lora.use_dora": (False, True),
    "data.format": ("auto", "alpaca", "chat", "prompt_completion"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.wandb_mode": ("online", "offline"),
}
POSITIVE = ("dpo.beta", "orpo.beta", "cpo.beta", "kto.beta", "lora.r", "lora.loftq_iter", "train.batch_size", "train.grad_accum", "data.max_length",
            "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "model.blocksize")
FRACTIONS = ("lora.dropout", "optim.warmup_ratio")
NON_NEGATIVE = ("optim.lr", "optim.weight_decay", "optim.max_grad_norm", "optim.loraplus_lr_ratio", "lora.init_std",
                "train.epochs", "train.early_stopping_patience", "cpo.cpo_alpha", "cpo.simpo_gamma",
                "kto.desirable_weight", "kto.undesirable_weight")


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
    """Raise :class:`ConfigError` listing every out-of-range value, one line per key."""
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
    errors += _lora_init_errors(cfg)
    if _get(cfg, "lora.target_parameters") and (_get(cfg, "lora.dropout") or _get(cfg, "lora.use_dora")
                                                 or lora_init.changes_base(_get(cfg, "lora.init") or "")):
        errors.append("config.lora.target_parameters (MoE expert adapters) needs config.lora.dropout=0, "
                      "use_dora=False and init 'peft' or 'gaussian' (as peft's target_parameters)")
    if _get(cfg, "data.train") in (None, ""):
        errors.append("config.data.train: a training file or dataset name is required")
    errors += _objective_errors(cfg)
    if _get(cfg, "objective") == "grpo":
        errors += _grpo_errors(cfg)
    if _get(cfg, "train.wandb_project") and importlib.util.find_spec("wandb") is None:
        errors.append(f"config.train.wandb_project={_get(cfg, 'train.wandb_project')!r}: Weights & Biases logging "
                      "needs the wandb package: pip install 'qlora_jax[wandb]' (or leave wandb_project empty)")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _lora_init_errors(cfg: ConfigDict) -> list[str]:
    """``lora.init``: a fixed name or "pissa_niter_K"; LoftQ needs a quantized base, neither SVD init DoRA."""
    init = _get(cfg, "lora.init")
    if init is None:
        return []
    if not isinstance(init, str) or (init not in ("gaussian", "peft") and not lora_init.changes_base(init)):
        return [f"config.lora.init={init!r}: must be one of 'gaussian', 'peft', 'pissa', 'pissa_niter_K' "
                f"(K power iterations, e.g. 'pissa_niter_4') or 'loftq'"]
    if init == "loftq" and (_get(cfg, "model.quantize") or "none") == "none":
        return ["config.lora.init='loftq' needs config.model.quantize='nf4' or 'fp4' (it fits the quantization error)"]
    if lora_init.changes_base(init) and _get(cfg, "lora.use_dora"):
        return [f"config.lora.init={init!r} cannot be combined with config.lora.use_dora=True"]
    return []


def _objective_errors(cfg: ConfigDict) -> list[str]:
    """Settings that only make sense for some objectives, and the preference objectives' own ranges."""
    errors = []
    objective = _get(cfg, "objective") or "sft"
    patience = _get(cfg, "train.early_stopping_patience") or 0
    if objective not in PREFERENCE_OBJECTIVES + UNPAIRED_OBJECTIVES:
        if patience:
            errors.append("config.train.early_stopping_patience: early stopping (on held-out reward accuracy) "
                          "is implemented for objective='dpo', 'orpo', 'cpo' or 'kto' only")
        return errors
    if _get(cfg, f"{objective}.beta") is None:
        keys = {"dpo": "beta, loss_type, label_smoothing, reference", "orpo": "beta",
                "cpo": "beta, loss_type, cpo_alpha, simpo_gamma, label_smoothing, alpha",
                "kto": "beta, loss_type, desirable_weight, undesirable_weight, reference"}[objective]
        errors.append(f"config.objective={objective!r} needs a config.{objective} section ({keys})")
        return errors
    if objective in ("dpo", "cpo"):
        loss_type, eps = _get(cfg, f"{objective}.loss_type"), _get(cfg, f"{objective}.label_smoothing") or 0.0
        smoothed = ("robust",) if objective == "dpo" else ("sigmoid", "simpo")
        if not 0 <= eps < 0.5:
            errors.append(f"config.{objective}.label_smoothing={eps!r}: must be in [0, 0.5)")
        elif eps and loss_type not in smoothed:
            errors.append(f"config.{objective}.label_smoothing={eps!r} has no effect with loss_type={loss_type!r} "
                          f"(trl 1.16 uses it for {' and '.join(map(repr, smoothed))} only); "
                          f"use loss_type={smoothed[0]!r} or set it to 0")
    if objective in ("dpo", "kto"):
        if _get(cfg, f"{objective}.reference") == "init" and not _get(cfg, "model.init_from"):
            errors.append(f"config.{objective}.reference='init' needs config.model.init_from (the adapters to freeze)")
        if _get(cfg, "data.train_on_prompt"):
            errors.append(f"config.data.train_on_prompt: has no effect with objective={objective!r} (it puts the "
                          "prompt into the NLL term of 'orpo' and 'cpo')")
    if objective == "kto" and _get(cfg, "kto.loss_type") == "kto" and (_get(cfg, "train.batch_size") or 2) < 2:
        errors.append(f"config.train.batch_size={_get(cfg, 'train.batch_size')!r}: KTO's KL estimate pairs each row "
                      "with another row's completion of the micro-batch: needs >= 2 (trl's condition too)")
    if _get(cfg, "data.pack"):
        errors.append(f"config.data.pack: packing is not supported with objective={objective!r} (one sequence per row)")
    if (_get(cfg, "data.format") or "auto") != "auto":
        errors.append(f"config.data.format: must be 'auto' with objective={objective!r} (rows are read from "
                      "prompt/chosen/rejected, chosen/rejected or, for 'kto', prompt/completion/label columns)")
    if patience and not (_get(cfg, "train.eval_every") and _get(cfg, "data.eval")):
        errors.append("config.train.early_stopping_patience > 0 needs config.train.eval_every > 0 and "
                      "config.data.eval")
    return errors


GRPO_CHOICES = {"grpo.loss_type": grpo_lib.LOSS_TYPES, "grpo.scale_rewards": grpo_lib.SCALE_REWARDS,
           "grpo.reference": ("auto", "base", "init")}


def reward_functions(cfg: ConfigDict) -> tuple[list[tuple[str, Any]], np.ndarray]:
    """``[(name, fn)]`` and float32 weights from ``grpo.reward_funcs`` / ``grpo.reward_weights``."""
    try:
        names = rewards_lib.parse_reward_specs(cfg.grpo.reward_funcs)
        fns = [(name, rewards_lib.resolve_reward(name)) for name in names]
    except rewards_lib.RewardError as err:
        raise ConfigError(f"config.grpo.reward_funcs={cfg.grpo.reward_funcs!r}: {err}") from err
    raw = [w.strip() for w in str(cfg.grpo.reward_weights).split(",") if w.strip()]
    if not raw:
        return fns, np.ones(len(fns), np.float32)
    try:
        weights = np.asarray([float(w) for w in raw], np.float32)
    except ValueError as err:
        raise ConfigError(f"config.grpo.reward_weights={cfg.grpo.reward_weights!r}: not numbers") from err
    if len(weights) != len(fns):
        raise ConfigError(f"config.grpo.reward_weights={cfg.grpo.reward_weights!r}: {len(weights)} weights for "
                          f"{len(fns)} reward functions ({cfg.grpo.reward_funcs})")
    return fns, weights


def _grpo_errors(cfg: ConfigDict) -> list[str]:
    """GRPO's own checks (the shared keys are checked as for SFT)."""
    errors: list[str] = []
    if "grpo" not in cfg:
        return ["config.objective='grpo' needs a config.grpo section (see configs/grpo.py)"]
    g = cfg.grpo
    for key, allowed in GRPO_CHOICES.items():
        value = g[key.split(".")[1]]
        if value not in allowed:
            errors.append(f"config.{key}={value!r}: must be one of {', '.join(map(repr, allowed))}")
    if not g.num_generations >= 2:
        errors.append(f"config.grpo.num_generations={g.num_generations!r}: must be >= 2 (the group mean is the "
                      "baseline of each completion)")
    rows = cfg.train.batch_size * cfg.train.grad_accum
    if g.num_generations >= 2 and rows % g.num_generations:
        errors.append(f"config.train.batch_size x config.train.grad_accum = {rows} completions per step must be a "
                      f"multiple of config.grpo.num_generations={g.num_generations}")
    for key, ok, need in [("beta", g.beta >= 0, ">= 0"), ("epsilon", 0 <= g.epsilon < 1, "in [0, 1)"),
                          ("epsilon_high", g.epsilon_high == -1 or g.epsilon_high >= 0, ">= 0 (or -1: = epsilon)"),
                          ("num_iterations", g.num_iterations >= 1, ">= 1"),
                          ("max_prompt_length", g.max_prompt_length > 0, "> 0"),
                          ("max_completion_length", g.max_completion_length > 0, "> 0"),
                          ("temperature", g.temperature > 0, "> 0"), ("top_k", g.top_k >= 0, ">= 0"),
                          ("top_p", 0 < g.top_p <= 1, "in (0, 1]"), ("eval_temperature", g.eval_temperature >= 0, ">= 0")]:
        if not ok:
            errors.append(f"config.grpo.{key}={g[key]!r}: must be {need}")
    if not cfg.train.max_steps > 0:
        errors.append(f"config.train.max_steps={cfg.train.max_steps!r}: GRPO needs a number of optimizer steps > 0")
    if g.num_iterations >= 1 and cfg.train.checkpoint_every % g.num_iterations:
        errors.append(f"config.train.checkpoint_every={cfg.train.checkpoint_every}: must be a multiple of "
                      f"config.grpo.num_iterations={g.num_iterations} (a checkpoint falls between rollouts)")
    if g.reference == "init" and not cfg.model.init_from:
        errors.append("config.grpo.reference='init' needs config.model.init_from (the adapters to freeze)")
    try:
        reward_functions(cfg)
    except ConfigError as err:
        errors.append(str(err))
    return errors


def check_inputs(cfg: ConfigDict) -> None:
    """Fail before the model is loaded when a local data file is missing, a directory or not a
    supported type, when ``model.init_from`` is not a run directory, or when ``workdir`` cannot
    be written (a file, read-only). Hub dataset names are left to the loader."""
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


# -- the typed config ------------------------------------------------------------------------------


def lora_config_from(cfg: ConfigDict) -> LoraConfig:
    """The ``lora`` section as a LoraConfig; targets: "all-linear", "q_proj,v_proj", a name or a regex."""
    t = cfg.lora.targets
    if isinstance(t, str) and t != ALL_LINEAR and "," in t:
        targets: Any = tuple(s.strip() for s in t.split(",") if s.strip())
    elif isinstance(t, str) and t != ALL_LINEAR and t.isidentifier():
        targets = (t,)
    else:
        targets = tuple(t) if isinstance(t, (list, tuple)) else t
    return LoraConfig(r=cfg.lora.r, alpha=float(cfg.lora.alpha), dropout=float(cfg.lora.dropout),
                      targets=targets, init=cfg.lora.init, init_std=float(cfg.lora.init_std),
                      use_rslora=bool(cfg.lora.rslora), use_dora=bool(cfg.lora.get("use_dora", False)),
                      loftq_iter=int(cfg.lora.get("loftq_iter", 1)),
                      target_parameters=tuple(p.strip() for p in str(cfg.lora.get("target_parameters", "") or "")
                                              .split(",") if p.strip()))


def _section(cls: type, node: ConfigDict | None, **converted: Any) -> Any:
    """``cls`` from the keys of ``node`` that it declares (absent keys keep the field's default)."""
    values = {f.name: node[f.name] for f in dataclasses.fields(cls) if node is not None and f.name in node}
    return cls(**{**values, **converted})


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str
    quantize: str | None = "nf4"  # None: the frozen linears stay in param_dtype
    blocksize: int = 64
    double_quant: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_from: str = ""
    remat: str = "projections"
    attention_impl: str = "auto"
    quant_matmul_impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: Any
    eval: Any = ""
    format: str | None = None  # None: recognised from the columns ("auto")
    max_length: int = 512
    drop_long: bool = False
    train_on_prompt: bool = False
    pack: bool = False
    group_by_length: bool = True
    pad_to_multiple_of: int = 64
    max_eval_examples: int = 64
    text_as_chat: bool = False  # DPO: string prompt/chosen/rejected rendered as a chat
    prompt_column: str = "prompt"  # GRPO
    system_prompt: str = ""  # GRPO

    @property
    def overflow(self) -> str:
        return "drop" if self.drop_long else "truncate"


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.3
    schedule: str = "cosine"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    offload: bool = False
    loraplus_lr_ratio: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    export_peft: bool = True
    early_stopping_patience: int = 0
    wandb_project: str = ""
    wandb_mode: str = "online"


@dataclasses.dataclass(frozen=True)
class DPOSection:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "auto"


@dataclasses.dataclass(frozen=True)
class ORPOSection:
    beta: float = 0.1  # lambda of the odds-ratio term (trl ORPOConfig.beta)


@dataclasses.dataclass(frozen=True)
class CPOSection:  # trl CPOConfig's fields; SimPO: loss_type="simpo", cpo_alpha=0
    beta: float = 0.1
    loss_type: str = "sigmoid"
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    alpha: float = 0.0


@dataclasses.dataclass(frozen=True)
class KTOSection:  # trl KTOConfig's fields
    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: str = "auto"


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    num_generations: int = 8
    reward_funcs: str = "format,exact_match"
    reward_weights: str = ""
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float = 0.28  # as given; -1 means "= epsilon" (see ``clip_high``)
    num_iterations: int = 1
    max_prompt_length: int = 128
    max_completion_length: int = 32
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    mask_truncated_completions: bool = False
    reference: str = "auto"
    dense_sampling: bool = True
    eval_temperature: float = 0.0
    reward_names: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high == -1 else self.epsilon_high


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated training config (see the module docstring)."""

    workdir: Path
    seed: int
    objective: str
    model: ModelSection
    lora: LoraConfig
    data: DataSection
    optim: OptimSection
    train: TrainSection
    mesh: tuple[int, int, int]  # (data, fsdp, tensor); one may be -1
    dpo: DPOSection | None = None
    orpo: ORPOSection | None = None
    cpo: CPOSection | None = None
    kto: KTOSection | None = None
    grpo: GRPOSection | None = None

    @classmethod
    def from_config(cls, cfg: ConfigDict) -> RunConfig:
        """Validate ``cfg`` (raises :class:`ConfigError` naming every bad key) and convert it."""
        validate_config(cfg)
        objective = cfg.get("objective", "sft")
        model = model_section(cfg)
        fmt = cfg.data.get("format", "auto")
        data = _section(DataSection, cfg.data, format=None if fmt == "auto" else fmt)
        dpo = _section(DPOSection, cfg.dpo) if objective == "dpo" else None
        orpo = _section(ORPOSection, cfg.orpo) if objective == "orpo" else None
        cpo = _section(CPOSection, cfg.cpo) if objective == "cpo" else None
        kto = _section(KTOSection, cfg.kto) if objective == "kto" else None
        grpo = None
        if objective == "grpo":
            fns, weights = reward_functions(cfg)
            grpo = _section(GRPOSection, cfg.grpo, reward_names=tuple(name for name, _ in fns),
                            weights=tuple(float(w) for w in weights))
        return cls(workdir=Path(cfg.workdir).absolute(), seed=int(cfg.seed), objective=objective, model=model,
                   lora=lora_config_from(cfg), data=data, optim=_section(OptimSection, cfg.optim),
                   train=_section(TrainSection, cfg.train),
                   mesh=(int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor)), dpo=dpo, orpo=orpo, cpo=cpo,
                   kto=kto, grpo=grpo)

    def lora_record(self) -> dict[str, Any]:
        return lora_record(self.lora, self.model)


def model_section(cfg: ConfigDict) -> ModelSection:
    """The ``model`` section, quantization normalised ("none" -> None)."""
    quantize = cfg.model.get("quantize", "nf4")
    return _section(ModelSection, cfg.model, quantize=None if quantize in ("none", "", None) else quantize,
                    source=str(cfg.model.source), init_from=str(cfg.model.get("init_from", "") or ""))


def lora_record(lora: LoraConfig, model: ModelSection) -> dict[str, Any]:
    """What a checkpoint records of the adapters and the base they were trained on."""
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets,
            "init": lora.init, "loftq_iter": lora.loftq_iter, "use_rslora": lora.use_rslora, "use_dora": lora.use_dora,
            "model_source": model.source, "quantize": model.quantize or "none", "blocksize": model.blocksize,
            "double_quant": model.double_quant,
            **({"target_parameters": list(lora.target_parameters)} if lora.target_parameters else {})}


__all__ = ["OBJECTIVES", "PREFERENCE_OBJECTIVES", "UNPAIRED_OBJECTIVES", "ConfigError", "RunConfig", "check_inputs", "lora_config_from",
           "lora_record", "model_section", "reward_functions", "validate_config"]

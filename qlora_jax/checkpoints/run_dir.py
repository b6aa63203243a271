"""A run directory, read and written here only: records, checkpoints, adapters.

What a training run (``config.workdir``) holds::

    checkpoints/<step>/   Orbax: lora (the adapters), train (optimizer state, RNG key, frozen
                          reference adapters), meta (JSON: step, data position, the LoRA record)
    metrics.jsonl         one JSON row per logged step and per evaluation (TensorBoard beside it)
    eval_before.json      the held-out evaluation before training (kept across resumes)
    summary.json          written when a run ends: what was trained, figures, where things are
    adapter/              PEFT adapter of the finished run; best_adapter/ (DPO's best evaluation)
    train.log, loss.png   the log and the loss curve

The base model is never written: it is the frozen input. The LoRA record in every checkpoint's
``meta`` (rank, alpha, targets, base model, quantization) is what a resume and the Stage-1 ->
Stage-2 handoff check, and what export / generate / evaluate rebuild a run's model from
(:func:`read_run`, :func:`load_run_model`), so inference never imports the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from qlora_jax.checkpoints.load import load_model
from qlora_jax.checkpoints.peft_io import ADAPTER_CONFIG, load_peft_adapter
from qlora_jax.errors import UserError, ensure_free_space
from qlora_jax.lora import ALL_LINEAR, PROJECTION_BLOCK, LoraConfig, LoRAParam, peft_adapter_tensors
from qlora_jax.lora_init import changes_base

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
EVAL_BEFORE_FILE = "eval_before.json"
ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"
CHECKPOINT_DIR = "checkpoints"
WANDB_RUN_ID_FILE = "wandb_run_id"  # the Weights & Biases run a resumed attempt keeps logging to
WANDB_DIR = "wandb"  # wandb's own files (offline runs: `wandb sync <workdir>/wandb/offline-run-*`)

log = logging.getLogger(__name__)

# The keys of the LoRA record that must agree between a checkpoint and the model restoring it,
# with the value a record written before the key existed stands for.
LORA_KEYS_CHECKED = ("r", "alpha", "targets", "use_rslora", "use_dora")
LORA_RECORD_DEFAULTS = {"use_rslora": False, "use_dora": False, "loftq_iter": 1}


class CheckpointMismatch(UserError):
    """A checkpoint's recorded config does not fit the model it is restored into."""


class RunDirError(UserError):
    """A run directory that cannot be read as asked; the message says what is missing."""


def check_lora_record(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    def get(record, k):
        return record.get(k, LORA_RECORD_DEFAULTS.get(k))

    keys = LORA_KEYS_CHECKED
    if any(changes_base(str(record.get("init", ""))) for record in (saved, current)):
        keys += ("init", "loftq_iter")  # PiSSA / LoftQ rebuild a residual base: it must be the same one
    diffs = [
        f"lora.{k}: checkpoint has {get(saved, k)!r}, config has {get(current, k)!r}"
        for k in keys
        if _norm(get(saved, k)) != _norm(get(current, k))
    ]
    if diffs:
        raise CheckpointMismatch(f"{where}: LoRA config differs from the checkpoint's:\n  " + "\n  ".join(diffs))


def _norm(v):
    if isinstance(v, (list, tuple)):
        return tuple(v)
    return v


class RunCheckpoints:
    """Keep-last-N, asynchronous Orbax checkpoints under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, lora: Any, train_state: Any, meta: dict[str, Any], *, force: bool = False) -> None:
        """``lora``: the adapters (restorable alone, for a stage handoff); ``train_state``: the rest
        of what resuming needs (optimizer state, RNG); ``meta``: JSON (step, data position, LoRA)."""
        ensure_free_space(self.directory, sum(x.nbytes for x in jax.tree.leaves((lora, train_state))),
                          f"the checkpoint of step {step}")  # a full disk: one line, no half-written step
        self.manager.save(
            step,
            args=ocp.args.Composite(
                lora=ocp.args.StandardSave(lora),
                train=ocp.args.StandardSave(train_state),
                meta=ocp.args.JsonSave(_jsonable(meta)),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_lora: Any, abstract_train: Any) -> tuple[Any, Any, dict[str, Any]]:
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                lora=ocp.args.StandardRestore(abstract_lora),
                train=ocp.args.StandardRestore(abstract_train),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["lora"], out["train"], out["meta"]

    def delete(self, step: int) -> None:
        """Remove checkpoint ``step`` (after pending saves finish)."""
        self.manager.wait_until_finished()
        self.manager.delete(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


@jax.jit
def _leaves_finite(leaves: list[Any]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
    """Whether every float in ``tree`` (adapters, optimizer state) is finite: one jitted reduction.

    A checkpoint holding a NaN or inf could only be resumed into NaN: none is saved. Leaves kept
    in host memory (``optim.offload``) are copied to their devices for the check.
    """
    def on_device(x):
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
        return jax.device_put(x, x.sharding.with_memory_kind("device")) if kind not in (None, "device") else x

    leaves = [on_device(x) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_leaves_finite(leaves)) if leaves else True


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) to restore ``tree``-shaped state onto the same devices."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def restore_adapters(step_dir: str | os.PathLike, abstract_lora: Any) -> Any:
    """The adapters saved in an Orbax step directory, restored onto ``abstract_lora``'s shapes and
    shardings (the one way adapters are read back, by resume, handoff, export and generate).

    Reads the ``lora`` item alone, or, in checkpoints written before the adapters had their own
    item, ``state["lora"]``. A tree that does not fit is one :class:`RunDirError` line.
    """
    step_dir = Path(step_dir).absolute()
    try:
        if (step_dir / "lora").is_dir():
            with ocp.StandardCheckpointer() as checkpointer:
                return checkpointer.restore(step_dir / "lora", abstract_lora)
        if (step_dir / "state").is_dir():
            with ocp.StandardCheckpointer() as checkpointer:
                state = checkpointer.restore(step_dir / "state")
            if "lora" not in state:
                raise RunDirError(f"{step_dir}/state holds no 'lora' entry (keys: {sorted(state)})")
            return _onto(state["lora"], abstract_lora, step_dir)
    except (ValueError, KeyError, TypeError) as err:
        if isinstance(err, UserError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(f"{step_dir}: the saved adapters do not fit the model built from the recorded LoRA "
                          f"config ({first})") from err
    raise RunDirError(f"{step_dir} has neither a lora/ nor a state/ item; is it an Orbax checkpoint of a run?")


def _onto(saved: Any, abstract_lora: Any, where: Path) -> Any:
    """A raw restored tree (nested dicts, ``.../value`` leaves) as ``abstract_lora``'s state."""
    def pick(path, leaf):
        node = saved
        for key in path:
            name = getattr(key, "key", getattr(key, "name", key))
            node = node.get(str(name)) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node = node.get("value")
        label = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        if node is None:
            raise RunDirError(f"{where}: no saved value for adapter {label}")
        value = np.asarray(node)
        if value.shape != tuple(leaf.shape):
            raise RunDirError(f"{where}: adapter {label} has shape {value.shape}, the model built from the recorded "
                              f"LoRA config expects {tuple(leaf.shape)}")
        return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding) if leaf.sharding else jnp.asarray(
            value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, abstract_lora)


def init_adapters_from(source: str | Path, abstract_lora: Any, record: dict[str, Any]) -> tuple[Any, str]:
    """Adapters to start a run from: the newest checkpoint of another run's workdir (Orbax; the
    Stage-1 -> Stage-2 handoff). The LoRA record must agree. Returns (lora_state, description)."""
    source = Path(source)
    if not (source / CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(f"model.init_from: {source} has no checkpoints/ directory (expected a run's workdir)")
    ckpts = RunCheckpoints(source, async_save=False)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise FileNotFoundError(f"model.init_from: no finished checkpoint in {ckpts.directory}")
        meta = ckpts.read_meta(step)
        check_lora_record(meta.get("lora", {}), record, f"model.init_from={source}")
    finally:
        ckpts.close()
    step_dir = ckpts.directory / str(step)
    return restore_adapters(step_dir, abstract_lora), str(step_dir)


# -- records of a run ---------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` ([] when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_steps(workdir: Path) -> list[int]:
    """Steps of the finished Orbax checkpoints (``checkpoints/<step>``; unfinished ones have other names)."""
    root = Path(workdir) / CHECKPOINT_DIR
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def finished_summary(workdir: Path) -> dict[str, Any] | None:
    """``summary.json`` of a run in ``workdir`` that finished, if its newest checkpoint (when it has
    any) is the step it finished at; else None. Reads two small things, loads nothing."""
    try:
        summary = json.loads((Path(workdir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("final_step"), int):
        return None
    final = summary["final_step"]
    finished = summary.get("finished")
    if finished is None:  # a summary written before the flag
        finished = final >= summary.get("total_steps", final + 1) or bool(summary.get("early_stopped_at"))
    steps = checkpoint_steps(workdir)
    return summary if finished and (not steps or steps[-1] == final) else None


def drop_records_after(workdir: Path, step: int) -> int:
    """Before training from ``step`` (-1: from scratch), drop what an earlier attempt recorded
    after it: metric rows (evaluations before training included, when from scratch),
    ``eval_completions/step_N.jsonl`` with N > step, and ``eval_before.json``. They are recomputed.
    Returns how many rows and files were dropped."""
    if jax.process_index() != 0:
        return 0
    workdir = Path(workdir)
    path = workdir / METRICS_FILE
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("step", 0) <= step]
    if len(keep) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    dropped = len(rows) - len(keep)
    for f in sorted((workdir / "eval_completions").glob("step_*.jsonl")):
        if f.stem[5:].isdigit() and int(f.stem[5:]) > step:
            f.unlink()
            dropped += 1
    if step < 0 and (workdir / EVAL_BEFORE_FILE).exists():
        (workdir / EVAL_BEFORE_FILE).unlink()
    return dropped


def read_eval_before(workdir: Path) -> dict[str, Any]:
    path = Path(workdir) / EVAL_BEFORE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def wandb_run_id(workdir: Path) -> str:
    """The run's Weights & Biases id: the one an earlier attempt recorded, else a new one, recorded."""
    path = Path(workdir) / WANDB_RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # wandb ids: letters and digits
    path.write_text(run_id + "\n")
    return run_id


def write_json(path: Path, obj: Any) -> None:
    """Process 0 writes ``obj`` as JSON to ``path`` (a run's summary, evaluation records)."""
    if jax.process_index() == 0:
        Path(path).write_text(json.dumps(obj, indent=2, default=str))


# -- rebuilding a run's model (export, generate, evaluate) ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What is needed to rebuild a run's fine-tuned model."""

    workdir: Path
    source: str  # base model: built-in name, HF dir, GGUF file, bnb-4bit dir or hub id
    quantize: str | None  # "nf4" | "fp4" | None
    lora: LoraConfig
    adapter_dir: Path | None  # PEFT adapter to load, or
    checkpoint: Path | None  # an Orbax step directory to load the adapters from
    blocksize: int = 64
    double_quant: bool = True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON: {e}") from e


def latest_checkpoint(workdir: Path) -> tuple[Path | None, dict[str, Any]]:
    """(step directory, meta) of the newest Orbax checkpoint, or (None, {})."""
    if not (Path(workdir) / CHECKPOINT_DIR).is_dir():
        return None, {}
    ckpts = RunCheckpoints(workdir, async_save=False)
    try:
        step = ckpts.latest_step()
        if step is None:
            return None, {}
        return ckpts.directory / str(step), ckpts.read_meta(step)
    finally:
        ckpts.close()


def _normalize_quantize(value: Any) -> str | None:
    return None if value in (None, "", "none", "None") else str(value)


def lora_config_from_record(record: dict[str, Any]) -> LoraConfig:
    """LoraConfig from an Orbax checkpoint's ``meta["lora"]`` record."""
    targets = record.get("targets", ALL_LINEAR)
    return LoraConfig(r=int(record["r"]), alpha=float(record["alpha"]), dropout=float(record.get("dropout", 0.0)),
                      targets=tuple(targets) if isinstance(targets, list) else targets,
                      init=record.get("init", "peft"), use_rslora=bool(record.get("use_rslora", False)),
                      use_dora=bool(record.get("use_dora", False)), loftq_iter=int(record.get("loftq_iter", 1)))


def lora_config_from_peft(adapter_dir: Path) -> LoraConfig:
    """LoraConfig from a PEFT ``adapter_config.json`` (``target_modules`` + ``layers_to_transform``)."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise RunDirError(f"adapter directory {adapter_dir} has no {ADAPTER_CONFIG}")
    cfg = _read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise RunDirError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    targets: Any = cfg.get("target_modules") or ALL_LINEAR
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(targets, list) and layers is not None:
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in PROJECTION_BLOCK]
        if unknown:
            raise RunDirError(f"{path}: target_modules {unknown} are not decoder projections")
        targets = tuple(f"layers.{i}.{PROJECTION_BLOCK[t.rsplit('.', 1)[-1]]}.{t.rsplit('.', 1)[-1]}"
                        for i in layers for t in targets)
    elif isinstance(targets, list):
        # peft writes "all-linear" out as full module paths ("model.layers.0.self_attn.q_proj"):
        # our paths start at "layers."
        targets = tuple(t[t.index("layers."):] if t.startswith(("model.", "base_model.")) and "layers." in t else t
                        for t in targets)
    elif layers is not None:
        raise RunDirError(f"{path}: a regex target_modules with layers_to_transform is not supported")
    init = cfg.get("init_lora_weights")  # our PiSSA / LoftQ adapters name their residual base here
    init = init if isinstance(init, str) and changes_base(init) else "peft"
    return LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=targets, use_rslora=bool(cfg.get("use_rslora", False)),
                      use_dora=bool(cfg.get("use_dora", False)), init=init,
                      loftq_iter=int((cfg.get("loftq_config") or {}).get("loftq_iter", 1)))


def read_run(workdir: str | os.PathLike, *, source: str | None = None, adapter: str | os.PathLike | None = None,
             quantize: str | None = None, blocksize: int | None = None,
             double_quant: bool | None = None) -> RunRecord:
    """Find out how to rebuild a run's model; raises :class:`RunDirError` naming what is missing.

    Base model: ``source``, else ``summary.json["model"]``, else the newest checkpoint's
    ``meta["lora"]["model_source"]``, else the adapter's ``base_model_name_or_path``.
    Quantization: ``quantize`` ("none" for none), else the summary's, else the checkpoint's,
    else "nf4". Blocksize / double quantization: as recorded, else 64 / True (the training
    defaults). Adapters: ``adapter``, else ``RUN_DIR/adapter``, else the newest checkpoint.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise RunDirError(f"--workdir: no run directory at {workdir}")
    summary = _read_json(workdir / SUMMARY_FILE) if (workdir / SUMMARY_FILE).is_file() else {}
    step_dir, meta = latest_checkpoint(workdir)
    record = meta.get("lora", {}) if meta else {}

    if adapter is not None:
        adapter_dir: Path | None = Path(adapter)
        if not adapter_dir.is_dir():
            raise RunDirError(f"--adapter: no adapter directory at {adapter_dir}")
        step_dir = None
    elif (workdir / ADAPTER_DIR).is_dir():
        adapter_dir, step_dir = workdir / ADAPTER_DIR, None
    elif step_dir is not None:
        adapter_dir = None
    else:
        raise RunDirError(f"{workdir} has neither {ADAPTER_DIR}/ (PEFT adapter, written when training finishes) "
                          f"nor an Orbax checkpoint under {CHECKPOINT_DIR}/; pass --adapter DIR")

    if adapter_dir is not None:
        lora = lora_config_from_peft(adapter_dir)
        adapter_source = _read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path") or None
    else:
        if not record:
            raise RunDirError(f"{step_dir}: checkpoint meta has no 'lora' record; cannot rebuild its adapters")
        lora = lora_config_from_record(record)
        adapter_source = None

    source = source or summary.get("model") or record.get("model_source") or adapter_source
    if not source:
        raise RunDirError(f"cannot tell which base model {workdir} was trained on (no {SUMMARY_FILE}, no checkpoint "
                          f"meta, no base_model_name_or_path in the adapter); pass --source MODEL")
    if quantize is None:
        if "quantize" in summary:
            quantize = summary["quantize"]
        elif "quantize" in record:
            quantize = record["quantize"]
        else:
            quantize = "nf4"
    blocksize = blocksize or summary.get("blocksize") or record.get("blocksize") or 64
    if double_quant is None:
        double_quant = summary.get("double_quant", record.get("double_quant", True))
    return RunRecord(workdir=workdir, source=str(source), quantize=_normalize_quantize(quantize), lora=lora,
                     adapter_dir=adapter_dir, checkpoint=step_dir, blocksize=int(blocksize),
                     double_quant=bool(double_quant))


def load_orbax_adapters(model: nnx.Module, step_dir: str | os.PathLike) -> None:
    """Set ``model``'s adapters (in place) from an Orbax checkpoint step directory."""
    current = nnx.state(model, LoRAParam)
    nnx.update(model, restore_adapters(step_dir, abstract_like(current)))


def load_run_model(run: RunRecord, *, with_tokenizer: bool = True, dtype: str = "float32",
                   param_dtype: str | None = "float32", initial: dict[str, np.ndarray] | None = None):
    """(model with the trained adapters, tokenizer), computing in ``dtype`` (export merges in float32).

    ``initial``: a dict filled with the adapters as initialised, before the trained ones are
    loaded (PiSSA / LoftQ's ``B0``, ``A0``, which a PEFT export for the original base needs)."""
    model, tokenizer = load_model(run.source, quantize=run.quantize, dtype=dtype, param_dtype=param_dtype,
                                  lora=run.lora, blocksize=run.blocksize, double_quant=run.double_quant,
                                  with_tokenizer=with_tokenizer)
    if initial is not None:
        initial.update(peft_adapter_tensors(model))
    if run.adapter_dir is not None:
        load_peft_adapter(model, run.adapter_dir)
    else:
        load_orbax_adapters(model, run.checkpoint)
    return model, tokenizer

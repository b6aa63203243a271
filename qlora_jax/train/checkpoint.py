"""Orbax checkpoints of a training run: adapters, optimizer state, step, data position, RNG.

Layout of ``workdir/checkpoints/<step>/``: ``lora`` (the adapters), ``train`` (optimizer state and
RNG key) and ``meta`` (JSON: step, data-iterator position, the LoRA and quantization config the
adapters were trained with). The base model is never written: it is the frozen input.

The same ``meta`` record is what the stage handoff checks: restoring adapters into a model whose
LoRA config (rank, alpha, targets) differs fails with a message naming the differing keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from qlora_jax.errors import UserError, ensure_free_space

log = logging.getLogger(__name__)

# The keys of the LoRA record that must agree between a checkpoint and the model restoring it.
LORA_KEYS_CHECKED = ("r", "alpha", "targets", "use_rslora")


class CheckpointMismatch(UserError):
    """A checkpoint's recorded config does not fit the model it is restored into."""


def check_lora_record(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    diffs = [
        f"lora.{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
        for k in LORA_KEYS_CHECKED
        if _norm(saved.get(k)) != _norm(current.get(k))
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
        self.directory = Path(workdir).absolute() / "checkpoints"
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

    def restore_lora(self, step: int, abstract_lora: Any) -> tuple[Any, dict[str, Any]]:
        """Only the adapters and the record: what the Stage-1 -> Stage-2 handoff needs."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(lora=ocp.args.StandardRestore(abstract_lora), meta=ocp.args.JsonRestore()),
        )
        return out["lora"], out["meta"]

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


def init_adapters_from(source: str | Path, abstract_lora: Any, record: dict[str, Any]) -> tuple[Any, str]:
    """Adapters to start a run from: the newest checkpoint of another run's workdir (Orbax; the
    Stage-1 -> Stage-2 handoff). The LoRA record must agree. Returns (lora_state, description)."""
    source = Path(source)
    if not (source / "checkpoints").is_dir():
        raise FileNotFoundError(f"model.init_from: {source} has no checkpoints/ directory (expected a run's workdir)")
    ckpts = RunCheckpoints(source, async_save=False)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise FileNotFoundError(f"model.init_from: no finished checkpoint in {ckpts.directory}")
        meta = ckpts.read_meta(step)
        check_lora_record(meta.get("lora", {}), record, f"model.init_from={source}")
        lora, _ = ckpts.restore_lora(step, abstract_lora)
    finally:
        ckpts.close()
    return lora, f"{ckpts.directory / str(step)}"

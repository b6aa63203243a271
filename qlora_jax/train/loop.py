"""The training loop: one jit'd step (gradient accumulation inside), mesh shardings, checkpoints.

State split: ``nnx.split(model, LoRAParam, ...)`` gives the trainable adapters (``lora``) and the
frozen rest (NF4 codes, norms, embeddings). Only ``lora`` and the optimizer state change; the
frozen state is an argument of the step, never copied or differentiated.

A step takes ``[grad_accum, micro_batch, length]`` arrays and scans over the micro-batches,
summing gradients of the *summed* token NLL and dividing once by the total number of loss
tokens, so the update equals the big-batch gradient of the mean token loss.

The objective (``qlora_jax/objectives/``; ``SFT`` by default) gives per micro-batch a summed loss
and float32 scalar sums (``stat_keys``), one of which (``weight_key``: loss tokens for SFT, pairs
for DPO) divides the summed loss and gradient (``objectives/base.py`` states the protocol). If it
keeps frozen adapters for its reference (``frozen_adapters``), the step takes them as a sixth
argument.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental.layout import Format, Layout

from qlora_jax.errors import UserError
from qlora_jax.lora import split_model
from qlora_jax.models.layers import activation_sharding
from qlora_jax.objectives.base import Objective
from qlora_jax.objectives.sft import SFT
from qlora_jax.train import sharding as shard_lib

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """Raised when a step's loss or gradient is NaN/inf; the state of the step before is kept."""

    exit_code = 3


@dataclasses.dataclass
class StepFns:
    graphdef: Any
    train_step: Callable
    lora_shardings: Any
    rest_shardings: Any
    opt_shardings: Any
    batch_sharding: Any


def frozen_layout_for(platform: str, mesh_shape: tuple[int, int, int]) -> str:
    """The frozen state's layout the trainer compiles with: "auto" on TPU when the base is
    replicated (data parallel only), else "default".

    Measured for LLaMA-3.1-8B, r=32, seq 2048, one sequence per v5e chip, remat full
    (docs/tpu_findings.md section 6): mesh (8,1,1) 12.24 GiB per chip default -> 8.89 auto (no
    relayout copy of the stacked NF4 codes); mesh (1,8,1) 5.58 default -> 6.74 auto (the chosen
    layouts' tile padding of the sharded codes and absmax costs more than the copy it saves).
    """
    _, fsdp, tensor = mesh_shape
    return "auto" if platform == "tpu" and fsdp == 1 and tensor == 1 else "default"


def make_step_fns(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    offload_optimizer: bool = False,
    objective: Objective = SFT,
    abstract: bool = False,
    frozen_layout: str = "default",
    example_batch: tuple[int, int] | None = None,
) -> tuple[StepFns, Any, Any, Any]:
    """Build the jit'd train step with explicit shardings.

    Returns (fns, lora_state, frozen_state, opt_state), each placed on the mesh. The train step is
    ``train_step(lora, opt_state, rest, batches, key)`` (plus ``ref_lora`` when
    ``objective.frozen_adapters``) -> (lora, opt_state, metrics); metrics are ``loss`` (summed loss
    / summed weight), ``grad_norm``, ``finite`` and the objective's summed statistics.

    ``frozen_layout="auto"`` (TPU, see :func:`frozen_layout_for`): XLA chooses the in-memory layout of the frozen state
    (``Layout.AUTO``) so the NF4 codes arrive in the layout the decode-matmul fusions read, instead
    of a relayout copy of the whole stacked base per step (3.35 GiB per chip at 8B,
    docs/tpu_findings.md section 6). Abstract: the jit takes AUTO (for ``.lower().compile()``).
    Concrete: one ahead-of-time compile of the SFT step for ``example_batch`` = (rows, length) picks
    the layouts (they are the decode-matmul's, whatever the objective); the frozen state is moved
    into them and the step is jit'd with those fixed layouts (any batch shape keeps them).
    """
    graphdef, lora_state, rest = split_model(model)
    lora_sh = shard_lib.shardings_for_state(mesh, lora_state)
    rest_sh = shard_lib.shardings_for_state(mesh, rest)
    opt_abstract = jax.eval_shape(tx.init, lora_state)
    opt_sh = shard_lib.shardings_for_state(mesh, opt_abstract)
    if offload_optimizer:
        opt_sh_host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_sh)
    else:
        opt_sh_host = opt_sh
    if abstract:  # a model from nnx.eval_shape: shapes with shardings, for .lower() (bench/memory.py)
        def place(tree, shardings):
            return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)

        lora_state, rest = place(lora_state, lora_sh), place(rest, rest_sh)
        opt_state = place(opt_abstract, opt_sh_host)
    else:
        lora_state = jax.device_put(lora_state, lora_sh)
        rest = jax.device_put(rest, rest_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh_host)(lora_state)
    repl = shard_lib.replicated(mesh)
    batch_sh = shard_lib.batch_sharding(mesh, 3, leading_unsharded=1)

    def train_step(lora, opt_state, rest, batches, key, ref_lora=None):
        with activation_sharding(mesh):  # activations' batch over (data, fsdp): true FSDP
            return _train_step(lora, opt_state, rest, batches, key, ref_lora)

    def _train_step(lora, opt_state, rest, batches, key, ref_lora=None):
        n_micro = batches["input_ids"].shape[0]
        keys = jax.random.split(key, n_micro)

        def micro(carry, xs):
            g_acc, s_acc, stats_acc = carry
            mb, k = xs
            reference = objective.reference(graphdef, lora, rest, mb, ref_lora)
            (s, stats), g = jax.value_and_grad(
                lambda adapters: objective.loss_sums(graphdef, adapters, rest, mb, k, reference), has_aux=True
            )(lora)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            return (g_acc, s_acc + s, {name: stats_acc[name] + stats[name] for name in stats_acc}), None

        zeros = jax.tree.map(jnp.zeros_like, lora)
        stats0 = {name: jnp.float32(0) for name in objective.stat_keys}
        (g_sum, s_sum, stats), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), stats0), (batches, keys))
        n_sum = stats[objective.weight_key]
        denom = jnp.maximum(n_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        loss = s_sum / denom
        if offload_optimizer:
            opt_state = jax.device_put(opt_state, opt_sh)
        updates, new_opt = tx.update(grads, opt_state, lora)
        new_lora = optax.apply_updates(lora, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step changes nothing: the caller stops and names the step.
        new_lora = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_lora, lora)
        new_opt = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_opt, opt_state)
        if offload_optimizer:
            new_opt = jax.device_put(new_opt, opt_sh_host)
        metrics = {"loss": loss, "grad_norm": grad_norm, **stats, "finite": finite}
        return new_lora, new_opt, metrics

    if objective.frozen_adapters:
        step_fn = train_step
    else:
        def step_fn(lora, opt_state, rest, batches, key):
            return train_step(lora, opt_state, rest, batches, key)

    def jit_with(rest_in):
        in_shardings = (lora_sh, opt_sh_host, rest_in, batch_sh, repl)
        if objective.frozen_adapters:
            in_shardings += (lora_sh,)
        return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(lora_sh, opt_sh_host, repl),
                       donate_argnums=(0, 1))

    if frozen_layout == "default":
        train_jit = jit_with(rest_sh)
    elif frozen_layout == "auto":
        auto = jax.tree.map(lambda s: Format(Layout.AUTO, s), rest_sh)
        train_jit = jit_with(auto)
        if not abstract:
            if example_batch is None:
                raise ValueError('frozen_layout="auto" on concrete state needs example_batch')
            probe, p_lora, p_rest, p_opt = make_step_fns(model, tx, mesh, offload_optimizer=offload_optimizer,
                                                         abstract=True, frozen_layout="auto")
            batch = {k: jax.ShapeDtypeStruct((1, *example_batch), jnp.int32, sharding=batch_sh)
                     for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
            key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
            formats = probe.train_step.lower(p_lora, p_opt, p_rest, batch, key).compile().input_formats[0][2]
            rest = jax.device_put(rest, formats, donate=True)
            train_jit = jit_with(formats)
    else:
        raise ValueError(f"frozen_layout must be 'default' or 'auto', got {frozen_layout!r}")

    fns = StepFns(graphdef, train_jit, lora_sh, rest_sh, opt_sh_host, batch_sh)
    return fns, lora_state, rest, opt_state


def stack_microbatches(batches: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """[micro, batch, length] arrays; micro-batches are right-padded to the longest of them."""
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        fill = pad_id if key in ("input_ids", "targets") else 0
        out[key] = np.stack([
            np.pad(b[key], ((0, 0), (0, length - b[key].shape[1])), constant_values=fill) for b in batches
        ])
    return out


def process_local_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Hand a [micro, batch, length] global batch to the step.

    One process: the numpy arrays as they are (jit places them). Several processes (multi-host):
    every process computes the same global batch order, keeps only the rows of the batch axis
    that its devices hold, and builds the global array from those process-local rows with
    ``jax.make_array_from_process_local_data``.
    """
    if jax.process_count() == 1:
        return batch
    out = {}
    for key, value in batch.items():
        rows = value.shape[1]
        if rows % jax.process_count():
            raise ValueError(f"train.batch_size={rows} must be divisible by the {jax.process_count()} processes")
        per = rows // jax.process_count()
        start = jax.process_index() * per
        local = value[:, start:start + per]
        out[key] = jax.make_array_from_process_local_data(sharding, local, value.shape)
    return out


class GracefulExit:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit (preemption-friendly)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM,):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


__all__ = [
    "GracefulExit", "NonFiniteLoss", "StepFns", "make_step_fns", "process_local_batch", "split_model",
    "stack_microbatches",
]

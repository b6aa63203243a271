"""Mesh and sharding rules, kept apart from the model.

A mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimizer state sharded) and ``tensor`` (megatron-style: attention heads and the
MLP's hidden dimension split). Which tensor dimension goes on which mesh axis is a table of
logical names (``LOGICAL_RULES``), and which logical names a parameter's dimensions carry is a
second table keyed by parameter name (``PARAM_AXES``). Both are data; nothing in the model knows
about meshes. A dimension that the mesh axes do not divide is left unsharded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical dimension name -> mesh axes it is split over
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),  # the model dimension of weights
    "heads": ("tensor",),  # q/k/v output features (heads x head_dim), o_proj input
    "mlp": ("tensor",),  # gate/up output, down input
    "vocab": ("tensor",),
    "layers": None,
    "rank": None,
    "blocks": None,
    None: None,
}

# parameter-name pattern -> logical names of the weight's dimensions as stored in HF layout
# [out, in] (a stacked-layer leading axis is added automatically). Quantized weights reuse their
# weight's axes for packed codes and absmax (row layout keeps [out, in/2] and [out, in/bs]).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(q_proj|k_proj|v_proj)", ("heads", "embed")),
    (r"o_proj", ("embed", "heads")),
    (r"(gate_proj|up_proj)", ("mlp", "embed")),
    (r"down_proj", ("embed", "mlp")),
    (r"(embed_tokens|lm_head)", ("vocab", "embed")),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one of the sizes may be -1 to take the remaining devices."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices).reshape(mesh_sizes((data, fsdp, tensor), len(devices))), MESH_AXES)


def mesh_sizes(sizes: Sequence[int], n: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for ``n`` devices; one size may be -1 to take the remaining devices."""
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices "
                         f"(mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, mesh.tensor={sizes[2]})")
    return tuple(sizes)  # type: ignore[return-value]


def _mesh_size(mesh: Mesh, axes: tuple[str, ...] | None) -> int:
    if not axes:
        return 1
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int]) -> P:
    """PartitionSpec for a tensor whose dims carry these logical names; undivisible dims stay whole."""
    out = []
    used: set[str] = set()
    for name, dim in zip(logical, shape):
        axes = LOGICAL_RULES.get(name)
        if axes and dim % _mesh_size(mesh, axes) == 0 and not used & set(axes) and _mesh_size(mesh, axes) > 1:
            out.append(axes if len(axes) > 1 else axes[0])
            used |= set(axes)
        else:
            out.append(None)
    return P(*out)


def logical_axes_for(path: str, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical names for one leaf of the model state, from its path (e.g. 'layers/mlp/up_proj/lora_a')."""
    ndim = len(shape)
    weight_axes: tuple[str | None, ...] | None = None
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            weight_axes = axes
            break
    if weight_axes is None:
        return (None,) * ndim
    out_ax, in_ax = weight_axes
    leaf = path.rsplit("/", 1)[-1]
    if "lora_a" in leaf:  # [r, in]
        core = ("rank", in_ax)
    elif "lora_b" in leaf:  # [out, r]
        core = (out_ax, "rank")
    elif "nested_absmax" in leaf or "offset" in leaf:
        core = ("blocks",) * min(ndim, 1)
    elif "bias" in leaf:
        core = (out_ax,)
    else:  # weight, packed codes, absmax: [out, in-ish]
        core = (out_ax, in_ax)
    core = core[-ndim:] if ndim < len(core) else core
    return (None,) * (ndim - len(core)) + tuple(core)


def shardings_for_state(mesh: Mesh, state: Any) -> Any:
    """NamedShardings for every leaf of a pytree of arrays (or ShapeDtypeStructs), by path."""

    def one(path, leaf):
        name = "/".join(_key_str(k) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(mesh, logical_axes_for(name, shape), shape))

    return jax.tree_util.tree_map_with_path(one, state)


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def batch_sharding(mesh: Mesh, ndim: int, *, leading_unsharded: int = 0) -> NamedSharding:
    """Batch arrays: the batch dimension over (data, fsdp); ``leading_unsharded`` dims before it
    (e.g. the micro-batch axis of gradient accumulation) stay whole."""
    spec = [None] * leading_unsharded + [LOGICAL_RULES["batch"]] + [None] * (ndim - leading_unsharded - 1)
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

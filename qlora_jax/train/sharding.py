"""Mesh and sharding rules, kept apart from the model.

A mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimizer state sharded) and ``tensor`` (megatron-style: attention heads and the
MLP's hidden dimension split). Which tensor dimension goes on which mesh axis is a table of
logical names (``LOGICAL_RULES``, here). Which logical names a parameter's dimensions carry is
declared with the parameter itself, next to its shape and dtype, in ``qlora_jax.models.params``
(``WEIGHTS``); :func:`logical_axes_for` looks a path up there and raises
``UndeclaredParamError`` for a parameter it does not declare (nothing is replicated silently;
norms are declared replicated). Both are data; nothing in the model knows about meshes. A
dimension that the mesh axes do not divide is left unsharded.

:func:`shardings_for_state` shards a model state (or optimizer state: leaves under ``mu`` /
``nu`` follow their parameter) this way; :func:`param_sharding_fn` is the same rule as the
``(name, shape) -> PartitionSpec`` callable ``load_model(..., shardings=...)`` places with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax.models import params as params_lib

MESH_AXES = ("data", "fsdp", "tensor")

# logical dimension name -> mesh axes it is split over
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),  # the model dimension of weights
    "heads": ("tensor",),  # q/k/v output features (heads x head_dim), o_proj input
    "mlp": ("tensor",),  # gate/up output, down input
    "expert": ("fsdp",),  # MoE experts (qwen3_moe): whole experts per device; their "embed" dim then stays whole
    "vocab": ("tensor",),
    "layers": None,
    "rank": None,
    "blocks": None,
    None: None,
}

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
    """Logical names for one array of the model, by its path ('layers/mlp/up_proj/lora_a' or
    'layers.mlp.up_proj.weight.packed'), as declared in ``qlora_jax.models.params``.

    Raises ``qlora_jax.models.params.UndeclaredParamError`` for a path the declaration lacks.
    """
    return params_lib.logical_axes(path, tuple(shape))


def param_sharding_fn(mesh: Mesh) -> Callable[[str, tuple[int, ...]], P]:
    """``(name, shape) -> PartitionSpec`` for ``load_model(..., mesh=mesh, shardings=...)``.

    ``name`` is a dotted model path (``"layers.mlp.up_proj.weight.packed"``); the spec comes from
    the parameter's declared logical axes (``qlora_jax.models.params``) and ``LOGICAL_RULES``.
    """

    def fn(name: str, shape: tuple[int, ...]) -> P:
        return spec_for(mesh, logical_axes_for(name, shape), shape)

    return fn


def shardings_for_state(mesh: Mesh, state: Any) -> Any:
    """NamedShardings for every leaf of a pytree of arrays (or ShapeDtypeStructs), by path.

    A leaf whose path reaches a model attribute (``embed_tokens``, ``layers``, ``norm``,
    ``lm_head``; e.g. a model state, or an optimizer's ``mu`` / ``nu`` of the adapters) is a
    parameter: its declared axes are used, and an undeclared one raises. Other leaves (an
    optimizer's step ``count``) are not parameters and are replicated.
    """

    def one(path, leaf):
        keys = [_key_str(k) for k in path]
        shape = tuple(getattr(leaf, "shape", ()))
        start = next((i for i, k in enumerate(keys) if k in params_lib.ROOTS), None)
        if start is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(mesh, logical_axes_for("/".join(keys[start:]), shape), shape))

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

"""Build a model from transformers-named tensors, and read one back out under the same names.

This is the seam with the checkpoint readers: they yield ``(hf_name, array)`` pairs (safetensors,
GGUF, a bitsandbytes checkpoint, a torch state dict...), and :func:`build_model` places each one
into the model, quantizing decoder linears on the way. The name table is derived from the model's
own parameter tree (HF name = ``model.`` + tree path, with the layer index re-inserted after
``layers``), so a weight is declared once, in the module that uses it.

Memory: the model is first built abstractly (``nnx.eval_shape``: shapes only), then filled tensor
by tensor into host buffers that already have the final (4-bit) layout. A weight is placed on its
device(s) as soon as it is complete (a stacked decoder weight when its last layer arrives), so
its host buffer is freed early. Peak host memory is about the quantized model plus the one float
tensor being converted (``bench/load_rss.py`` measures it).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qlora_jax import lora as lora_lib
from qlora_jax import lora_init
from qlora_jax.errors import ModelFileError
from qlora_jax.models import moe
from qlora_jax.models.config import ModelConfig, QuantConfig
from qlora_jax.models.layers import QuantParam, quantize_jit
from qlora_jax.models.model import CausalLM
from qlora_jax.quant import Quant4bit, dequantize_4bit

# Names a checkpoint may carry that hold nothing the model needs (recomputed buffers).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_QUANT_FIELDS = ("packed", "absmax", "nested_absmax", "offset")

Shardings = Callable[[str, tuple[int, ...]], "PartitionSpec | None"] | Mapping[str, PartitionSpec]


@dataclasses.dataclass(frozen=True)
class _Slot:
    path: tuple[str, ...]  # path of the Variable in the model tree
    layer: int | None  # index along the stacked layer axis, None outside the decoder stack


def _variables(model: nnx.Module) -> dict[tuple[str, ...], nnx.Variable]:
    return {tuple(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable)}


def hf_name_table(model: CausalLM) -> dict[str, _Slot]:
    """Every transformers tensor name the model's frozen weights correspond to, in HF order."""
    table: dict[str, _Slot] = {}
    variables = _variables(model)
    frozen = [p for p, v in variables.items() if not isinstance(v, lora_lib.LoRAParam)]
    top = [p for p in frozen if p[0] != "layers"]
    stacked = [p for p in frozen if p[0] == "layers"]
    for path in top:
        if path[0] == "embed_tokens":
            table["model." + ".".join(path)] = _Slot(path, None)
    for i in range(model.config.num_hidden_layers):
        for path in stacked:
            table[moe.hf_param_name(f"model.layers.{i}." + ".".join(path[1:]))] = _Slot(path, i)
    for path in top:
        if path[0] == "norm":
            table["model." + ".".join(path)] = _Slot(path, None)
        elif path[0] == "lm_head":
            table[".".join(path)] = _Slot(path, None)
    return table


def _ignorable(name: str, config: ModelConfig) -> bool:
    # A tied model's checkpoint may still carry lm_head.weight (a copy of the embedding).
    return bool(_IGNORED.fullmatch(name)) or (config.tie_word_embeddings and name == "lm_head.weight")


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor slipped through: accept it on the host
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            return x.float().numpy().astype(jnp.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _check_shape(name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ModelFileError(f"tensor {name!r} has shape {tuple(got)}, the model expects {tuple(want)}")


def _quantized_fields(name: str, tensor: Any, abstract: Quant4bit, per_layer: dict[str, tuple]) -> dict:
    """Host numpy fields of one layer's ``Quant4bit``, from a float tensor or a pre-quantized one."""
    if isinstance(tensor, Quant4bit):
        q = tensor
        _check_shape(name, q.shape, abstract.shape)
        if (q.quant_type, q.blocksize, q.double_quant) != (abstract.quant_type, abstract.blocksize,
                                                            abstract.absmax.dtype == jnp.uint8):
            raise ModelFileError(
                f"pre-quantized {name!r} is {q.quant_type}/blocksize {q.blocksize}/double_quant "
                f"{q.double_quant}; the model expects {abstract.quant_type}/blocksize "
                f"{abstract.blocksize}/double_quant {abstract.absmax.dtype == jnp.uint8}")
    else:
        arr = _as_numpy(tensor)
        _check_shape(name, arr.shape, abstract.shape)
        q = quantize_jit(jnp.asarray(arr), quant_type=abstract.quant_type, blocksize=abstract.blocksize,
                      double_quant=abstract.absmax.dtype == jnp.uint8)
    fields = {}
    for field in _QUANT_FIELDS:
        value = np.asarray(getattr(q, field))
        shape, dtype = per_layer[field]
        if value.size != int(np.prod(shape, dtype=np.int64)) or value.dtype != dtype:
            raise ModelFileError(f"{name!r}.{field}: {value.dtype}{list(value.shape)} does not fit the "
                                 f"model's {dtype}{list(shape)}")
        fields[field] = value.reshape(shape)  # e.g. bitsandbytes' flat [n/2, 1] -> [out, in/2]
    return fields


def _quantized_expert_fields(name: str, tensor: Any, abstract: Quant4bit, per_layer: dict[str, tuple]) -> dict:
    """One layer's MoE experts ``[E, out, in]``: each expert quantized alone (the bytes bitsandbytes
    gives that ``[out, in]`` matrix), the fields stacked along a leading expert axis."""
    if isinstance(tensor, Quant4bit):
        raise ModelFileError(f"{name!r}: pre-quantized MoE experts are not supported (give float weights)")
    arr = _as_numpy(tensor)
    num_experts = per_layer["offset"][0][0]
    _check_shape(name, arr.shape, (num_experts,) + tuple(abstract.shape))
    per_expert = {f: (shape[1:], dtype) for f, (shape, dtype) in per_layer.items()}
    rows = [_quantized_fields(f"{name}[{e}]", arr[e], abstract, per_expert) for e in range(num_experts)]
    return {f: np.stack([row[f] for row in rows]) for f in _QUANT_FIELDS}


def _leaf_sharding(mesh: Mesh | None, shardings: Shardings | None, name: str, shape: tuple):
    if mesh is None:
        return None
    spec = None
    if callable(shardings):
        spec = shardings(name, shape)
    elif shardings is not None:
        for pattern, candidate in shardings.items():
            if re.fullmatch(pattern, name):
                spec = candidate
                break
    return NamedSharding(mesh, spec if spec is not None else PartitionSpec())


def build_model(config: ModelConfig | dict | str, tensors: Iterable[tuple[str, Any]], *,
                quant: QuantConfig | None = None, lora: lora_lib.LoraConfig | None = None,
                dtype: Any = None, param_dtype: Any = None, rng_seed: int = 0,
                mesh: Mesh | None = None, shardings: Shardings | None = None) -> CausalLM:
    """A :class:`CausalLM` filled from ``(hf_name, array)`` pairs in transformers naming.

    ``tensors`` yields float arrays (numpy, incl. ml_dtypes bfloat16; torch tensors are accepted
    too), or, for a decoder linear's ``.weight`` when ``quant`` is set, a ready ``Quant4bit``
    (e.g. read from a bitsandbytes checkpoint; flat ``[n/2, 1]`` layouts are reshaped, its
    quant type / blocksize / double quantization must match ``quant``). Float decoder-linear
    weights are quantized one tensor at a time (each alone, as bitsandbytes quantizes each
    ``nn.Linear``), in the dtype they arrive in; every other weight is cast to ``param_dtype``.
    Names of recomputed buffers (``rotary_emb.inv_freq``) and a tied model's ``lm_head.weight``
    are skipped. Unknown, missing or repeated names raise ``ValueError`` listing them.

    LoRA adapters are initialized by ``lora.init_adapters`` from ``rng_seed``, to the same values
    ``CausalLM(..., rngs=nnx.Rngs(rng_seed))`` starts with.

    With ``mesh``, every array is placed with a ``NamedSharding``: its ``PartitionSpec`` comes
    from ``shardings`` -- a callable ``(name, shape) -> spec | None`` or a mapping
    ``{regex: spec}`` fullmatched against names like ``"layers.mlp.up_proj.weight"`` /
    ``"layers.mlp.up_proj.weight.packed"`` / ``"layers.mlp.up_proj.lora_a"`` (stacked arrays
    have the layer axis first) -- and is replicated when none is given.
    ``qlora_jax.train.sharding.param_sharding_fn(mesh)`` is the callable that places each array
    by its declared logical axes (``qlora_jax.models.params``). The mesh's axes must be
    ``AxisType.Auto`` (GSPMD propagation inside the step).
    """
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_hf(config)
    if mesh is not None and any(t != AxisType.Auto for t in mesh.axis_types):
        # Explicit axes put shardings into array types; the NF4 dequantization's table gather
        # has no explicit-sharding rule, so the first forward would fail far from here.
        raise ValueError(f"build_model needs a mesh with AxisType.Auto axes, got {mesh.axis_types}; "
                         f"e.g. jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))")

    def make() -> CausalLM:
        return CausalLM(config, lora=lora, quant=quant, dtype=dtype, param_dtype=param_dtype,
                        rngs=nnx.Rngs(rng_seed))

    model = nnx.eval_shape(make)
    variables = _variables(model)
    table = hf_name_table(model)
    num_layers = config.num_hidden_layers
    host: dict[tuple[str, ...], Any] = {}  # stacked path -> numpy buffer, or {field: numpy buffer}
    filled: dict[tuple[str, ...], int] = {}  # stacked path -> layers written so far
    placed: dict[tuple[str, ...], Any] = {}  # path -> jax.Array, or {field: jax.Array}
    seen: set[str] = set()
    unknown, repeated = [], []
    # PiSSA / LoftQ: an adapted weight's stored base becomes its residual (lora_init.py).
    svd_init = lora_init.BaseInitializer(model, lora) if lora is not None and lora_init.changes_base(lora.init) else None

    def place(name: str, value: np.ndarray) -> jax.Array:
        return jax.device_put(value, _leaf_sharding(mesh, shardings, name, value.shape))

    def place_path(path: tuple[str, ...], value: Any) -> None:
        """Put a finished weight on its device(s) now, so its host buffer can go."""
        name = ".".join(path)
        if isinstance(value, dict):
            placed[path] = {f: place(f"{name}.{f}", value[f]) for f in _QUANT_FIELDS}
        else:
            placed[path] = place(name, value)

    if config.num_experts:  # per-expert checkpoint tensors -> the fused [E, ...] ones (models/moe.py)
        tensors = moe.fuse_expert_tensors(tensors, config.num_experts, _as_numpy)
    for name, tensor in tensors:
        slot = table.get(name)
        if slot is None:
            if not _ignorable(name, config):
                unknown.append(name)
            continue
        if name in seen:
            repeated.append(name)
            continue
        seen.add(name)
        var = variables[slot.path]
        abstract = var.get_value()
        stacked = slot.layer is not None
        if svd_init is not None:
            tensor = svd_init.base_tensor(name, slot.path, slot.layer, tensor, abstract)
        if isinstance(var, QuantParam):
            per_layer = {f: (getattr(abstract, f).shape[1 if stacked else 0:], getattr(abstract, f).dtype)
                         for f in _QUANT_FIELDS}
            quantized = _quantized_expert_fields if "experts" in slot.path else _quantized_fields
            fields = quantized(name, tensor, abstract, per_layer)
            if not stacked:
                place_path(slot.path, fields)
                continue
            buf = host.setdefault(slot.path, {
                f: np.empty(getattr(abstract, f).shape, getattr(abstract, f).dtype) for f in _QUANT_FIELDS})
            for f in _QUANT_FIELDS:
                buf[f][slot.layer] = fields[f]
        else:
            if isinstance(tensor, Quant4bit):
                raise ModelFileError(f"{name!r} is a Quant4bit but the model keeps this weight unquantized "
                                 f"(pass quant=QuantConfig(...) to quantize decoder linears)")
            arr = _as_numpy(tensor)
            _check_shape(name, arr.shape, abstract.shape[1:] if stacked else abstract.shape)
            arr = np.asarray(arr, dtype=abstract.dtype)  # no copy when the dtype already fits
            if not stacked:
                place_path(slot.path, arr)
                continue
            host.setdefault(slot.path, np.empty(abstract.shape, abstract.dtype))[slot.layer] = arr
        del tensor
        filled[slot.path] = filled.get(slot.path, 0) + 1
        if filled[slot.path] == num_layers:  # every layer is in: place the stacked array
            place_path(slot.path, host.pop(slot.path))

    missing = [n for n in table if n not in seen]
    problems = []
    def some(names: list[str]) -> str:  # a few names: one readable line even for a whole model
        return str(names) if len(names) <= 6 else f"{names[:6]} and {len(names) - 6} more"

    if unknown:
        problems.append(f"unknown tensor names ({len(unknown)}): {some(unknown)}")
    if missing:
        problems.append(f"missing tensor names ({len(missing)}): {some(missing)}")
    if repeated:
        problems.append(f"repeated tensor names ({len(repeated)}): {some(repeated)}")
    if problems:
        raise ModelFileError(f"cannot build {config.model_type} model ({num_layers} layers): "
                         + "; ".join(problems))

    for path, var in variables.items():
        if isinstance(var, lora_lib.LoRAParam):
            continue
        value = placed.pop(path)
        if isinstance(var, QuantParam):
            var.set_value(dataclasses.replace(var.get_value(), **value))
        else:
            var.set_value(value)

    if lora is not None:
        lora_lib.init_adapters(model, lora, nnx.Rngs(rng_seed).lora())
        if svd_init is not None:
            svd_init.write_adapters(model)
        if mesh is not None:
            for path, var in variables.items():
                if isinstance(var, lora_lib.LoRAParam):
                    var.set_value(place(".".join(path), np.asarray(var.get_value())))
    return model


def iter_hf_tensors(model: CausalLM, *, merge_lora: bool = False,
                    dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """The model's frozen weights under transformers names, one host array at a time.

    4-bit linears are dequantized; with ``merge_lora`` every adapted linear's weight is
    ``W + s B A``, rescaled per row with DoRA (``lora.merge_linear``): a merged model for export.
    Adapters themselves are not yielded (see ``qlora_jax.lora.peft_adapter_tensors``). Tied
    models yield no ``lm_head.weight``.
    """
    variables = _variables(model)
    masks = dict(model.lora_layer_mask)
    scale = model.lora_config.scale if model.lora_config is not None else 0.0
    for name, slot in hf_name_table(model).items():
        var = variables[slot.path]
        value = var.get_value()
        if slot.layer is not None:
            value = jax.tree.map(operator.itemgetter(slot.layer), value)
        if isinstance(var, QuantParam):
            value = (moe.materialize_experts_jit(value, dtype=jnp.float32) if "experts" in slot.path
                     else dequantize_4bit(value, jnp.float32))
        value = np.asarray(value, np.float32)
        proj = slot.path[-2]
        lora_a = variables.get(slot.path[:-1] + ("lora_a",))
        if merge_lora and "experts" in slot.path and lora_a is not None:  # MoE: W_e + s B_e A_e per expert
            lora_b = variables[slot.path[:-1] + ("lora_b",)]
            value = moe.merged_experts(value, lora_a.get_value()[slot.layer], lora_b.get_value()[slot.layer], scale)
        if merge_lora and slot.path[-1] == "weight" and proj in masks and masks[proj][slot.layer]:
            a, b = (np.asarray(variables[slot.path[:-1] + (k,)].get_value()[slot.layer], np.float32)
                    for k in ("lora_a", "lora_b"))
            magnitude = variables.get(slot.path[:-1] + (lora_lib.MAGNITUDE,))
            if magnitude is not None:
                magnitude = np.asarray(magnitude.get_value()[slot.layer], np.float32)
            value = lora_lib.merge_linear(value, a, b, scale, magnitude)
        yield name, value.astype(dtype)

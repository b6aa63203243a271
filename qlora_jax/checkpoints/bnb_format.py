"""bitsandbytes 4-bit checkpoints: the safetensors layout transformers + bitsandbytes write.

One quantized linear ``W`` [out, in] is stored as six tensors under its weight key
(``model.layers.0.mlp.down_proj.weight``)::

    {key}                                   uint8 [(out*in + 1) // 2, 1]  packed codes
    {key}.absmax                            [n_blocks], uint8 codes when double-quantized else f32
    {key}.quant_map                         f32 [16]   the NF4 / FP4 code table
    {key}.nested_absmax                     f32 [ceil(n_blocks / 256)]     (double quant only)
    {key}.nested_quant_map                  f32 [256]  bitsandbytes' signed dynamic map (idem)
    {key}.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON object: quant_type, blocksize,
                                            dtype, shape, and with double quant nested_blocksize,
                                            nested_dtype, nested_offset   (``__fp4`` for FP4)

and ``config.json`` carries ``quantization_config`` with ``quant_method: "bitsandbytes"``.
The bit-level semantics (block order, nibble order, double quantization) are exactly those of
``qlora_jax.quant.Quant4bit``, so conversion is a reshape: codes are never re-quantized.

Quant4bit values built here hold numpy arrays (zero-copy views of what was read); pass them to
``jax.device_put`` with the sharding they should live in.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qlora_jax.checkpoints.hf_reader import CONFIG_FILE, SafetensorsReader
from qlora_jax.checkpoints.hf_writer import ShardedWriter
from qlora_jax.quant import NESTED_BLOCKSIZE, QUANT_TYPES, Quant4bit, code_table
from qlora_jax.quant.codes import BLOCKSIZES, DYNAMIC_MAP_SIGNED
from qlora_jax.quant.nf4 import row_layout

QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
# Suffixes of the tensors that accompany a quantized weight.
COMPONENT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map") + tuple(
    QUANT_STATE_PREFIX + t for t in QUANT_TYPES)
_DTYPES = ("float32", "bfloat16", "float16")


def _weight_key(prefix: str) -> str:
    """The weight's own key; a module path (``...down_proj``) is accepted too."""
    return prefix if prefix.endswith(".weight") else prefix + ".weight"


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.asarray(a)
    return a.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ------------------------------------------------------------------------------------------
# One tensor
# ------------------------------------------------------------------------------------------

def quant4bit_to_bnb_tensors(prefix: str, q: Quant4bit) -> dict[str, np.ndarray]:
    """The safetensors entries bitsandbytes would write for ``q``.

    ``prefix`` is the weight's key (``model.layers.0.self_attn.q_proj.weight``).
    """
    key = _weight_key(prefix)
    if q.dtype not in _DTYPES:
        raise ValueError(f"bitsandbytes stores quant states of {_DTYPES} weights, not {q.dtype}")
    packed = np.asarray(q.packed, dtype=np.uint8).reshape(-1, 1)
    absmax = np.asarray(q.absmax).reshape(-1)
    if packed.shape[0] != (q.size + 1) // 2 or absmax.shape[0] != q.n_blocks:
        raise ValueError(f"{key}: packed {packed.shape} / absmax {absmax.shape} do not fit shape {q.shape}")
    state: dict[str, Any] = {
        "quant_type": q.quant_type,
        "blocksize": int(q.blocksize),
        "dtype": q.dtype,
        "shape": [int(d) for d in q.shape],
    }
    tensors = {
        key: packed,
        f"{key}.absmax": absmax.astype(np.uint8 if q.double_quant else np.float32),
        f"{key}.quant_map": code_table(q.quant_type).copy(),
    }
    if q.double_quant:
        tensors[f"{key}.nested_absmax"] = np.asarray(q.nested_absmax, dtype=np.float32).reshape(-1)
        tensors[f"{key}.nested_quant_map"] = DYNAMIC_MAP_SIGNED.copy()
        state.update({
            "nested_blocksize": NESTED_BLOCKSIZE,
            "nested_dtype": "float32",
            # float32 -> Python float is exact, and json writes a float64 repr that reads back exactly.
            "nested_offset": float(np.asarray(q.offset, dtype=np.float32)),
        })
    tensors[f"{key}.{QUANT_STATE_PREFIX}{q.quant_type}"] = np.frombuffer(
        json.dumps(state).encode("utf-8"), dtype=np.uint8).copy()
    return tensors


def _quant_state_key(key: str, tensors: Mapping[str, Any]) -> str:
    found = [f"{key}.{QUANT_STATE_PREFIX}{t}" for t in QUANT_TYPES
             if f"{key}.{QUANT_STATE_PREFIX}{t}" in tensors]
    if len(found) != 1:
        raise KeyError(f"expected exactly one {key}.{QUANT_STATE_PREFIX}{{nf4,fp4}} entry, found {found}")
    return found[0]


def bnb_tensors_to_quant4bit(prefix: str, tensors: Mapping[str, Any]) -> Quant4bit:
    """Rebuild the Quant4bit of one bitsandbytes-quantized weight from its safetensors entries.

    Validates the JSON quant state, that ``quant_map`` is our NF4/FP4 table and
    ``nested_quant_map`` our dynamic map bit for bit (a checkpoint quantized with other code
    books would decode differently), and every shape. Raises ValueError / KeyError naming the
    offending entry.
    """
    key = _weight_key(prefix)
    state_key = _quant_state_key(key, tensors)
    state = json.loads(bytes(np.asarray(tensors[state_key], dtype=np.uint8).reshape(-1)).decode("utf-8"))

    quant_type = state.get("quant_type")
    if quant_type not in QUANT_TYPES or not state_key.endswith(quant_type):
        raise ValueError(f"{state_key}: quant_type {quant_type!r} does not match the key or is unknown")
    blocksize = int(state["blocksize"])
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{state_key}: blocksize {blocksize} not in {BLOCKSIZES}")
    dtype = state["dtype"]
    if dtype not in _DTYPES:
        raise ValueError(f"{state_key}: dtype {dtype!r} not in {_DTYPES}")
    shape = tuple(int(d) for d in state["shape"])
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)

    quant_map = np.asarray(tensors[f"{key}.quant_map"])
    if not _same_bits(quant_map, code_table(quant_type)):
        raise ValueError(f"{key}.quant_map is not the {quant_type} code table this package decodes with: "
                         f"{quant_map.tolist()} vs {code_table(quant_type).tolist()}")

    # The packed bytes; a non-uint8 bnb_4bit_quant_storage only changes how they are typed.
    packed = np.ascontiguousarray(np.asarray(tensors[key])).reshape(-1).view(np.uint8)
    if packed.shape[0] != (n + 1) // 2:
        raise ValueError(f"{key}: {packed.shape[0]} packed bytes, expected {(n + 1) // 2} for shape {shape}")
    absmax = np.asarray(tensors[f"{key}.absmax"]).reshape(-1)
    if absmax.shape[0] != n_blocks:
        raise ValueError(f"{key}.absmax has {absmax.shape[0]} entries, expected {n_blocks}")

    if "nested_offset" in state:   # double quantization
        if int(state.get("nested_blocksize", -1)) != NESTED_BLOCKSIZE:
            raise ValueError(f"{state_key}: nested_blocksize {state.get('nested_blocksize')} != {NESTED_BLOCKSIZE}")
        if state.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"{state_key}: nested_dtype {state.get('nested_dtype')!r} is not float32")
        if absmax.dtype != np.uint8:
            raise ValueError(f"{key}.absmax is {absmax.dtype}; double-quantized absmax must be uint8 codes")
        nested_map = np.asarray(tensors[f"{key}.nested_quant_map"])
        if not _same_bits(nested_map, DYNAMIC_MAP_SIGNED):
            raise ValueError(f"{key}.nested_quant_map is not bitsandbytes' signed 8-bit dynamic map "
                             "(create_dynamic_map(signed=True)) that this package decodes with")
        nested_absmax = np.asarray(tensors[f"{key}.nested_absmax"], dtype=np.float32).reshape(-1)
        if nested_absmax.shape[0] != -(-n_blocks // NESTED_BLOCKSIZE):
            raise ValueError(f"{key}.nested_absmax has {nested_absmax.shape[0]} entries, "
                             f"expected {-(-n_blocks // NESTED_BLOCKSIZE)}")
        offset = np.asarray(np.float32(state["nested_offset"]))
    else:
        if absmax.dtype.kind != "f":
            raise ValueError(f"{key}.absmax is {absmax.dtype} without double quantization; expected float")
        absmax = absmax.astype(np.float32)
        nested_absmax = np.zeros((0,), np.float32)
        offset = np.zeros((), np.float32)

    if row_layout(shape, blocksize):
        packed = packed.reshape(shape[:-1] + (shape[-1] // 2,))
        absmax = absmax.reshape(shape[:-1] + (shape[-1] // blocksize,))
    return Quant4bit(packed=packed, absmax=absmax, nested_absmax=nested_absmax, offset=offset,
                     shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type)


# ------------------------------------------------------------------------------------------
# Whole checkpoints
# ------------------------------------------------------------------------------------------

def is_bnb_4bit_checkpoint(config: Mapping[str, Any]) -> bool:
    """Whether a config.json dict describes a bitsandbytes 4-bit quantized checkpoint."""
    qc = config.get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))


def bnb_quantization_config(quant_type: str = "nf4", double_quant: bool = True,
                            compute_dtype: str = "bfloat16",
                            skip_modules: list[str] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` entry transformers writes for a bitsandbytes 4-bit model."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
    }


def quantized_weight_keys(names: Iterable[str]) -> list[str]:
    """Keys of the weights that carry a bitsandbytes quant state, from a list of tensor names."""
    keys = []
    for name in names:
        for quant_type in QUANT_TYPES:
            suffix = f".{QUANT_STATE_PREFIX}{quant_type}"
            if name.endswith(suffix):
                keys.append(name[: -len(suffix)])
    return keys


def iter_bnb_checkpoint(model_dir: str | os.PathLike) -> Iterator[tuple[str, np.ndarray | Quant4bit]]:
    """Yield ``(name, Quant4bit)`` for each quantized linear and ``(name, array)`` for the rest.

    Names are the checkpoint's own (``...q_proj.weight``); the quant state's companion tensors
    are folded into their Quant4bit, wherever the shards put them. Unquantized tensors keep
    their stored dtype (see ``hf_reader.iter_hf_tensors``).
    """
    with SafetensorsReader(model_dir) as reader:
        quantized = set(quantized_weight_keys(reader))
        components = {f"{key}.{suffix}" for key in quantized for suffix in COMPONENT_SUFFIXES}
        for name in reader:
            if name in components:
                continue
            if name in quantized:
                entries = {c: reader[c] for c in (f"{name}.{s}" for s in COMPONENT_SUFFIXES) if c in reader}
                entries[name] = reader[name]
                yield name, bnb_tensors_to_quant4bit(name, entries)
            else:
                yield name, reader[name]


def save_bnb_checkpoint(model_dir: str | os.PathLike,
                        tensors: Iterable[tuple[str, np.ndarray | Quant4bit]],
                        config: Mapping[str, Any],
                        quantization_config: Mapping[str, Any] | None = None,
                        max_shard_bytes: int | None = None) -> Path:
    """Write a checkpoint transformers + bitsandbytes load with ``from_pretrained``.

    ``tensors`` yields transformers names with either arrays (written as they are) or Quant4bit
    (written in the layout above). ``config`` is the model's config.json dict; its
    ``quantization_config`` is set from ``quantization_config`` or, when absent, derived from the
    first Quant4bit. With ``max_shard_bytes`` the tensors go to several shards plus
    ``model.safetensors.index.json``; a weight's quant state never straddles two shards. Tensors
    are streamed: memory holds one shard at most.
    """
    out = Path(model_dir)
    first_quant: Quant4bit | None = None
    with ShardedWriter(out, max_shard_bytes) as writer:
        for name, value in tensors:
            if isinstance(value, Quant4bit):
                first_quant = first_quant or value
                writer.add(quant4bit_to_bnb_tensors(name, value))
            else:
                writer.add({name: np.asarray(value)})
        if quantization_config is None:
            if first_quant is None:
                raise ValueError("no Quant4bit among the tensors and no quantization_config given")
            quantization_config = bnb_quantization_config(first_quant.quant_type, first_quant.double_quant,
                                                          compute_dtype=first_quant.dtype)
    config = dict(config)
    config["quantization_config"] = dict(quantization_config)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out

"""Write Hugging Face checkpoint directories: sharded safetensors, config.json, tokenizer files.

Two model layouts are written from a :class:`~qlora_jax.models.CausalLM`:

* **merged**: every weight as a float tensor (bf16 or f32), 4-bit bases dequantized and LoRA
  adapters merged in (``W + s B A``); transformers loads it as a plain model.
* **bnb4**: decoder linears in bitsandbytes' 4-bit layout (the model's own NF4/FP4 codes, copied,
  never re-quantized; see ``bnb_format``), everything else as float tensors. Adapters are not
  merged into it (merging would need a re-quantization); they are written beside it.

Tensors stream one at a time into :class:`ShardedWriter`, which holds at most one shard in memory.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from qlora_jax.checkpoints.hf_reader import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from qlora_jax.models import QuantParam, hf_name_table, iter_hf_tensors
from qlora_jax.quant import quantize_4bit

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' usual 5 GB shards
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Config keys that describe how a source was stored, not the model: dropped from an export.
_STORAGE_KEYS = ("quantization_config", "dtype", "torch_dtype", "transformers_version", "_name_or_path")
# Files besides the weights and tokenizer worth carrying over from a source directory.
_EXTRA_FILES = ("generation_config.json",)


def numpy_dtype(dtype: str | Any) -> np.dtype:
    """"bfloat16" / "float32" / "float16" (or a numpy dtype) -> numpy dtype (ml_dtypes for bf16)."""
    if isinstance(dtype, str):
        if dtype not in EXPORT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
        return np.dtype(EXPORT_DTYPES[dtype])
    return np.dtype(dtype)


def dtype_name(dtype: str | Any) -> str:
    return {np.dtype(v): k for k, v in EXPORT_DTYPES.items()}[numpy_dtype(dtype)]


class ShardedWriter:
    """Safetensors shards written as tensors arrive: ``model.safetensors`` when everything fits in
    one shard, else ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

    ``add(group)`` takes a dict of tensors that stay together in one shard (a bitsandbytes weight
    and its quant state). A shard is flushed to disk once the next group would overflow it, so
    memory holds one shard at most. Use as a context manager or call ``close()``.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._shard: dict[str, np.ndarray] = {}
        self._shard_bytes = 0
        self._written: list[tuple[Path, list[str], int]] = []  # (temporary file, names, bytes)
        self._names: set[str] = set()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written shards behind
            for path, _, _ in self._written:
                path.unlink(missing_ok=True)

    def add(self, group: Mapping[str, np.ndarray]) -> None:
        group = {name: np.ascontiguousarray(np.asarray(t)) for name, t in group.items()}
        repeated = self._names.intersection(group)
        if repeated:
            raise ValueError(f"tensor(s) written twice: {sorted(repeated)}")
        self._names.update(group)
        size = sum(t.nbytes for t in group.values())
        if self.max_shard_bytes and self._shard and self._shard_bytes + size > self.max_shard_bytes:
            self._flush()
        self._shard.update(group)
        self._shard_bytes += size

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        path = self.out / f".shard-{len(self._written):05d}.safetensors.tmp"
        save_file(self._shard, str(path), metadata={"format": "pt"})  # "pt": what transformers expects
        self._written.append((path, list(self._shard), self._shard_bytes))
        self._shard, self._shard_bytes = {}, 0

    def close(self) -> list[Path]:
        """Finish the last shard, name the files, write the index when sharded; returns the files."""
        if self._shard or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            path = self.out / SINGLE_FILE
            os.replace(self._written[0][0], path)
            (self.out / INDEX_FILE).unlink(missing_ok=True)
            return [path]
        files, weight_map, total = [], {}, 0
        for i, (tmp, names, size) in enumerate(self._written, 1):
            path = self.out / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, path)
            files.append(path)
            weight_map.update({name: path.name for name in names})
            total += size
        (self.out / SINGLE_FILE).unlink(missing_ok=True)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files


# ------------------------------------------------------------------------------------------
# config.json and the files around the weights
# ------------------------------------------------------------------------------------------

def export_config(source_config: Mapping[str, Any], dtype: str | Any) -> dict[str, Any]:
    """The config.json of an exported model: the source's, minus how the source was stored
    (``quantization_config``, its dtype), plus ``dtype`` (transformers 5) and ``torch_dtype``
    (earlier versions) naming the dtype the weights are written in."""
    config = {k: v for k, v in source_config.items() if k not in _STORAGE_KEYS}
    name = dtype_name(dtype)
    config["dtype"] = name
    config["torch_dtype"] = name
    return config


def write_config(out_dir: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / CONFIG_FILE
    path.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return path


def write_tokenizer(out_dir: str | os.PathLike, tokenizer) -> list[str]:
    """``tokenizer.save_pretrained``: tokenizer.json, tokenizer_config.json, the chat template."""
    if tokenizer is None:
        return []
    return [Path(p).name for p in tokenizer.save_pretrained(str(out_dir))]


def copy_extra_files(source_dir: str | os.PathLike | None, out_dir: str | os.PathLike) -> list[str]:
    """Copy files such as generation_config.json from a source checkpoint directory."""
    if source_dir is None or not Path(source_dir).is_dir():
        return []
    copied = []
    for name in _EXTRA_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------------------
# Model -> tensors
# ------------------------------------------------------------------------------------------

def _variable(model, path: tuple[str, ...]):
    return functools.reduce(getattr, path, model)


def iter_bnb_tensors(model, *, dtype: str | Any = "bfloat16", quant_type: str = "nf4", blocksize: int = 64,
                     double_quant: bool = True) -> Iterator[tuple[str, Any]]:
    """The frozen base of ``model`` under transformers names, decoder linears as ``Quant4bit``.

    A 4-bit base yields its stored codes and statistics unchanged (host numpy copies, one layer
    at a time). A float base (loaded with ``quantize=None``) is quantized here with
    ``quant_type`` / ``blocksize`` / ``double_quant``, exactly as bitsandbytes would. Every other
    weight is cast to ``dtype``. Adapters are not included.
    """
    quantize = jax.jit(quantize_4bit, static_argnames=("quant_type", "blocksize", "double_quant"))
    np_dtype = numpy_dtype(dtype)
    linear_weights = {f"{v.hf_name}.weight" for v in model.iter_linears()}
    for name, slot in hf_name_table(model).items():
        var = _variable(model, slot.path)
        value = var.get_value()
        if slot.layer is not None:
            value = jax.tree.map(lambda a, i=slot.layer: np.asarray(a[i]), value)
        if isinstance(var, QuantParam):
            yield name, jax.tree.map(np.asarray, value)
        elif name in linear_weights:
            q = quantize(np.asarray(value), quant_type=quant_type, blocksize=blocksize,
                              double_quant=double_quant)
            yield name, jax.tree.map(np.asarray, q)
        else:
            yield name, np.asarray(np.asarray(value, np.float32), np_dtype)


def save_merged(model, out_dir: str | os.PathLike, *, config: Mapping[str, Any], tokenizer=None,
                dtype: str | Any = "bfloat16", max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
                source_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` with adapters merged (``W + s B A`` on a dequantized base) as a plain
    transformers checkpoint in ``dtype``.

    ``config``: the source's config.json dict (see :func:`export_config`). ``tokenizer``: saved
    with ``save_pretrained`` (chat template included). ``source_dir``: a source checkpoint
    directory to copy ``generation_config.json`` from.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = numpy_dtype(dtype)
    with ShardedWriter(out, max_shard_bytes) as writer:
        for name, value in iter_hf_tensors(model, merge_lora=True, dtype=np.float32):
            writer.add({name: value.astype(np_dtype)})  # f32 -> bf16 rounds to nearest even
    write_config(out, export_config(config, np_dtype))
    write_tokenizer(out, tokenizer)
    copy_extra_files(source_dir, out)
    return out


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "EXPORT_DTYPES", "ShardedWriter", "copy_extra_files", "export_config",
           "iter_bnb_tensors", "numpy_dtype", "save_merged", "write_config", "write_tokenizer"]

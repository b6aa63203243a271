"""Read Hugging Face checkpoint directories: config.json, safetensors shards, tokenizer.

Tensors are read one at a time through ``safetensors.safe_open(framework="numpy")`` (the files
are memory-mapped; only the requested tensor is copied out), so a loader can quantize or shard
each weight as it arrives and never hold the whole model in memory. No torch at run time:
bfloat16 tensors come out as ``ml_dtypes.bfloat16`` numpy arrays (importing ml_dtypes is what
lets safetensors' numpy path name that dtype).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy, which safetensors relies on)
import numpy as np
from safetensors import safe_open

from qlora_jax.errors import ModelFileError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def open_safetensors(file: str | os.PathLike):
    """``safe_open(file)``; a truncated or corrupt file (header, offsets) raises :class:`ModelFileError`."""
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # SafetensorError: the header does not describe the bytes on disk
        size = os.path.getsize(file) if os.path.exists(file) else 0
        raise ModelFileError(f"{file}: truncated or corrupt safetensors file ({size:,} bytes; {e})") from e


def read_json(file: str | os.PathLike) -> Any:
    """A JSON file of a checkpoint; invalid JSON raises :class:`ModelFileError` naming file and line."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{file}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{file}: not UTF-8 text (byte {e.start}); is it really a JSON file?") from e


def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    return path


def safetensors_index(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the file that holds it, in file order.

    Uses ``model.safetensors.index.json`` when present, else ``model.safetensors``, else the
    ``model-XXXXX-of-YYYYY.safetensors`` shards. Other safetensors files in the directory (e.g.
    ``adapter_model.safetensors``) are not part of the model and are ignored.
    """
    path = _model_dir(model_dir)
    if (path / INDEX_FILE).is_file():
        index_json = read_json(path / INDEX_FILE)
        if not isinstance(index_json, dict) or not isinstance(index_json.get("weight_map"), dict):
            raise ModelFileError(f"{path / INDEX_FILE}: has no 'weight_map' object")
        weight_map = index_json["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))   # file order of first appearance
        for name in files:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{INDEX_FILE} names {name}, which is missing from {path}")
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        files = sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
        if not files:
            found = sorted(p.name for p in path.iterdir())
            raise FileNotFoundError(f"no model safetensors in {path} (found: {found})")
    index: dict[str, Path] = {}
    for name in files:
        with open_safetensors(path / name) as f:
            for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                if key in index:
                    raise ModelFileError(f"tensor {key!r} is in both {index[key].name} and {name} ({path})")
                index[key] = path / name
    return index


class SafetensorsReader:
    """Random access to the tensors of a checkpoint directory, one file handle per shard.

    Use as a context manager: ``with SafetensorsReader(d) as r: r[name]``.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.index = safetensors_index(model_dir)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def keys(self) -> Iterable[str]:
        return self.index.keys()

    def __getitem__(self, name: str) -> np.ndarray:
        file = self.index[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(open_safetensors(file))
        return self._handles[file].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.index[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(open_safetensors(file))
        return tuple(self._handles[file].get_slice(name).get_shape())


def iter_hf_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for every tensor of the checkpoint, shard by shard.

    Arrays keep their stored dtype (float32, float16, ``ml_dtypes.bfloat16``, uint8 ...).
    """
    with SafetensorsReader(model_dir) as reader:
        for name in reader:
            yield name, reader[name]


def hf_tensor_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the file headers only."""
    with SafetensorsReader(model_dir) as reader:
        return {name: reader.shape(name) for name in reader}


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with ``rope_theta`` and ``rope_scaling`` always present.

    transformers >= 5 writes ``rope_parameters: {rope_theta, rope_type, ...}`` instead of the
    ``rope_theta`` / ``rope_scaling`` pair most published config.json files have; we fill the
    pair in from it (rope_scaling None for the default rope) and leave everything else as is.
    """
    config = dict(config)
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        if "rope_theta" not in config and "rope_theta" in params:
            config["rope_theta"] = params["rope_theta"]
        if "rope_scaling" not in config:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    config.setdefault("rope_scaling", None)
    return config


def hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict (see ``normalize_config``)."""
    path = _model_dir(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path.parent}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return normalize_config(config)


def load_tokenizer(model_dir: str | os.PathLike):
    """The checkpoint's tokenizer (with its chat template), from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_dir(model_dir)), local_files_only=True)

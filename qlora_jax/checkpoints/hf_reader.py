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

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
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
        with safe_open(path / name, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                if key in index:
                    raise ValueError(f"tensor {key!r} is in both {index[key].name} and {name}")
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
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        return self._handles[file].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.index[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
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
    return normalize_config(json.loads(path.read_text()))


def load_tokenizer(model_dir: str | os.PathLike):
    """The checkpoint's tokenizer (with its chat template), from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_dir(model_dir)), local_files_only=True)

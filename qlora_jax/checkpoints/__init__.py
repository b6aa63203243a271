"""Checkpoints in: Hugging Face safetensors, bitsandbytes 4-bit safetensors, GGUF, built-in models.
Checkpoints out: merged HF safetensors, bitsandbytes 4-bit safetensors, GGUF (and PEFT adapters,
``peft_io``).

Every reader yields ``(transformers name, tensor)`` one tensor at a time, so a loader can
quantize or shard each weight as it arrives; every writer consumes such a stream.
"""

from qlora_jax.checkpoints.bnb_format import (
    bnb_quantization_config,
    bnb_tensors_to_quant4bit,
    is_bnb_4bit_checkpoint,
    iter_bnb_checkpoint,
    quant4bit_to_bnb_tensors,
    save_bnb_checkpoint,
)
from qlora_jax.checkpoints.builtin import (
    BUILTIN_MODELS,
    DEFAULT_BUILTIN,
    builtin_names,
    is_builtin,
    resolve_builtin,
)
from qlora_jax.checkpoints.gguf_reader import (
    gguf_config,
    gguf_tensor_shapes,
    gguf_tokenizer,
    iter_gguf_tensors,
    open_gguf,
)
from qlora_jax.checkpoints.gguf_writer import save_gguf, tokenizer_metadata, write_gguf
from qlora_jax.checkpoints.hf_reader import (
    SafetensorsReader,
    hf_config,
    hf_tensor_shapes,
    iter_hf_tensors,
    load_tokenizer,
    normalize_config,
)
from qlora_jax.checkpoints.hf_writer import ShardedWriter, iter_bnb_tensors, save_merged

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_BUILTIN", "SafetensorsReader", "bnb_quantization_config",
    "bnb_tensors_to_quant4bit", "builtin_names", "gguf_config", "gguf_tensor_shapes", "gguf_tokenizer",
    "hf_config", "hf_tensor_shapes", "is_bnb_4bit_checkpoint", "is_builtin", "iter_bnb_checkpoint",
    "iter_gguf_tensors", "iter_hf_tensors", "load_tokenizer", "normalize_config", "open_gguf",
    "quant4bit_to_bnb_tensors", "resolve_builtin", "save_bnb_checkpoint",
    "ShardedWriter", "iter_bnb_tensors", "save_gguf", "save_merged", "tokenizer_metadata", "write_gguf",
]

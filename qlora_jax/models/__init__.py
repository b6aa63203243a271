"""LLaMA / Qwen / Mistral / Gemma 2-3 decoders in Flax NNX with NF4-quantized frozen linears and LoRA adapters."""

from qlora_jax.models.config import ModelConfig, QuantConfig, RopeScaling
from qlora_jax.models.kv_cache import KVCache
from qlora_jax.models.layers import BaseParam, QLoRALinear, QuantParam, frozen_matmul, rope_inv_freq
from qlora_jax.models.loading import build_model, hf_name_table, iter_hf_tensors
from qlora_jax.models.model import CausalLM, LinearView

__all__ = [
    "BaseParam", "CausalLM", "KVCache", "LinearView", "ModelConfig", "QLoRALinear", "QuantConfig", "QuantParam",
    "RopeScaling", "build_model", "frozen_matmul", "hf_name_table", "iter_hf_tensors", "rope_inv_freq",
]

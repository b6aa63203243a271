"""qlora_jax: QLoRA fine-tuning of LLaMA and Qwen models in JAX/Flax."""

__version__ = "0.1.0"

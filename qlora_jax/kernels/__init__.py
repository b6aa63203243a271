"""Pallas kernels beside their XLA reference paths, selected in one place
(``qlora_jax.models.layers.quant_matmul``). Modules: ``nf4_matmul`` (fused 4-bit matmul, TPU)."""

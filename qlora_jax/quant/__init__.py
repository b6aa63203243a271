"""Pure-functional 4-bit quantization: NF4 / FP4 codes, double quantization, packing."""

from qlora_jax.quant.codes import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, code_table
from qlora_jax.quant.nf4 import (
    Quant4bit,
    bits_per_param,
    code_values,
    dequantize_4bit,
    dequantize_4bit_halves,
    dequantize_absmax,
    quantize_4bit,
    storage_bits_per_param,
)

__all__ = [
    "BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "Quant4bit", "bits_per_param", "code_table",
    "code_values", "dequantize_4bit", "dequantize_4bit_halves", "dequantize_absmax", "quantize_4bit", "storage_bits_per_param",
]

"""python -m qlora_jax.inspect --config configs/sft.py [--config.model.source=PATH] [--config.lora.r=32]

Prints, from the model's config alone (nothing is loaded): total parameters, trainable LoRA
parameters and their share (bitsandbytes' counting, where a packed 4-bit weight counts numel/2),
the 4-bit storage of the frozen base, and an estimate of training memory at the config's batch
size and sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_jax.checkpoints.load import model_config_for
from qlora_jax.lora import LoraConfig
from qlora_jax.models import ModelConfig
from qlora_jax.models.params import count_params, quantized_matrices
from qlora_jax.quant import NESTED_BLOCKSIZE
from qlora_jax.train.config import PREFERENCE_OBJECTIVES, lora_config_from

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    base_4bit: int  # packed codes + absmax (+ nested absmax, offset) of every decoder linear
    base_other: int  # embeddings, lm_head, norms, biases in param_dtype
    adapters: int  # LoRA params (f32 master copy)
    grads: int  # one f32 gradient per adapter parameter
    optimizer: int  # AdamW: two f32 moments per adapter parameter
    activations: int  # saved for the backward pass (estimate)

    @property
    def total(self) -> int:
        return self.base_4bit + self.base_other + self.adapters + self.grads + self.optimizer + self.activations


def quantized_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact storage of one 4-bit tensor as qlora_jax (and bitsandbytes) stores it."""
    blocks = -(-numel // blocksize)
    packed = (numel + 1) // 2
    if double_quant:
        return packed + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4
    return packed + 4 * blocks


def estimate_memory(config: ModelConfig, lora: LoraConfig | None, *, batch: int, seq: int,
                    compute_dtype: str = "bfloat16", param_dtype: str = "bfloat16", blocksize: int = 64,
                    double_quant: bool = True, remat: str = "none") -> MemoryEstimate:
    counts = count_params(config, lora)
    matrices = quantized_matrices(config).values()  # (copies, out, in): MoE experts quantized one by one
    n_layers = config.num_hidden_layers
    base_4bit = n_layers * sum(e * quantized_bytes(o * i, blocksize, double_quant) for e, o, i in matrices)
    linear_numel = n_layers * sum(e * o * i for e, o, i in matrices)
    other = counts.total - linear_numel - counts.trainable
    c = _BYTES[compute_dtype]
    tokens = batch * seq
    h, inter = config.hidden_size, config.intermediate_size
    if config.num_experts:  # MoE: each token's k experts' hidden units (gate, up, act*up per assignment)
        inter = config.num_experts_per_tok * config.moe_intermediate_size
    q, kv = config.q_size, config.kv_size
    # Per layer, saved for the backward pass without remat: the two norm inputs and outputs,
    # q, k, v, the attention output, the MLP's gate, up, act*up; attention probabilities in f32.
    per_layer = tokens * (4 * h + q + 2 * kv + q + 3 * inter) * c + batch * config.num_attention_heads * seq * seq * 4
    if remat == "none":
        acts = n_layers * per_layer
    elif remat == "projections":  # layer input, q, k, v, attention output and residual, gate, up kept
        acts = n_layers * tokens * (2 * h + q + 2 * kv + q + 2 * inter) * c + per_layer
    else:  # the layer inputs only, plus one layer recomputed at a time
        acts = n_layers * tokens * h * c + per_layer
    acts += tokens * h * 4 * 2  # final norm + hidden states for the chunked loss
    return MemoryEstimate(base_4bit=base_4bit, base_other=other * _BYTES[param_dtype],
                          adapters=4 * counts.trainable, grads=4 * counts.trainable,
                          optimizer=8 * counts.trainable, activations=acts)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def report(cfg) -> str:
    hf = model_config_for(cfg.model.source)
    config = ModelConfig.from_hf(hf)
    lora = lora_config_from(cfg) if cfg.lora.r > 0 else None
    counts = count_params(config, lora)
    quant = cfg.model.quantize != "none"
    pairs = cfg.get("objective", "sft") in PREFERENCE_OBJECTIVES
    rows = cfg.train.batch_size * (2 if pairs else 1)  # DPO, ORPO, CPO: chosen + rejected
    mem = estimate_memory(config, lora, batch=rows, seq=cfg.data.max_length,
                          compute_dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                          blocksize=cfg.model.blocksize, double_quant=cfg.model.double_quant,
                          remat=cfg.model.remat)
    linear_numel = config.num_hidden_layers * sum(e * o * i for e, o, i in quantized_matrices(config).values())
    lines = [
        f"model              {cfg.model.source} ({config.model_type}, {config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}, heads {config.num_attention_heads}/{config.num_key_value_heads})",
        f"total params       {counts.total:,}",
        f"4-bit-packed count {counts.total_4bit:,}  (bitsandbytes/PEFT counting: a 4-bit weight = numel/2)",
        f"trainable (LoRA)   {counts.trainable:,}  = {counts.trainable_percent:.2f}% of the 4-bit count, "
        f"{counts.trainable_percent_full:.3f}% of all params"
        + (f"  [r={lora.r}, alpha={lora.alpha}, targets={lora.targets}]" if lora else ""),
    ]
    if quant:
        bits = 8 * mem.base_4bit / linear_numel
        lines.append(f"4-bit base storage {mem.base_4bit:,} bytes ({_gib(mem.base_4bit)}, {bits:.3f} bits/param, "
                     f"{cfg.model.quantize}, blocksize {cfg.model.blocksize}, double quant {cfg.model.double_quant})")
    lines += [
        f"training memory    ~{_gib(mem.total)} at batch {rows} x seq {cfg.data.max_length} "
        f"({cfg.model.dtype} compute, remat {cfg.model.remat}; an estimate: see bench/memory.py for XLA's figure)",
        f"  base 4-bit {_gib(mem.base_4bit)} | other base {_gib(mem.base_other)} | adapters+grads+AdamW "
        f"{_gib(mem.adapters + mem.grads + mem.optimizer)} | activations {_gib(mem.activations)}",
    ]
    return "\n".join(lines)


__all__ = ["MemoryEstimate", "estimate_memory", "quantized_bytes", "report"]

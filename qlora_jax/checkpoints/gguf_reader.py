"""Read llama.cpp GGUF checkpoints as Hugging Face-style configs, tensors and tokenizers.

A GGUF file holds metadata (``{arch}.block_count``, ``tokenizer.chat_template``, ...) and tensors
named ``blk.{i}.attn_q.weight`` etc., each stored in one of ggml's block formats (F32, F16, Q8_0,
Q4_1, K-quants ...). We translate both into what a transformers checkpoint of the same model
would hold, so one loader serves GGUF and safetensors:

* ``gguf_config`` -> a config.json dict (``model_type``, ``hidden_size``, ``rope_theta``, ...);
* ``iter_gguf_tensors`` -> ``(hf_name, float32 array [out, in])`` one tensor at a time, dequantized
  with ``gguf.quants.dequantize``. For the llama architecture llama.cpp's converter reorders the
  rows of q_proj / k_proj (its rope rotates adjacent pairs, transformers' rotates the two halves
  of each head); we undo that reordering exactly. Gemma files store every RMSNorm weight as
  ``1 + w`` (llama.cpp's converter adds the 1 that transformers' Gemma norm adds at run time); we
  subtract it. Qwen3-MoE's experts come as ``ffn_gate_exps`` / ``ffn_up_exps`` ``[E, inter, hidden]``
  and are fused into transformers' ``mlp.experts.gate_up_proj`` (gate rows first);
* ``gguf_tokenizer`` -> a transformers tokenizer carrying the file's chat template.

Every function takes a path or an open ``gguf.GGUFReader``. ``open_gguf`` parses the metadata with
a compact variant of the reader (``_LeanReader``: a 49k-token vocabulary in ~0.3 s and a few MB,
where the stock reader takes seconds and ~150 MB) and keeps the last two files' readers. The reader
memory-maps the file; only the tensor being dequantized is materialised.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qlora_jax.errors import ModelFileError

GGUFSource = str | os.PathLike | gguf.GGUFReader


# Block tensor names that differ from the llama table below, per GGUF architecture (gguf-py's
# tensor map). Gemma's four norms: attn_norm (input), post_attention_norm, ffn_norm (before the
# MLP), post_ffw_norm. Phi-3's fused linears keep one tensor each: attn_qkv (q | k | v rows) and
# ffn_up (gate | up rows), as llama.cpp's converter writes them.
_GEMMA_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
_PHI3_NAMES = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_MOE_NAMES = {"ffn_gate_inp": "mlp.gate", "ffn_down_exps": "mlp.experts.down_proj"}
# Qwen3-MoE: the two halves of transformers' fused mlp.experts.gate_up_proj [E, 2 inter, hidden].
EXPERT_HALVES = {"ffn_gate_exps": 0, "ffn_up_exps": 1}
EXPERTS_GATE_UP = "mlp.experts.gate_up_proj"


@dataclasses.dataclass(frozen=True)
class _Arch:
    model_type: str           # transformers model_type
    hf_class: str             # transformers architectures[0]
    rotary_permuted: bool     # q/k rows reordered by llama.cpp's converter
    attention_bias: bool      # q/k/v carry biases in every checkpoint of this family
    hidden_act: str = "silu"
    norm_offset: float = 0.0  # norm weights are stored as w + this (gemma: 1 + w)
    names: tuple[tuple[str, str], ...] = ()  # block tensor names that differ from _BLOCK_NAMES


# GGUF general.architecture -> what transformers calls it. Only llama rotates adjacent pairs in
# llama.cpp; the others use rope on halves there too ("NEOX" mode), so their q/k rows are stored
# unpermuted. Mistral has no architecture of its own: llama.cpp writes it as llama (gguf_config
# tells it apart by a sliding window or by the name transformers' loader keys on).
ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("llama", "LlamaForCausalLM", rotary_permuted=True, attention_bias=False),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", rotary_permuted=False, attention_bias=True),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", rotary_permuted=False, attention_bias=False),
    "phi3": _Arch("phi3", "Phi3ForCausalLM", rotary_permuted=False, attention_bias=False,
                  names=tuple(_PHI3_NAMES.items())),
    "gemma2": _Arch("gemma2", "Gemma2ForCausalLM", rotary_permuted=False, attention_bias=False,
                    hidden_act="gelu_pytorch_tanh", norm_offset=1.0, names=tuple(_GEMMA_NAMES.items())),
    "gemma3": _Arch("gemma3_text", "Gemma3ForCausalLM", rotary_permuted=False, attention_bias=False,
                    hidden_act="gelu_pytorch_tanh", norm_offset=1.0, names=tuple(_GEMMA_NAMES.items())),
    "qwen3moe": _Arch("qwen3_moe", "Qwen3MoeForCausalLM", rotary_permuted=False, attention_bias=False,
                      names=tuple(_MOE_NAMES.items())),
}
# llama.cpp's fixed sliding-window patterns (every n-th layer global) and the layer counts of the
# 27B models, whose attention scale is (hidden / heads) ** -0.5 instead of head_dim ** -0.5.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6}
_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

# GGUF tensor name -> transformers name.
_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",    # qwen3
    "attn_k_norm": "self_attn.k_norm",    # qwen3
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# Tensors that are not weights of the transformers model. rope_freqs holds llama3 rope scaling
# factors; gguf_config turns it back into config["rope_scaling"].
_NOT_WEIGHTS = {"rope_freqs.weight"}

# Rope scaling metadata key suffix -> rope_scaling field.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}

# Llama 3.1 / 3.2 / 3.3 all use these llama3 rope parameters besides the factor.
_LLAMA3_ROPE_CANDIDATES = ({"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},)


class _LeanReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` with a compact parse of array metadata.

    The stock reader keeps one memory-map view per array element (two per string): for a
    49k-token vocabulary and its merges that is ~300k numpy objects, ~150 MB of host memory and
    seconds of parsing, held for as long as the reader lives. Here a numeric array becomes one
    array, and each string of a string array one small owned array, so ``field.contents()`` and
    everything else read exactly as before. Big-endian files take the stock path.
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if (gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY or self.byte_order != "I"
                or sys.byteorder != "little"):
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = gguf.GGUFValueType(raw_itype[0])
        count, offs = int(alen[0]), orig_offs + 12
        parts: list[Any] = [raw_itype, alen]
        if itype == gguf.GGUFValueType.STRING:
            buffer = memoryview(self.data)
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", buffer, offs)
                parts.append(np.frombuffer(bytes(buffer[offs + 8:offs + 8 + length]), np.uint8))
                offs += 8 + length
            return offs - orig_offs, parts, list(range(2, 2 + count)), [itype.ARRAY, itype]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:  # arrays of arrays: rare, small
            return super()._get_field_parts(orig_offs, raw_type)
        values = np.array(self._get(offs, nptype, count))  # one owned copy
        return 12 + int(values.nbytes), parts + [values], [2], [gguf.GGUFValueType.ARRAY, itype]


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    del mtime_ns, size   # part of the cache key only: a rewritten file is parsed again
    return _LeanReader(path)


def open_gguf(source: GGUFSource) -> gguf.GGUFReader:
    """A memory-mapped, read-only reader (``source`` itself when it already is one).

    The last two files opened stay parsed, so config, tensors and tokenizer of one file can be
    asked for by path without paying for the metadata parse each time.
    """
    if isinstance(source, gguf.GGUFReader):
        return source
    path = Path(source).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    stat = path.stat()
    try:
        return _cached_reader(str(path), stat.st_mtime_ns, stat.st_size)
    except (ValueError, struct.error, IndexError, KeyError, OSError) as e:  # the reader's parse errors
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFileError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)") from e
        raise ModelFileError(f"{path}: truncated or corrupt GGUF file ({stat.st_size:,} bytes; "
                             f"{type(e).__name__}: {e})") from e


_MISSING = object()


def gguf_metadata(source: GGUFSource, key: str, default: Any = _MISSING) -> Any:
    """One metadata value as a Python object (str, int, float, bool or list)."""
    reader = open_gguf(source)
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata has no key {key!r}")
        return default
    return field.contents()


@functools.cache
def block_names(arch: str = "llama") -> dict[str, str]:
    """GGUF block tensor part (``attn_q``) -> transformers module (``self_attn.q_proj``) for ``arch``
    (cached: do not modify the returned dict)."""
    return {**_BLOCK_NAMES, **dict(ARCHITECTURES[arch].names)} if arch in ARCHITECTURES else dict(_BLOCK_NAMES)


def gguf_to_hf_name(name: str, arch: str = "llama") -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``. KeyError if unknown.

    Expert tensors have no ``.weight`` in transformers (``model.layers.3.mlp.experts.down_proj``);
    both ``ffn_gate_exps`` and ``ffn_up_exps`` name halves of ``mlp.experts.gate_up_proj``.
    """
    if name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[name]
    match = _BLOCK_RE.fullmatch(name)
    names = block_names(arch)
    if match and (match.group(2) in names or (arch == "qwen3moe" and match.group(2) in EXPERT_HALVES)):
        layer, part, kind = match.groups()
        module = EXPERTS_GATE_UP if part in EXPERT_HALVES else names[part]
        if module.startswith("mlp.experts."):
            return f"model.layers.{layer}.{module}"
        return f"model.layers.{layer}.{module}.{kind}"
    raise KeyError(f"GGUF tensor {name!r} has no transformers counterpart we know of (architecture {arch!r})")


def _architecture(reader: gguf.GGUFReader) -> tuple[str, _Arch]:
    arch = gguf_metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise NotImplementedError(
            f"GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    return arch, ARCHITECTURES[arch]


def _is_mistral(reader: gguf.GGUFReader) -> bool:
    """A llama-architecture file holds Mistral when it states a sliding window (our writer does when
    the model has one) or is named exactly "mistral" (the rule of transformers' GGUF loader)."""
    return (gguf_metadata(reader, "llama.attention.sliding_window", None) is not None
            or gguf_metadata(reader, "general.name", None) == "mistral")


def _short_float(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))  # numpy prints the shortest round-tripping decimal


def _uniform(value: Any, key: str) -> int:
    """Some files store per-layer lists (e.g. head_count_kv); we support uniform ones."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise NotImplementedError(f"{key} varies across layers ({value}); not supported")
        value = value[0]
    return int(value)


def _tensor_shapes(reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape in numpy / transformers order (GGUF lists dimensions innermost first)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def _llama3_rope_factors(head_dim: int, rope_theta: float, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling (what llama.cpp stores as rope_freqs)."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = ((original_max_position_embeddings / wavelen - low_freq_factor)
              / (high_freq_factor - low_freq_factor))
    between = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_freq_wavelen, 1.0, np.where(wavelen > low_freq_wavelen, factor, between))


def _rope_scaling_from_freqs(rope_freqs: np.ndarray, head_dim: int, rope_theta: float) -> dict:
    """Recover HF llama3 rope_scaling from llama.cpp's rope_freqs tensor.

    The tensor is a function of (factor, low/high_freq_factor, original context), not invertible
    in general; we take factor = max and accept the known parameter sets that reproduce it.
    """
    rope_freqs = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    factor = float(np.float32(rope_freqs.max()))
    for candidate in _LLAMA3_ROPE_CANDIDATES:
        expected = _llama3_rope_factors(head_dim, rope_theta, factor, **candidate)
        if expected.shape == rope_freqs.shape and np.allclose(expected, rope_freqs, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, **candidate}
    raise NotImplementedError(
        "GGUF file has a rope_freqs tensor (llama3 rope scaling) that matches no known parameter "
        f"set {list(_LLAMA3_ROPE_CANDIDATES)} with factor {factor}")


def gguf_config(source: GGUFSource) -> dict[str, Any]:
    """A transformers config.json dict for the model in a GGUF file.

    Fields: model_type, architectures, vocab_size, hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_act,
    rms_norm_eps, rope_theta, rope_scaling (None or a dict), max_position_embeddings,
    tie_word_embeddings (true when the file has no output.weight), attention_bias, and
    bos/eos/pad token ids when the file names them. Float metadata is stored as float32 in GGUF;
    we return the shortest decimal that round-trips (rms_norm_eps 1e-05).
    """
    reader = open_gguf(source)
    arch, info = _architecture(reader)

    def meta(key: str, default: Any = _MISSING) -> Any:
        return gguf_metadata(reader, f"{arch}.{key}", default)

    shapes = _tensor_shapes(reader)
    hidden_size = int(meta("embedding_length"))
    num_heads = _uniform(meta("attention.head_count"), "attention.head_count")
    num_kv_heads = _uniform(meta("attention.head_count_kv", num_heads), "attention.head_count_kv")
    head_dim = int(meta("attention.key_length", hidden_size // num_heads))
    rope_theta = _short_float(meta("rope.freq_base", 10000.0))

    if "token_embd.weight" not in shapes:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    vocab_size = shapes["token_embd.weight"][0]

    rope_scaling = None
    scaling_type = meta("rope.scaling.type", None)
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type}
        for suffix, name in _ROPE_SCALING_KEYS.items():
            value = meta(f"rope.scaling.{suffix}", None)
            if value is not None:
                rope_scaling[name] = int(value) if isinstance(value, int) else _short_float(value)
    elif "rope_freqs.weight" in shapes:
        tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_scaling = _rope_scaling_from_freqs(
            gguf.quants.dequantize(tensor.data, tensor.tensor_type), head_dim, rope_theta)

    feed_forward = meta("feed_forward_length", None)
    if feed_forward is None and arch == "qwen3moe":  # an all-expert file may leave the dense width out
        feed_forward = meta("expert_feed_forward_length")
    config: dict[str, Any] = {
        "model_type": info.model_type,
        "architectures": [info.hf_class],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": int(meta("feed_forward_length") if feed_forward is None else feed_forward),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": info.hidden_act,
        "rms_norm_eps": _short_float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta("context_length")),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": info.attention_bias or "blk.0.attn_q.bias" in shapes,
    }
    config.update(_family_config(reader, arch, config, shapes))
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = gguf_metadata(reader, f"tokenizer.ggml.{key}", None)
        if value is not None:
            config[name] = int(value)
    return config


def _family_config(reader: gguf.GGUFReader, arch: str, config: dict[str, Any],
                   shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The config keys of the families beyond llama / qwen, from llama.cpp's metadata keys; where
    a key is absent, the value llama.cpp itself assumes for that architecture."""

    def meta(key: str, default: Any = None) -> Any:
        return gguf_metadata(reader, f"{arch}.{key}", default)

    window = meta("attention.sliding_window")
    out: dict[str, Any] = {}
    if arch == "llama" and _is_mistral(reader):
        out = {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
               "sliding_window": None if window is None else int(window)}
    elif arch == "phi3":
        if any(name.startswith("rope_factors_") for name in shapes):
            raise NotImplementedError("phi3 GGUF with longrope scaling (rope_factors_long / rope_factors_short "
                                      "tensors, the 128k models) is not supported")
        rotary = meta("rope.dimension_count")
        out = {"sliding_window": None if window is None else int(window),
               "partial_rotary_factor": 1.0 if rotary is None else int(rotary) / config["head_dim"]}
    elif arch in SWA_PATTERNS:  # gemma2, gemma3
        layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
        pattern = meta("attention.sliding_window_pattern", SWA_PATTERNS[arch])
        if isinstance(pattern, list):  # per layer, true = sliding
            if len(pattern) != layers:
                raise ModelFileError(f"{arch}.attention.sliding_window_pattern has {len(pattern)} entries for "
                                     f"{layers} layers")
            sliding = [bool(p) for p in pattern]
        else:  # llama.cpp's set_swa_pattern(n): every n-th layer global
            sliding = [bool((i + 1) % int(pattern)) for i in range(layers)]
        scale = meta("attention.scale")
        if scale is not None:  # the factor on q.k; query_pre_attn_scalar = scale ** -2
            scalar = float(np.float32(scale)) ** -2.0
            scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-4 * scalar else scalar
        elif layers == _27B_LAYERS[arch]:
            scalar = config["hidden_size"] // heads
        else:
            scalar = config["head_dim"]
        out = {"hidden_activation": config["hidden_act"], "query_pre_attn_scalar": scalar,
               "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
               "final_logit_softcapping": _optional_float(meta("final_logit_softcapping"))}
        if window is not None:
            out["sliding_window"] = int(window)
        if arch == "gemma2":
            out["attn_logit_softcapping"] = _optional_float(meta("attn_logit_softcapping"))
            out = {k: v for k, v in out.items() if v is not None}  # absent: llama.cpp's (= transformers') 50 / 30
        else:
            out["rope_local_base_freq"] = _short_float(meta("rope.freq_base_swa", 10000.0))
    elif arch == "qwen3moe":
        out = {"num_experts": int(meta("expert_count")), "num_experts_per_tok": int(meta("expert_used_count")),
               "moe_intermediate_size": int(meta("expert_feed_forward_length")),
               # llama.cpp always renormalizes the top-k probabilities of qwen3moe
               "norm_topk_prob": bool(meta("expert_weights_norm", True))}
    return out


def _optional_float(value: Any) -> float | None:
    return None if value is None else _short_float(value)


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q_proj / k_proj rows (and biases) for the llama architecture.

    Within each head of ``head_dim`` rows, transformers pairs row ``j`` with row ``j + head_dim/2``
    for rotation; llama.cpp pairs neighbours, so its converter stores HF row ``s * head_dim/2 + j``
    at row ``2 * j + s``. Reading rows back in the order (head, s, j) restores the HF order.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    stored = weight.reshape((n_heads, half, 2) + weight.shape[1:])   # [head, j, s, ...]
    return np.ascontiguousarray(stored.swapaxes(1, 2)).reshape(weight.shape)


def gguf_tensor_shapes(source: GGUFSource) -> dict[str, tuple[int, ...]]:
    """transformers name -> shape, without reading any tensor data (for abstract model setup)."""
    reader = open_gguf(source)
    arch = gguf_metadata(reader, "general.architecture")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in _tensor_shapes(reader).items():
        if name in _NOT_WEIGHTS:
            continue
        hf_name = gguf_to_hf_name(name, arch)
        if hf_name in shapes:  # the second half of fused experts: rows add up
            shape = shape[:-2] + (shapes[hf_name][-2] + shape[-2], shape[-1])
        shapes[hf_name] = shape
    return shapes


def iter_gguf_tensors(source: GGUFSource) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(transformers name, float32 array)`` for every weight, in file order.

    Matrices come out in transformers layout ``[out, in]``. Each tensor is dequantized when it
    is yielded, so memory holds one float32 tensor at a time (Qwen3-MoE: the gate half of a
    layer's experts waits for its up half). A tied model yields no lm_head.
    """
    reader = open_gguf(source)
    arch, info = _architecture(reader)
    heads = {"attn_q": _uniform(gguf_metadata(reader, f"{arch}.attention.head_count"), "head_count")}
    heads["attn_k"] = _uniform(gguf_metadata(reader, f"{arch}.attention.head_count_kv", heads["attn_q"]),
                               "head_count_kv")
    halves: dict[str, dict[int, np.ndarray]] = {}
    for tensor in reader.tensors:
        if tensor.name in _NOT_WEIGHTS:
            continue
        hf_name = gguf_to_hf_name(tensor.name, arch)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = np.array(values, dtype=np.float32).reshape(shape)   # owned copy, off the mmap
        match = _BLOCK_RE.fullmatch(tensor.name)
        part = match.group(2) if match else None
        if info.rotary_permuted and part in heads:
            values = unpermute_rotary(values, heads[part])
        if info.norm_offset and tensor.name.endswith("norm.weight"):
            values -= np.float32(info.norm_offset)
        if part in EXPERT_HALVES:
            pair = halves.setdefault(hf_name, {})
            pair[EXPERT_HALVES[part]] = values
            if len(pair) < 2:
                continue
            values = np.concatenate([pair[0], pair[1]], axis=-2)
            del halves[hf_name]
        yield hf_name, values
    if halves:
        raise ModelFileError(f"GGUF file has only one of ffn_gate_exps / ffn_up_exps for {sorted(halves)}")


# tokenizer.* metadata key -> (where it goes, its name there), as transformers' GGUF tokenizer
# builder expects them: the vocabulary description vs. tokenizer_config entries.
_TOKENIZER_KEYS = {
    "ggml.model": ("vocab", "tokenizer_type"),
    "ggml.pre": ("vocab", "pre_tokenizer_type"),
    "ggml.tokens": ("vocab", "tokens"),
    "ggml.scores": ("vocab", "scores"),
    "ggml.token_type": ("vocab", "token_type"),
    "ggml.merges": ("vocab", "merges"),
    "ggml.precompiled_charsmap": ("vocab", "precompiled_charsmap"),
    "ggml.bos_token_id": ("vocab", "bos_token_id"),
    "ggml.eos_token_id": ("vocab", "eos_token_id"),
    "ggml.unknown_token_id": ("vocab", "unk_token_id"),
    "ggml.padding_token_id": ("vocab", "pad_token_id"),
    "ggml.add_space_prefix": ("vocab", "add_prefix_space"),
    "chat_template": ("config", "chat_template"),
    "ggml.add_bos_token": ("config", "add_bos_token"),
    "ggml.add_eos_token": ("config", "add_eos_token"),
}
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _tokenizer_from_metadata(reader: gguf.GGUFReader):
    """Build the tokenizer from metadata we read ourselves, with transformers' GGUF vocabulary
    builders. Same result as ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, but without
    torch (transformers' own GGUF metadata reader imports it) and without re-parsing the file."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    vocab: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for key, (group, name) in _TOKENIZER_KEYS.items():
        value = gguf_metadata(reader, f"tokenizer.{key}", None)
        if value is not None:
            (vocab if group == "vocab" else config)[name] = value
    if vocab.get("tokenizer_type") == "llama":
        # sentencepiece vocabularies without the flag: llama.cpp prepends BOS.
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = gguf_metadata(reader, f"tokenizer.ggml.{key}", None)
        config[name] = vocab["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(gguf_metadata(reader, "general.architecture"), vocab)
    return TokenizersBackend(tokenizer_object=backend, **config, **extra)


def gguf_tokenizer(path: str | os.PathLike, reader: gguf.GGUFReader | None = None):
    """The file's tokenizer as a transformers tokenizer, with the file's chat template.

    Built from the GGUF vocabulary the way ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``
    builds it, but without torch (see ``_tokenizer_from_metadata``); on a transformers without
    those builders we fall back to AutoTokenizer itself. If the chat template did not come along,
    we set it from the ``tokenizer.chat_template`` metadata; a file without one gets none.
    """
    path = Path(path)
    reader = reader or open_gguf(path)
    try:
        tokenizer = _tokenizer_from_metadata(reader)
    except ImportError:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if not getattr(tokenizer, "chat_template", None):
        template = gguf_metadata(reader, "tokenizer.chat_template", None)
        if template:
            tokenizer.chat_template = template
    return tokenizer

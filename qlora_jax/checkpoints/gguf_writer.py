"""Write llama.cpp GGUF files from a model's (merged) weights, with metadata and tokenizer.

The inverse of ``gguf_reader``: transformers names become GGUF names (``blk.3.attn_q.weight``),
``[out, in]`` matrices are stored as ggml's ``[in, out]`` (the writer reverses the dimensions),
and, for the llama architecture, the rows of q_proj / k_proj are reordered the way llama.cpp's
converter does (llama.cpp rotates adjacent pairs, transformers the two halves of each head).
Architecture metadata follows llama.cpp's key names; llama3 rope scaling is stored, as llama.cpp
does, as a ``rope_freqs.weight`` tensor of per-frequency divisors.

Families (``ARCHITECTURES``): llama, qwen2, qwen3; mistral as llama.cpp's ``llama`` (plus
``llama.attention.sliding_window`` when it has a window); phi3 with its fused ``attn_qkv`` and
``ffn_up`` (gate | up) and ``rope.dimension_count`` = the rotated dims; gemma2 / gemma3 with every
norm stored as ``1 + w``, the soft caps, the window, ``attention.scale`` (= query_pre_attn_scalar
** -0.5), the per-layer ``attention.sliding_window_pattern`` and Gemma 3's ``rope.freq_base_swa``;
qwen3moe with the experts' gate | up split into ``ffn_gate_exps`` / ``ffn_up_exps`` and the router
kept F32. What llama.cpp cannot express fails in one line naming the model_type (a Gemma 2 without
soft caps or with an untied head, a Qwen3-MoE without ``norm_topk_prob``, llama3 rope scaling
outside llama). Where llama.cpp decides from its own rules instead of the metadata (Gemma's
attention scale by layer count, Gemma 3's fixed 5:1 layer pattern and local rope base in older
builds) and the model differs, a warning says so.

Tensor types (``tensor_type``):

* 1-D tensors (norms, biases) and ``rope_freqs`` are always F32.
* ``"F16"``, ``"Q8_0"`` (8-bit, 32-value blocks, one f16 scale), ``"Q4_0"`` (4-bit, same blocks):
  every matrix in that type, quantized with ``gguf.quants.quantize``. A matrix whose rows are not
  a multiple of the 32-value block falls back to F16.
* In a Q4_0 file the output head (``output.weight``, or ``token_embd.weight`` when the embedding
  is tied and doubles as the head) is stored Q8_0: llama.cpp's own Q4_0 recipe keeps it at Q6_K,
  which the gguf package cannot produce, and a 4-bit head costs the most quality.

Tokenizer metadata: copied verbatim from a GGUF source (any vocabulary type), or built from a
transformers tokenizer: a byte-level BPE one (LLaMA 3, Qwen, SmolLM) as llama.cpp's ``gpt2`` model
(tokens, merges, the pre-tokenizer name), or a SentencePiece-style BPE one (byte fallback,
``▁`` for spaces: Mistral 7B, Phi-3, Gemma) as its ``llama`` model (tokens, scores, the space
prefix flag); either with token types, special ids, add-BOS/EOS flags and the chat template.

Memory: tensor infos are written first from the shapes alone, then each tensor is converted and
written as it arrives, so only one float tensor is in memory at a time.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from qlora_jax.checkpoints import gguf_reader
from qlora_jax.models import QuantParam, hf_name_table, iter_hf_tensors

log = logging.getLogger(__name__)

GGML = gguf.GGMLQuantizationType
TENSOR_TYPES = {"F32": GGML.F32, "F16": GGML.F16, "Q8_0": GGML.Q8_0, "Q4_0": GGML.Q4_0}
_FILE_TYPES = {GGML.F32: gguf.LlamaFileType.ALL_F32, GGML.F16: gguf.LlamaFileType.MOSTLY_F16,
               GGML.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, GGML.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}

# transformers model_type -> GGUF architecture (the reader's table, inverted; Mistral is llama there).
ARCHITECTURES = {**{info.model_type: arch for arch, info in gguf_reader.ARCHITECTURES.items()}, "mistral": "llama"}
_TOP_LEVEL = {hf: g for g, hf in gguf_reader._TOP_LEVEL_NAMES.items()}
ROPE_FREQS = "rope_freqs.weight"
_ROUTER = "ffn_gate_inp"  # MoE router: kept F32, as llama.cpp's converter does


@functools.cache
def _hf_block_names(arch: str) -> dict[str, str]:
    """transformers module (``self_attn.q_proj``) -> GGUF block tensor part (``attn_q``)."""
    return {hf: g for g, hf in gguf_reader.block_names(arch).items()}


def hf_to_gguf_names(name: str, arch: str = "llama") -> list[str]:
    """The GGUF tensor(s) a transformers tensor is stored as: one, or Qwen3-MoE's fused
    ``mlp.experts.gate_up_proj`` as ``[ffn_gate_exps, ffn_up_exps]``. KeyError if unknown."""
    if name in _TOP_LEVEL:
        return [_TOP_LEVEL[name]]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        layer, rest = parts[2], ".".join(parts[3:])
        if arch == "qwen3moe" and rest == gguf_reader.EXPERTS_GATE_UP:
            return [f"blk.{layer}.{half}.weight" for half in gguf_reader.EXPERT_HALVES]
        block = _hf_block_names(arch)
        if rest in block and rest.startswith("mlp.experts."):
            return [f"blk.{layer}.{block[rest]}.weight"]
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if module in block and kind in ("weight", "bias"):
            return [f"blk.{layer}.{block[module]}.{kind}"]
    raise KeyError(f"transformers tensor {name!r} has no GGUF counterpart we know of (architecture {arch!r})")


def hf_to_gguf_name(name: str, arch: str = "llama") -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``. KeyError if unknown
    (or if the tensor is stored as two, see :func:`hf_to_gguf_names`)."""
    names = hf_to_gguf_names(name, arch)
    if len(names) != 1:
        raise KeyError(f"transformers tensor {name!r} is stored as {len(names)} GGUF tensors: {names}")
    return names[0]


def permute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's reordering of llama q_proj / k_proj rows (and biases).

    Within each head of ``head_dim`` rows, HF row ``s * head_dim/2 + j`` (``s`` in {0, 1}) goes
    to row ``2 * j + s``, so the pairs rotated together become neighbours.
    ``gguf_reader.unpermute_rotary`` is its inverse.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    halves = weight.reshape((n_heads, 2, half) + weight.shape[1:])  # [head, s, j, ...]
    return np.ascontiguousarray(halves.swapaxes(1, 2)).reshape(weight.shape)


def tensor_type_for(gguf_name: str, shape: tuple[int, ...], requested: str, *, tied: bool) -> GGML:
    """The ggml type a tensor is stored in, given the file's requested type (module docstring)."""
    if requested not in TENSOR_TYPES:
        raise ValueError(f"GGUF tensor type must be one of {sorted(TENSOR_TYPES)}, got {requested!r}")
    if len(shape) < 2 or gguf_name == ROPE_FREQS or gguf_name.split(".")[-2] == _ROUTER:
        return GGML.F32
    qtype = TENSOR_TYPES[requested]
    head = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if qtype == GGML.Q4_0 and head:
        qtype = GGML.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        qtype = GGML.F16
    return qtype


def encode_tensor(values: np.ndarray, qtype: GGML) -> np.ndarray:
    """float32 values -> the array GGUFWriter stores (f32, f16, or uint8 blocks)."""
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: GGML) -> int:
    if qtype in (GGML.F32, GGML.F16):
        return math.prod(shape) * (4 if qtype == GGML.F32 else 2)
    return math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


def llama3_rope_freqs(config) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for llama3 rope scaling: per-frequency divisors, float32."""
    s = config.rope_scaling
    return gguf_reader._llama3_rope_factors(
        config.head_dim, config.rope_theta, s.factor, s.low_freq_factor, s.high_freq_factor,
        s.original_max_position_embeddings).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Tokenizer metadata
# ------------------------------------------------------------------------------------------

_V = gguf.GGUFValueType
_TOKEN_TYPE = gguf.TokenType
# Pre-tokenizer names llama.cpp uses, preferred when several names share one split regex.
_PREFERRED_PRE = ("llama-bpe", "qwen2", "qwen35", "gpt-4o", "tekken")


def _pre_tokenizer_name(spec: Mapping[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer ("default" if unknown).

    A Split regex is matched against the table transformers' GGUF loader uses to rebuild the
    pre-tokenizer from that name; digits split one by one before GPT-2's regex is llama.cpp's
    "smollm" (= "starcoder", "refact"); GPT-2's regex alone is "default".
    """
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and "pattern" in s]
    if regexes and regexes[0]:
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            GGUF_PRE_TOKENIZER_SPLITS = {}
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regexes[0]]
        for name in _PREFERRED_PRE:
            if name in names:
                return name
        if names:
            return names[0]
    if any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps):
        return "smollm"
    return "default"


def _sentencepiece_scores(model: Mapping[str, Any], tokens: list[str], types: list[int]) -> list[float]:
    """llama.cpp's ``llama`` (SentencePiece) tokenizer merges the adjacent pair whose concatenation
    has the highest score; a BPE vocabulary's merges give that order: the token the merge of rank
    ``r`` forms scores ``-r``. Tokens no merge forms score 0 when special, bytes or unused (as in
    SentencePiece models), and below every merge otherwise."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    lowest = -float(len(rank) + 1)
    plain = (int(_TOKEN_TYPE.NORMAL), int(_TOKEN_TYPE.USER_DEFINED))
    return [-float(rank[t]) if t in rank else (lowest if kind in plain and len(t) > 1 else 0.0)
            for t, kind in zip(tokens, types, strict=True)]


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, tuple[Any, Any, Any]]:
    """GGUF ``tokenizer.*`` metadata ``{key: (value, value type, array item type)}`` of a
    transformers tokenizer with a BPE backend (``tokenizer.json``): byte-level (llama.cpp's
    ``gpt2`` model, with merges) or SentencePiece-style with byte fallback (its ``llama`` model,
    with scores from the merge order and ``<0xNN>`` tokens of type BYTE).

    The token list has ``vocab_size`` entries (the model's embedding rows): ids the tokenizer
    does not use are filled with ``[PAD{id}]`` tokens of type UNUSED, as llama.cpp does. Added
    tokens are CONTROL when special, USER_DEFINED otherwise.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(f"{type(tokenizer).__name__} has no tokenizers backend; GGUF export "
                                  "needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    sentencepiece = not byte_level and bool(model.get("byte_fallback"))
    if model.get("type") != "BPE" or not (byte_level or sentencepiece):
        raise NotImplementedError(
            f"GGUF export builds tokenizer metadata for byte-level BPE tokenizers (LLaMA 3, Qwen, SmolLM) and "
            f"SentencePiece-style BPE ones with byte fallback (Mistral 7B, Phi-3, Gemma); this one is "
            f"{model.get('type')} with pre-tokenizer {spec.get('pre_tokenizer')}. Export from a GGUF source "
            f"instead: its tokenizer metadata is copied as it is")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(_TOKEN_TYPE.NORMAL)] * vocab_size
    entries = [(tok, idx, None) for tok, idx in model["vocab"].items()]
    entries += [(t["content"], t["id"], bool(t.get("special"))) for t in spec.get("added_tokens", [])]
    for token, idx, special in entries:
        if idx >= vocab_size:
            raise ValueError(f"tokenizer token {token!r} has id {idx}, beyond the model's {vocab_size} "
                             f"embedding rows")
        tokens[idx] = token
        if special is not None:
            types[idx] = int(_TOKEN_TYPE.CONTROL if special else _TOKEN_TYPE.USER_DEFINED)
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[idx] = int(_TOKEN_TYPE.BYTE)
    for idx, token in enumerate(tokens):
        if token is None:
            tokens[idx] = f"[PAD{idx}]"
            types[idx] = int(_TOKEN_TYPE.UNUSED)
    unk = getattr(tokenizer, "unk_token_id", None)
    if sentencepiece and unk is not None and unk < vocab_size:
        types[unk] = int(_TOKEN_TYPE.UNKNOWN)

    meta: dict[str, tuple[Any, Any, Any]] = {
        "tokenizer.ggml.model": ("llama" if sentencepiece else "gpt2", _V.STRING, None),
        "tokenizer.ggml.pre": ("default" if sentencepiece else _pre_tokenizer_name(spec), _V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, _V.ARRAY, _V.STRING),
        "tokenizer.ggml.token_type": (types, _V.ARRAY, _V.INT32),
    }
    if sentencepiece:
        meta["tokenizer.ggml.scores"] = (_sentencepiece_scores(model, tokens, types), _V.ARRAY, _V.FLOAT32)
        # Whether llama.cpp puts a space before the text (Llama 2 / Mistral: yes; Gemma: no), observed.
        first = tokenizer.tokenize("a")
        meta["tokenizer.ggml.add_space_prefix"] = (bool(first) and first[0].startswith("\u2581"), _V.BOOL, None)
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if merges:
            meta["tokenizer.ggml.merges"] = (merges, _V.ARRAY, _V.STRING)
    for attr, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("unk_token_id", "unknown_token_id"), ("pad_token_id", "padding_token_id")):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}"] = (int(token_id), _V.UINT32, None)
    # Whether encoding adds BOS / EOS, observed rather than read from a flag that may not exist.
    ids = tokenizer("a")["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    meta["tokenizer.ggml.add_bos_token"] = (bool(bos is not None and ids[:1] == [bos]), _V.BOOL, None)
    meta["tokenizer.ggml.add_eos_token"] = (bool(eos is not None and ids[-1:] == [eos]), _V.BOOL, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = (template, _V.STRING, None)
    return meta


def copied_tokenizer_metadata(source: gguf_reader.GGUFSource) -> dict[str, tuple[Any, Any, Any]]:
    """Every ``tokenizer.*`` field of a GGUF file, with its stored types, to write unchanged."""
    reader = gguf_reader.open_gguf(source)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == _V.ARRAY else None
            meta[key] = (field.contents(), field.types[0], sub_type)
    return meta


# ------------------------------------------------------------------------------------------
# The file
# ------------------------------------------------------------------------------------------

def check_exportable(config) -> str:
    """The GGUF architecture of ``config``; NotImplementedError (one line naming the model_type) for
    what llama.cpp cannot run as the model computes."""
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(f"GGUF export of model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type not in ("linear", "llama3"):
        raise NotImplementedError(f"GGUF export of {model_type} with rope scaling {scaling.rope_type!r}")
    if scaling is not None and scaling.rope_type == "llama3" and arch != "llama":
        raise NotImplementedError(f"GGUF export of {model_type} with llama3 rope scaling: llama.cpp applies "
                                  f"rope_freqs only to llama")
    if model_type == "gemma2":
        if config.attn_logit_softcap is None or config.final_logit_softcap is None:
            raise NotImplementedError("GGUF export of gemma2 without attn_logit_softcapping / final_logit_softcapping: "
                                      "llama.cpp always soft-caps gemma2 (50 / 30 when the file says nothing)")
        if not config.tie_word_embeddings:
            raise NotImplementedError("GGUF export of gemma2 with tie_word_embeddings=false: llama.cpp's gemma2 has "
                                      "no output.weight (the head is the embedding)")
    if model_type == "qwen3_moe" and not config.norm_topk_prob:
        raise NotImplementedError("GGUF export of qwen3_moe with norm_topk_prob=false: llama.cpp always "
                                  "renormalizes the top-k router probabilities of qwen3moe")
    return arch


def _warn_llama_cpp_rules(config, arch: str) -> None:
    """Say where llama.cpp derives a Gemma setting from its own rules and gets another value."""
    if arch not in gguf_reader.SWA_PATTERNS:
        return
    layers, what = config.num_hidden_layers, []
    expected = (config.hidden_size // config.num_attention_heads if layers == gguf_reader._27B_LAYERS[arch]
                else config.head_dim)
    if config.query_pre_attn_scalar != expected:
        what.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar:g} (llama.cpp uses {expected})")
    pattern = gguf_reader.SWA_PATTERNS[arch]
    if config.sliding_layers != tuple(bool((i + 1) % pattern) for i in range(layers)):
        what.append(f"layer_types other than every {pattern}th layer global")
    if arch == "gemma3" and config.rope_local_theta != 10000.0:
        what.append(f"local rope base {config.rope_local_theta:g} (older llama.cpp fixes 10000)")
    if what:
        log.warning("%s GGUF: stored in the metadata, but llama.cpp may apply its own rule for %s",
                    config.model_type, "; ".join(what))


def _add_architecture(writer: gguf.GGUFWriter, config, arch: str, vocab_size: int) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
    if config.sliding_window is not None and any(config.sliding_layers):
        writer.add_sliding_window(config.sliding_window)
    if arch in gguf_reader.SWA_PATTERNS:  # gemma2, gemma3
        writer.add_attention_scale(config.attention_scale)
        writer.add_sliding_window_pattern(list(config.sliding_layers))
        if config.final_logit_softcap is not None:
            writer.add_final_logit_softcapping(config.final_logit_softcap)
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(config.attn_logit_softcap)
        else:
            writer.add_rope_freq_base_swa(config.rope_local_theta)
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def write_gguf(path: str | os.PathLike, config, shapes: Mapping[str, tuple[int, ...]],
               tensors: Iterable[tuple[str, np.ndarray]], *, tokenizer_meta: Mapping[str, tuple] | None = None,
               tensor_type: str = "Q8_0", name: str | None = None) -> Path:
    """Write a GGUF file.

    ``config``: the model's :class:`~qlora_jax.models.ModelConfig`. ``shapes``: every transformers
    tensor name -> shape, in the order ``tensors`` will yield them (HF ``[out, in]`` float
    arrays; a tied model has no ``lm_head.weight``). ``tokenizer_meta``: from
    :func:`tokenizer_metadata` or :func:`copied_tokenizer_metadata`. The file is written to a
    temporary name and renamed when complete.
    """
    arch = check_exportable(config)
    _warn_llama_cpp_rules(config, arch)
    info = gguf_reader.ARCHITECTURES[arch]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tied = "lm_head.weight" not in shapes

    # (gguf name, hf name, stored shape, type, which half of the hf tensor's rows or None)
    plan: list[tuple[str, str | None, tuple[int, ...], GGML, int | None]] = []
    for hf_name, shape in shapes.items():
        gguf_names = hf_to_gguf_names(hf_name, arch)
        shape = tuple(shape)
        if len(gguf_names) == 2:  # the experts' gate | up rows, one tensor each
            shape = shape[:-2] + (shape[-2] // 2, shape[-1])
        for half, gguf_name in enumerate(gguf_names):
            plan.append((gguf_name, hf_name, shape, tensor_type_for(gguf_name, shape, tensor_type, tied=tied),
                         half if len(gguf_names) == 2 else None))
    extra = {}
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3":
        extra[ROPE_FREQS] = llama3_rope_freqs(config)
        plan.append((ROPE_FREQS, None, extra[ROPE_FREQS].shape, GGML.F32, None))
    vocab_size = shapes["model.embed_tokens.weight"][0]

    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        if name:
            writer.add_name(name)
        writer.add_type(gguf.GGUFType.MODEL)
        _add_architecture(writer, config, arch, vocab_size)
        writer.add_file_type(int(_FILE_TYPES[TENSOR_TYPES[tensor_type]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, (value, vtype, sub_type) in (tokenizer_meta or {}).items():
            writer.add_key_value(key, value, vtype, sub_type)
        for gguf_name, _, shape, qtype, _ in plan:
            # GGUFWriter takes numpy-order shapes for float types and byte shapes for block types.
            byte_shape = shape if qtype in (GGML.F32, GGML.F16) else gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.float32 if qtype == GGML.F32 else
                                                                   np.float16 if qtype == GGML.F16 else np.uint8),
                                   _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        pending = iter(tensors)
        current_name, current = None, None
        for gguf_name, hf_name, _, qtype, half in plan:
            if hf_name is None:
                values = extra[gguf_name]
            else:
                if hf_name != current_name:  # the next transformers tensor (a fused one serves two entries)
                    current_name, current = next(pending, (None, None))
                    if current_name != hf_name:
                        raise ValueError(f"tensors arrived out of order: expected {hf_name!r}, got {current_name!r}")
                    current = np.asarray(current, np.float32)
                    if current.shape != tuple(shapes[hf_name]):
                        raise ValueError(f"{hf_name}: shape {current.shape}, declared {tuple(shapes[hf_name])}")
                values = current if half is None else np.split(current, 2, axis=-2)[half]
                kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else None
                if info.rotary_permuted and kind in heads:
                    values = permute_rotary(values, heads[kind])
                if info.norm_offset and gguf_name.endswith("norm.weight"):
                    values = values + np.float32(info.norm_offset)
            writer.write_tensor_data(encode_tensor(values, qtype))
        if next(pending, None) is not None:
            raise ValueError("more tensors than declared shapes")
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def model_tensor_shapes(model) -> dict[str, tuple[int, ...]]:
    """transformers name -> per-layer shape of every frozen weight, in ``iter_hf_tensors`` order."""
    shapes = {}
    for name, slot in hf_name_table(model).items():
        var = model
        for part in slot.path:
            var = getattr(var, part)
        value = var.get_value()
        if isinstance(var, QuantParam):  # Quant4bit.shape is one matrix's (out, in); experts: E of them
            shapes[name] = ((model.config.num_experts,) if "experts" in slot.path else ()) + tuple(value.shape)
        else:
            shapes[name] = tuple(value.shape[1:] if slot.layer is not None else value.shape)
    return shapes


def save_gguf(model, path: str | os.PathLike, *, tokenizer=None, source_gguf: gguf_reader.GGUFSource | None = None,
              tensor_type: str = "Q8_0", name: str | None = None) -> Path:
    """Write ``model`` with its adapters merged (``W + s B A`` on the dequantized base) as GGUF.

    Tokenizer metadata comes from ``source_gguf`` (copied) when given, else from ``tokenizer``.
    """
    shapes = model_tensor_shapes(model)
    vocab_size = shapes["model.embed_tokens.weight"][0]
    if source_gguf is not None:
        meta = copied_tokenizer_metadata(source_gguf)
    elif tokenizer is not None:
        meta = tokenizer_metadata(tokenizer, vocab_size)
    else:
        meta = None
    return write_gguf(path, model.config, shapes, iter_hf_tensors(model, merge_lora=True, dtype=np.float32),
                      tokenizer_meta=meta, tensor_type=tensor_type, name=name)


__all__ = ["ARCHITECTURES", "TENSOR_TYPES", "check_exportable", "copied_tokenizer_metadata", "encode_tensor",
           "hf_to_gguf_name", "hf_to_gguf_names",
           "llama3_rope_freqs", "model_tensor_shapes", "permute_rotary", "save_gguf", "tensor_type_for",
           "tokenizer_metadata", "write_gguf"]

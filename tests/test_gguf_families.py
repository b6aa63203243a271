"""GGUF out and in for Mistral, Phi-3, Gemma 2, Gemma 3 (text) and Qwen3-MoE.

References: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``: gguf-py's
dequantization plus transformers' undoing of llama.cpp's conventions -- llama's q/k row order,
Gemma's norms stored as ``1 + w``, Qwen3-MoE's experts split into gate and up tensors), the
transformers PyTorch model the weights came from, and gguf-py's ``GGUFReader`` for raw tensors.

* ``test_export_loads_in_transformers``: a tiny random transformers model -> our model (f32 base,
  random LoRA on every linear, experts included) -> ``save_gguf`` (F32, so the check is parity,
  not quantization error) -> transformers' GGUF loader. Its logits equal those of the transformers
  model holding our merged weights, and our ``load_model`` of the same file equals transformers'.
  transformers' loader reads only part of these families' metadata and takes its config class's
  defaults for the rest (Mistral comes back as Llama; Phi-3's partial rotary factor and window,
  Gemma 2's soft caps and ``query_pre_attn_scalar``, Gemma 3's local rope base, layer pattern and
  rope scaling, Qwen3-MoE's ``moe_intermediate_size`` are not read), so these configs keep those
  features at the defaults.
* ``test_features_round_trip``: the feature-rich configs of test_families.py / test_phi3.py
  (windows shorter than the sequence, soft caps of 1 and 2, query_pre_attn_scalar != head_dim,
  biased Gemma 2 attention, Gemma 3's 2-of-3 layer pattern, local rope base and linear rope
  scaling, Phi-3's half-rotary heads) written by us and read back by our loader: logits equal the
  original transformers model's, so the metadata carries every feature.
* ``test_sentencepiece_tokenizer_metadata``: a tiny SentencePiece-style tokenizer (byte fallback,
  ``▁`` for spaces) written as llama.cpp's ``llama`` tokenizer model; transformers' GGUF tokenizer
  builder (which derives the merges from our scores for Mistral's llama architecture, from the
  token order for Gemma) tokenizes like the original.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from _support import max_abs, randomize_, require, tensors_of, torch_logits

torch = require("torch")
transformers = require("transformers")
gguf = require("gguf")

from qlora_jax.checkpoints.gguf_reader import gguf_config  # noqa: E402
from qlora_jax.checkpoints.gguf_writer import check_exportable, save_gguf  # noqa: E402
from qlora_jax.checkpoints.load import load_model  # noqa: E402
from qlora_jax.lora import LoraConfig  # noqa: E402
from qlora_jax.models import ModelConfig, build_model, iter_hf_tensors  # noqa: E402

PARITY_TOL = 1e-4  # f32 logits, same weights
VOCAB, SEQ, WINDOW = 128, 12, 5
IDS = np.random.default_rng(0).integers(3, VOCAB, (2, SEQ)).astype(np.int32)
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MOE = dict(moe_intermediate_size=64, head_dim=32, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)

# Per family: transformers config class, and the configs of the two tests.
FAMILIES = {
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=None),
                dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, sliding_window=None),
             dict(num_hidden_layers=2, sliding_window=WINDOW, original_max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, head_dim=256, query_pre_attn_scalar=256,
                                    sliding_window=WINDOW),
               dict(num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                    attn_logit_softcapping=1.0, final_logit_softcapping=2.0, attention_bias=True)),
    # 6 layers: transformers' default pattern (every 6th global) is the one its GGUF loader assumes.
    "gemma3_text": ("Gemma3TextConfig", dict(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256,
                                             sliding_window=WINDOW),
                    dict(num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                         final_logit_softcapping=2.0,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                          "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                             "rope_theta": 10000.0}})),
    # transformers' GGUF loader does not read expert_feed_forward_length: its default 768 it must be.
    "qwen3_moe": ("Qwen3MoeConfig", dict(_MOE, num_hidden_layers=2, moe_intermediate_size=768),
                  dict(_MOE, num_hidden_layers=2)),
}
GGUF_ARCH = {"mistral": "llama", "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen3_moe": "qwen3moe"}


def hf_model(family: str, which: int, seed: int = 0):
    """The tiny transformers model of ``family`` (config ``which``: 1 export test, 2 features test)."""
    cls_name, *configs = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**_SMALL, **configs[which - 1]})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_(model)
    if family.startswith("gemma"):  # gemma's norms hold w of (1 + w): around 0, not 1
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.sub_(1.0)
    return model, config.to_dict()


def lora_for(family: str) -> LoraConfig:
    experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj") if family == "qwen3_moe" else ()
    return LoraConfig(r=4, alpha=8.0, targets="all-linear", target_parameters=experts)


def randomize_lora_b(model, seed: int) -> None:
    """Nonzero adapters everywhere (B starts at 0, which would make the merge vacuous)."""
    from flax import nnx

    from qlora_jax.lora import LoRAParam

    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, LoRAParam) and path[-1] == "lora_b":
            value = var.get_value()
            var.set_value(jnp.asarray(rng.normal(0.0, 0.05, value.shape), value.dtype))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers(family, tmp_path):
    reference, cfg = hf_model(family, 1)
    model = build_model(cfg, tensors_of(reference), lora=lora_for(family), dtype=jnp.float32)
    randomize_lora_b(model, seed=1)
    merged = dict(iter_hf_tensors(model, merge_lora=True))
    missing, unexpected = reference.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()},
                                                    strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied: the embedding
    expected = torch_logits(reference, IDS)

    path = save_gguf(model, tmp_path / "model.gguf", tensor_type="F32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == GGUF_ARCH[family]
    # The file has no tokenizer, so no token ids: Phi3Config's defaults (32000) lie outside the vocabulary.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32, bos_token_id=1, eos_token_id=2, pad_token_id=0).eval()
    their_logits = torch_logits(theirs, IDS)
    assert max_abs(their_logits, expected) <= PARITY_TOL

    ours, _ = load_model(path, quantize=None, with_tokenizer=False)
    assert ours.config.model_type == ("llama" if family == "mistral" else family)  # no window: llama.cpp's llama
    assert max_abs(np.asarray(ours(jnp.asarray(IDS))), their_logits) <= PARITY_TOL

    names = {t.name for t in reader.tensors}
    if family == "phi3":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.ffn_gate.weight" not in names
    if family == "qwen3_moe":
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.ffn_gate_inp.weight"] == "F32" and "blk.1.ffn_up_exps.weight" in names


@pytest.mark.parametrize("family", list(FAMILIES))
def test_features_round_trip(family, tmp_path):
    reference, cfg = hf_model(family, 2, seed=3)
    expected = torch_logits(reference, IDS)
    model = build_model(cfg, tensors_of(reference), dtype=jnp.float32)
    path = save_gguf(model, tmp_path / "model.gguf", tensor_type="F32")

    config = gguf_config(path)
    assert config["model_type"] == family
    ours, _ = load_model(path, quantize=None, with_tokenizer=False)
    assert ours.config == model.config
    assert max_abs(np.asarray(ours(jnp.asarray(IDS))), expected) <= PARITY_TOL

    if family.startswith("gemma"):  # llama.cpp's convention: every norm weight stored as 1 + w
        stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
        state = reference.state_dict()
        for gguf_name, hf_name in (("output_norm.weight", "model.norm.weight"),
                                   ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
                                   ("blk.0.ffn_norm.weight", "model.layers.0.pre_feedforward_layernorm.weight")):
            np.testing.assert_array_equal(stored[gguf_name], 1 + state[hf_name].numpy(), err_msg=gguf_name)


@pytest.mark.parametrize("family, change, words", [
    ("gemma2", dict(attn_logit_softcap=None), "soft-caps"),
    ("gemma2", dict(tie_word_embeddings=False), "tie_word_embeddings"),
    ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob"),
])
def test_unsupported_combinations_fail_in_one_line(family, change, words):
    cls_name, _, cfg = FAMILIES[family]
    config = ModelConfig.from_hf(getattr(transformers, cls_name)(**{**_SMALL, **cfg}).to_dict())
    config = dataclasses.replace(config, **change)
    with pytest.raises(NotImplementedError) as err:
        check_exportable(config)
    message = str(err.value)
    assert "\n" not in message and family in message and words in message


_SP = "\u2581"
_MERGED = [_SP + "t", "he", _SP + "the", _SP + "c", "at", _SP + "cat", _SP + "s", "ats", _SP + "a", "nd", _SP + "and",
           "or", _SP + "o", "in", "is", _SP + "is", "on", _SP + "on", "the", "ca"]  # in merge priority order
TEXTS = ["the cat sat on the mat, and is it?", "  two  spaces\nnewline \u00fcn\u00efc\u00f6d\u00e9 \u2615",
         "thecat scatsthe"]


def sentencepiece_tokenizer(arch: str):
    """A tiny byte-fallback BPE tokenizer the way transformers converts a SentencePiece model:
    merges from every split of each piece, best piece first. For Mistral's llama architecture the
    ids run opposite to the merge priority (so only the scores can carry it); Gemma's follow it."""
    from transformers.tokenization_utils_base import generate_merges

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    ids = _MERGED if arch.startswith("gemma") else _MERGED[::-1]
    vocab = {t: i for i, t in enumerate(specials + list(_SP + "thecasndorilgmpuw.,") + ids)}
    priority = {t: -float(_MERGED.index(t)) for t in _MERGED}
    cls = transformers.GemmaTokenizer if arch.startswith("gemma") else transformers.LlamaTokenizer
    return cls(vocab=vocab, merges=generate_merges(vocab, priority), bos_token="<s>", eos_token="</s>",
               unk_token="<unk>")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_sentencepiece_tokenizer_metadata(arch, tmp_path):
    from qlora_jax.checkpoints.gguf_writer import tokenizer_metadata

    tokenizer = sentencepiece_tokenizer(arch)
    vocab_size = len(tokenizer) + 3  # embedding rows beyond the vocabulary: UNUSED fillers
    meta = tokenizer_metadata(tokenizer, vocab_size)
    path = tmp_path / "tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype, sub_type) in meta.items():
        writer.add_key_value(key, value, vtype, sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()

    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() == (arch == "llama")
    types = fields["tokenizer.ggml.token_type"].contents()
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE and types[tokens.index("<unk>")] == gguf.TokenType.UNKNOWN
    assert types[tokens.index("</s>")] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert theirs.tokenize(text) == tokenizer.tokenize(text), text


def test_cli_refuses_before_loading(tmp_path, capsys):
    """``export --format gguf`` of a run whose model llama.cpp cannot run as trained: one ``error:``
    line naming the model_type, before any weight is read (the base holds only its config.json)."""
    import json

    from qlora_jax.cli import export as export_cli

    base, workdir = tmp_path / "base", tmp_path / "run"
    base.mkdir()
    _, cfg = hf_model("qwen3_moe", 2)
    (base / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": False}))
    (workdir / "adapter").mkdir(parents=True)
    (workdir / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
         "base_model_name_or_path": str(base)}))
    (workdir / "summary.json").write_text(json.dumps({"model": str(base), "quantize": "nf4"}))
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--workdir", str(workdir), "--format", "gguf"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0, err
    assert err.startswith("error: GGUF export of qwen3_moe with norm_topk_prob=false"), err
    assert not (workdir / "export").exists()

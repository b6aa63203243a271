"""bitsandbytes 4-bit safetensors layout, checked against bitsandbytes and transformers themselves.

References: ``bitsandbytes.functional.quantize_4bit / dequantize_4bit / QuantState`` for single
tensors; for whole checkpoints a tiny random LlamaForCausalLM quantized and saved by
transformers + bitsandbytes on CPU, and loaded back by them from what we write.

bitsandbytes-CPU (0.50) dequantizes some N-D shapes wrongly (REFERENCE.md), so every bnb
dequantization here runs on a 1-D view of the same quant state. Its 8-bit double-quant encoder is
approximate, so we compare dequantized values, never codes from two different encoders.
"""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
from _support import require

torch = require("torch")
bnb_functional = require("bitsandbytes.functional")
transformers = require("transformers")

from qlora_jax.checkpoints import (  # noqa: E402
    bnb_quantization_config,
    bnb_tensors_to_quant4bit,
    hf_config,
    is_bnb_4bit_checkpoint,
    iter_bnb_checkpoint,
    iter_hf_tensors,
    quant4bit_to_bnb_tensors,
    save_bnb_checkpoint,
)
from qlora_jax.quant import Quant4bit, dequantize_4bit, quantize_4bit  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# jit: one compilation per shape instead of one per primitive (4 s -> 1 s for eager quantize).
_quantize = jax.jit(quantize_4bit, static_argnames=("quant_type", "blocksize", "double_quant"))
_dequantize = jax.jit(dequantize_4bit, static_argnums=1)


def _bnb_dequantize_flat(packed: torch.Tensor, state) -> np.ndarray:
    """bitsandbytes' dequantization of a quant state, on a 1-D shape (its N-D path is buggy on CPU)."""
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([int(np.prod(tuple(state.shape)))])
    return bnb_functional.dequantize_4bit(packed, flat_state).reshape(-1).float().numpy()


def _ours_flat(q: Quant4bit) -> np.ndarray:
    return np.asarray(_dequantize(q, "float32")).reshape(-1)


def _assert_bitwise(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Bit for bit, except the sign of a zero: the sign bitsandbytes-CPU gives FP4's zero codes
    depends on the machine (it matched ours on an AVX512 VM, 2026-11-22; it differs on one without
    AVX512, 2026-11-30), so both sides' zeros are made +0.0 (``x + 0.0``) before the comparison."""
    assert ours.shape == ref.shape, what
    ours, ref = ours + np.float32(0), ref + np.float32(0)
    bad = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert bad.size == 0, f"{what}: {bad.size} values differ, first at {bad[:5]}: {ours[bad[:5]]} vs {ref[bad[:5]]}"


def _bnb_entries(prefix: str, packed: torch.Tensor, state) -> dict[str, np.ndarray]:
    """The safetensors entries bitsandbytes serializes for one weight, as numpy."""
    entries = {f"{prefix}.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}
    entries[prefix] = packed.numpy()
    return entries


# ------------------------------------------------------------------------------------------
# Single tensors against bitsandbytes.functional
# ------------------------------------------------------------------------------------------

TENSOR_CASES = [
    ((128, 64), "nf4", True, 64),
    ((96, 80), "nf4", True, 64),     # not row layout; a shape bnb-CPU's N-D dequantize gets wrong
    ((7, 33), "nf4", False, 64),     # odd element count, partial last block
    ((300, 256), "nf4", True, 64),   # 1200 blocks: several nested blocks
    ((64, 128), "fp4", True, 128),
    ((40, 24), "fp4", False, 64),
]


@pytest.mark.parametrize("shape,quant_type,double_quant,blocksize", TENSOR_CASES)
def test_bnb_state_reads_as_quant4bit(shape, quant_type, double_quant, blocksize):
    """A quant state bitsandbytes made decodes, through our reader, to what bitsandbytes decodes."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    q = bnb_tensors_to_quant4bit("w.weight", _bnb_entries("w.weight", packed, state))
    assert q.shape == shape and q.quant_type == quant_type and q.blocksize == blocksize
    assert q.double_quant == double_quant and q.dtype == "float32"
    _assert_bitwise(_ours_flat(q), _bnb_dequantize_flat(packed, state), f"{shape} {quant_type}")


@pytest.mark.parametrize("shape,quant_type,double_quant,blocksize", TENSOR_CASES)
def test_quant4bit_writes_bnb_layout(shape, quant_type, double_quant, blocksize):
    """Our tensors have bitsandbytes' keys, dtypes, shapes and JSON, and bitsandbytes decodes them
    to our values."""
    weight = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    q = _quantize(weight, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    ours = quant4bit_to_bnb_tensors("w.weight", q)

    packed_ref, bnb_state = bnb_functional.quantize_4bit(torch.from_numpy(weight), blocksize=blocksize,
                                                         quant_type=quant_type, compress_statistics=double_quant)
    reference = _bnb_entries("w.weight", packed_ref, bnb_state)
    assert sorted(ours) == sorted(reference)
    for key in reference:
        assert ours[key].dtype == reference[key].dtype, key
        if "quant_state" not in key:
            assert ours[key].shape == reference[key].shape, key
    state_key = f"w.weight.quant_state.bitsandbytes__{quant_type}"
    ours_json = json.loads(bytes(ours[state_key]))
    ref_json = json.loads(bytes(reference[state_key]))
    assert list(ours_json) == list(ref_json)
    assert {k: v for k, v in ours_json.items() if k != "nested_offset"} == \
           {k: v for k, v in ref_json.items() if k != "nested_offset"}
    np.testing.assert_array_equal(ours["w.weight.quant_map"], reference["w.weight.quant_map"])
    if double_quant:
        np.testing.assert_array_equal(ours["w.weight.nested_quant_map"], reference["w.weight.nested_quant_map"])
        # nested_offset is mean(absmax): same first-level absmax, summed in a different order.
        assert ours_json["nested_offset"] == pytest.approx(ref_json["nested_offset"], rel=1e-6)

    # bitsandbytes reads our entries and decodes them to exactly our values.
    state = bnb_functional.QuantState.from_dict(
        {k.removeprefix("w.weight."): torch.from_numpy(np.array(v)) for k, v in ours.items() if k != "w.weight"},
        device=torch.device("cpu"))
    decoded = _bnb_dequantize_flat(torch.from_numpy(np.array(ours["w.weight"])), state)
    _assert_bitwise(decoded, _ours_flat(q), f"{shape} {quant_type}")

    # And our reader restores every field bit for bit.
    back = bnb_tensors_to_quant4bit("w.weight", ours)
    for field in ("packed", "absmax", "nested_absmax", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(back, field)), np.asarray(getattr(q, field)), field)
    assert (back.shape, back.dtype, back.blocksize, back.quant_type) == (q.shape, q.dtype, q.blocksize, q.quant_type)


def test_reader_rejects_foreign_code_books():
    q = _quantize(np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32))
    entries = quant4bit_to_bnb_tensors("m.weight", q)

    bad = dict(entries, **{"m.weight.quant_map": entries["m.weight.quant_map"] * np.float32(0.5)})
    with pytest.raises(ValueError, match="quant_map"):
        bnb_tensors_to_quant4bit("m.weight", bad)

    nested = entries["m.weight.nested_quant_map"].copy()
    nested[3] += np.float32(1e-3)
    with pytest.raises(ValueError, match="nested_quant_map"):
        bnb_tensors_to_quant4bit("m.weight", dict(entries, **{"m.weight.nested_quant_map": nested}))

    with pytest.raises(KeyError, match="quant_state"):
        bnb_tensors_to_quant4bit("m.weight", {k: v for k, v in entries.items() if "quant_state" not in k})

    with pytest.raises(ValueError, match="packed bytes"):
        bnb_tensors_to_quant4bit("m.weight", dict(entries, **{"m.weight": entries["m.weight"][:-1]}))


# ------------------------------------------------------------------------------------------
# Whole checkpoints against transformers + bitsandbytes
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random f32 Llama, and transformers + bitsandbytes' NF4/double-quant version of it."""
    root = tmp_path_factory.mktemp("bnb")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(root / "f32")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        root / "f32", quantization_config=bnb_config, device_map="cpu").eval()
    quantized.save_pretrained(root / "bnb")
    return root, quantized


def _linear4bit_modules(model) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_is_bnb_4bit_checkpoint(checkpoints):
    root, _ = checkpoints
    assert is_bnb_4bit_checkpoint(hf_config(root / "bnb"))
    assert not is_bnb_4bit_checkpoint(hf_config(root / "f32"))


def test_read_transformers_bnb_checkpoint(checkpoints):
    """(a) Every quantized linear transformers saved reads as a Quant4bit that decodes exactly like
    bitsandbytes decodes the module's own quant state; every other tensor is the module's."""
    root, quantized = checkpoints
    modules = _linear4bit_modules(quantized)
    assert len(modules) == 2 * len(LINEARS)
    state_dict = {k: v for k, v in quantized.state_dict().items() if k.count(".weight.") == 0}

    seen = set()
    for name, value in iter_bnb_checkpoint(root / "bnb"):
        seen.add(name)
        if name in modules:
            assert isinstance(value, Quant4bit), name
            weight = modules[name].weight
            assert value.shape == tuple(weight.quant_state.shape) and value.quant_type == "nf4"
            assert value.double_quant and value.blocksize == 64
            _assert_bitwise(_ours_flat(value), _bnb_dequantize_flat(weight.data, weight.quant_state), name)
        else:
            assert isinstance(value, np.ndarray), name
            np.testing.assert_array_equal(value, state_dict[name].numpy(), err_msg=name)
    assert seen == set(state_dict)


def test_write_checkpoint_transformers_loads(checkpoints, tmp_path):
    """(b) Our own Quant4bits, written in the bitsandbytes layout (in several shards), load in
    transformers + bitsandbytes as Linear4bit modules that decode to our values, and the model
    computes the same logits as an f32 model holding our dequantized weights."""
    root, _ = checkpoints
    ours: dict[str, object] = {}
    for name, value in iter_hf_tensors(root / "f32"):
        is_linear = any(f".{linear}." in name for linear in LINEARS)
        ours[name] = _quantize(value) if is_linear else value
    config = json.loads((root / "f32" / "config.json").read_text())
    out = save_bnb_checkpoint(tmp_path / "ours", ours.items(), config,
                              bnb_quantization_config("nf4", True, compute_dtype="float32"),
                              max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()

    # Our reader gets back exactly what we wrote, across shards.
    read_back = dict(iter_bnb_checkpoint(out))
    assert set(read_back) == set(ours)
    for name, value in ours.items():
        if isinstance(value, Quant4bit):
            for leaf_ours, leaf_back in zip(jax.tree.leaves(value), jax.tree.leaves(read_back[name])):
                np.testing.assert_array_equal(np.asarray(leaf_back), np.asarray(leaf_ours), err_msg=name)
        else:
            np.testing.assert_array_equal(read_back[name], value, err_msg=name)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    modules = _linear4bit_modules(loaded)
    assert set(modules) == {n for n, v in ours.items() if isinstance(v, Quant4bit)}
    dequantized = {}
    for name, module in modules.items():
        weight = module.weight
        reference = _bnb_dequantize_flat(weight.data, weight.quant_state)
        _assert_bitwise(_ours_flat(ours[name]), reference, name)
        dequantized[name] = reference.reshape(ours[name].shape)

    # Logits: bitsandbytes' 4-bit model vs a plain f32 model with our dequantized weights. On a CPU
    # with AVX512-BF16, Linear4bit's inference forward repacks its weight for a bfloat16 kernel
    # (~3e-3 off an f32 matmul); switch that off to compare the f32 dequantize-and-matmul path.
    for module in modules.values():
        module.support_avx512bf16_for_cpu = False
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    plain.load_state_dict({n: torch.from_numpy(np.asarray(dequantized.get(n, v))) for n, v in ours.items()})
    tokens = torch.tensor([[1, 5, 17, 42, 99, 200, 3]])
    with torch.no_grad():
        logits_bnb = loaded(tokens).logits.numpy()
        logits_plain = plain(tokens).logits.numpy()
    assert np.isfinite(logits_bnb).all()
    np.testing.assert_allclose(logits_bnb, logits_plain, rtol=1e-4, atol=1e-5)

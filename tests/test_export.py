"""Export of a training run (``python -m qlora_jax.export``): merged HF model, PEFT adapter,
bitsandbytes 4-bit checkpoint, GGUF.

References: transformers 5.23 (``from_pretrained`` of the merged and bnb4 directories, its GGUF
loader), bitsandbytes 0.50.2 on CPU (``Linear4bit`` and ``functional.dequantize_4bit``), PEFT 0.21
(``PeftModel.from_pretrained``), gguf-py 0.19 (``GGUFReader`` and ``quants``), and our own GGUF
reader. The runs are built by hand: a tiny random LLaMA (hidden 64, 2 layers, 4 heads / 2 KV
heads) with SmolLM2's tokenizer, a ``summary.json`` and a PEFT adapter with nonzero random
adapters on all seven projections (or an Orbax checkpoint instead of the adapter).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _support import require
from flax import nnx
from safetensors.numpy import load_file

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

from qlora_jax.checkpoints import export as export_lib  # noqa: E402
from qlora_jax.checkpoints import (  # noqa: E402
    gguf_config,
    gguf_tokenizer,
    iter_bnb_checkpoint,
    iter_gguf_tensors,
    open_gguf,
    resolve_builtin,
    run_dir,  # noqa: E402
)
from qlora_jax.checkpoints.gguf_reader import unpermute_rotary  # noqa: E402
from qlora_jax.checkpoints.gguf_writer import hf_to_gguf_name, permute_rotary, save_gguf  # noqa: E402
from qlora_jax.checkpoints.load import load_model  # noqa: E402
from qlora_jax.checkpoints.peft_io import save_peft_adapter  # noqa: E402
from qlora_jax.cli import export as export_cli  # noqa: E402
from qlora_jax.lora import LoraConfig, LoRAParam  # noqa: E402
from qlora_jax.models import iter_hf_tensors  # noqa: E402

IDS = np.array([[1, 5, 17, 42, 99, 200, 3000, 45000, 9, 2]])
PARITY_TOL = 1e-4  # f32 logits, same weights
LORA = LoraConfig(r=4, alpha=8.0, targets="all-linear")
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Convert 12.5 km to miles, café-style ☕."},
        {"role": "assistant", "content": "About 7.77 miles."}]


# ------------------------------------------------------------------------------------------
# Fixtures: a tiny base model and runs trained on it (by hand)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_tokenizer():
    return gguf_tokenizer(resolve_builtin("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random f32 LLaMA saved by transformers, with SmolLM2's tokenizer beside it."""
    root = tmp_path_factory.mktemp("base")
    tok = smol_tokenizer
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # non-trivial norms, so a swapped or dropped norm shows
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def randomize_lora_b(model, seed: int, std: float = 0.02) -> None:
    """Nonzero ``lora_b`` everywhere (training starts from B = 0, which would make every check vacuous)."""
    rng = np.random.default_rng(seed)
    done = set()
    for view in model.iter_linears():
        if view.adapted and id(view.linear) not in done:
            done.add(id(view.linear))
            b = view.linear.lora_b.get_value()
            view.linear.lora_b.set_value(jnp.asarray(rng.normal(0.0, std, b.shape), b.dtype))


def make_run(root: Path, base: Path, quantize: str | None, seed: int):
    """A run directory as training leaves it: summary.json + adapter/ (PEFT). Returns (workdir, model)."""
    model, _ = load_model(base, quantize=quantize, lora=LORA, with_tokenizer=False)
    randomize_lora_b(model, seed)
    workdir = root / f"run-{quantize or 'none'}"
    workdir.mkdir(parents=True)
    save_peft_adapter(model, workdir / "adapter", base_model=str(base))
    (workdir / "summary.json").write_text(json.dumps({"model": str(base), "quantize": quantize}))
    return workdir, model


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, base_dir):
    workdir, model = make_run(tmp_path_factory.mktemp("runs"), base_dir, "nf4", seed=1)
    return workdir, model, np.asarray(model(jnp.asarray(IDS)))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, base_dir):
    workdir, model = make_run(tmp_path_factory.mktemp("runs"), base_dir, None, seed=2)
    return workdir, model, np.asarray(model(jnp.asarray(IDS)))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ------------------------------------------------------------------------------------------
# Reading a run
# ------------------------------------------------------------------------------------------

def test_read_run_from_summary_and_adapter(nf4_run, base_dir):
    workdir, model, _ = nf4_run
    run = run_dir.read_run(workdir)
    assert run.source == str(base_dir) and run.quantize == "nf4"
    assert run.adapter_dir == workdir / "adapter" and run.checkpoint is None
    assert (run.lora.r, run.lora.alpha, run.lora.use_rslora) == (LORA.r, LORA.alpha, LORA.use_rslora)
    assert run.lora.targeted_modules(2) == LORA.targeted_modules(2)
    rebuilt, _ = run_dir.load_run_model(run, with_tokenizer=False)
    for ours, back in zip(model.iter_linears(), rebuilt.iter_linears()):
        np.testing.assert_array_equal(back.lora_b(), ours.lora_b())
        np.testing.assert_array_equal(back.base_weight(), ours.base_weight())  # same NF4 codes


def test_read_run_from_orbax_checkpoint(tmp_path, base_dir):
    """No summary.json, no adapter/: source, quantization, LoRA config and adapters all come from the
    newest Orbax checkpoint, as the trainer writes it (items lora, train {opt_state, rng}, meta)."""
    import optax

    from qlora_jax.checkpoints.run_dir import RunCheckpoints

    lora = LoraConfig(r=2, alpha=4.0, targets=("q_proj", "v_proj"))
    model, _ = load_model(base_dir, quantize=None, lora=lora, with_tokenizer=False)
    ckpts = RunCheckpoints(tmp_path, async_save=False)
    record = {"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"], "init": "peft",
              "use_rslora": False, "model_source": str(base_dir), "quantize": "none"}
    for step, seed in ((5, 3), (10, 4)):  # the newest one must win
        randomize_lora_b(model, seed)
        lora_state = nnx.state(model, LoRAParam)
        train_state = {"opt_state": optax.adam(1e-3).init(lora_state), "rng": jax.random.key_data(jax.random.key(0))}
        ckpts.save(step, lora_state, train_state, {"step": step, "data": {}, "lora": record})
    ckpts.close()

    run = run_dir.read_run(tmp_path)
    assert run.checkpoint == tmp_path / "checkpoints" / "10" and run.adapter_dir is None
    assert (run.source, run.quantize, run.lora.targets) == (str(base_dir), None, ("q_proj", "v_proj"))
    # Checkpoints written before the adapters had their own item: state = {lora, opt_state, rng}.
    import orbax.checkpoint as ocp

    old = tmp_path / "old-layout"
    with ocp.StandardCheckpointer() as checkpointer:  # saves asynchronously; leaving the block waits
        checkpointer.save((old / "state").absolute(), {"lora": nnx.state(model, LoRAParam), "rng": 0})
    rebuilt, _ = load_model(base_dir, quantize=None, lora=lora, with_tokenizer=False)
    run_dir.load_orbax_adapters(rebuilt, old)
    for a, b in zip(jax.tree.leaves(nnx.state(rebuilt, LoRAParam)), jax.tree.leaves(nnx.state(model, LoRAParam))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    out = export_lib.export(tmp_path, "peft", tmp_path / "peft")
    saved = load_file(str(out / "adapter_model.safetensors"))
    adapted = [v for v in model.iter_linears() if v.adapted]
    assert len(saved) == 2 * len(adapted) == 8
    for view in adapted:
        np.testing.assert_array_equal(saved[f"base_model.model.{view.hf_name}.lora_B.weight"], view.lora_b())
        np.testing.assert_array_equal(saved[f"base_model.model.{view.hf_name}.lora_A.weight"], view.lora_a())


def test_errors_name_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--workdir", str(tmp_path / "nope"), "--format", "merged"])
    assert exit_info.value.code == 2 and str(tmp_path / "nope") in capsys.readouterr().err

    (tmp_path / "summary.json").write_text(json.dumps({"model": "smollm2-135m-instruct", "quantize": "nf4"}))
    with pytest.raises(run_dir.RunDirError, match=r"neither adapter/ .* nor an Orbax checkpoint"):
        run_dir.read_run(tmp_path)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(run_dir.RunDirError, match="adapter_config.json"):
        run_dir.read_run(tmp_path)
    with pytest.raises(SystemExit):  # argparse: unknown format
        export_cli.main(["--workdir", str(tmp_path), "--format", "onnx"])


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "qlora_jax.export", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    for word in ("--workdir", "--format", "merged", "peft", "bnb4", "gguf", "--gguf-type", "--dtype", "--adapter"):
        assert word in result.stdout


# ------------------------------------------------------------------------------------------
# merged
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("run_name", ["plain_run", "nf4_run"])
def test_merged_f32_logits_match(run_name, request):
    """transformers loads the merged f32 directory and computes our fine-tuned model's logits:
    measured 3e-7 (quantize none and NF4 alike: the merged weight is the dequantized base + s B A)."""
    workdir, _, ours = request.getfixturevalue(run_name)
    out = export_lib.export(workdir, "merged", workdir / "merged-f32", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32" and "quantization_config" not in config
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_abs(torch_logits(reference), ours) <= PARITY_TOL

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.apply_chat_template(CHAT, return_dict=False) == \
        transformers.AutoTokenizer.from_pretrained(request.getfixturevalue("base_dir")).apply_chat_template(
            CHAT, return_dict=False)


def test_merged_bf16_sharded(plain_run):
    """bf16 export in several shards: every tensor is the merged f32 weight rounded to bf16."""
    workdir, model, _ = plain_run
    out = export_lib.export(workdir, "merged", workdir / "merged-bf16", dtype="bfloat16", max_shard_bytes=2_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    expected = dict(iter_hf_tensors(model, merge_lora=True))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(expected) == set(index["weight_map"]) <= set(loaded)
    for name, value in expected.items():
        assert loaded[name].dtype == torch.bfloat16, name
        np.testing.assert_array_equal(loaded[name].float().numpy(),
                                      value.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=name)


# ------------------------------------------------------------------------------------------
# peft
# ------------------------------------------------------------------------------------------

def test_peft_export_loads_in_peft(plain_run, base_dir):
    """PeftModel(transformers base, exported adapter) = our fine-tuned model: measured 3e-7."""
    workdir, _, ours = plain_run
    out = export_lib.export(workdir, "peft", workdir / "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, out).eval()
    assert max_abs(torch_logits(reference), ours) <= PARITY_TOL


# ------------------------------------------------------------------------------------------
# bnb4
# ------------------------------------------------------------------------------------------

def test_bnb4_codes_exact_and_logits(nf4_run):
    """The bnb4 directory holds the run's own NF4 codes: transformers + bitsandbytes (CPU) load them
    as Linear4bit weights that dequantize bit for bit to our base weights; with the adapter from
    OUT/adapter, PeftModel's logits match ours.

    Measured: 3e-7 with bitsandbytes' f32 dequantize-and-matmul path; 3.5e-3 (logits up to ~0.8)
    with its default CPU path, which on AVX512-BF16 machines repacks the 4-bit weight for a
    bfloat16 kernel -- tolerance 1e-2 for that one.
    """
    import bitsandbytes as bnb

    workdir, model, ours = nf4_run
    out = export_lib.export(workdir, "bnb4", workdir / "bnb4", dtype="float32")
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and "not** merged" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == ("bitsandbytes", "nf4", True)

    # Our reader gets back the very arrays the model holds (no re-quantization).
    views = {f"{v.hf_name}.weight": v for v in model.iter_linears()}
    read_back = dict(iter_bnb_checkpoint(out))
    for name, view in views.items():
        stored = jax.tree.map(lambda a, i=view.layer: np.asarray(a[i]), view.linear.weight.get_value())
        for ours_leaf, back_leaf in zip(jax.tree.leaves(stored), jax.tree.leaves(read_back[name])):
            np.testing.assert_array_equal(np.asarray(back_leaf).reshape(ours_leaf.shape), ours_leaf, err_msg=name)

    logits = {}
    for f32_path in (True, False):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
        modules = {f"{n}.weight": m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert set(modules) == set(views)
        if f32_path:
            for name, module in modules.items():
                w = module.weight
                # Dequantized as 1-D: bitsandbytes-CPU's dequantize_4bit is wrong for some 2-D shapes.
                flat_state = copy.copy(w.quant_state)
                flat_state.shape = torch.Size([w.quant_state.shape.numel()])
                flat = bnb.functional.dequantize_4bit(w.data, flat_state).reshape(-1).float().numpy()
                expected = views[name].base_weight().reshape(-1)
                assert np.array_equal(flat.view(np.uint32), expected.view(np.uint32)), name
                module.support_avx512bf16_for_cpu = False  # before the first forward, which repacks
        logits[f32_path] = torch_logits(peft.PeftModel.from_pretrained(loaded, out / "adapter").eval())
    assert max_abs(logits[True], ours) <= PARITY_TOL
    assert max_abs(logits[False], ours) <= 1e-2


def test_bnb4_from_float_base_quantizes_like_loading(plain_run, base_dir):
    """A run on an unquantized base: bnb4 quantizes each linear at export exactly as loading the base
    with quantize="nf4" does, so base + exported adapter reloads bit for bit the same model."""
    from qlora_jax.checkpoints.peft_io import load_peft_adapter

    workdir, _, _ = plain_run
    out = export_lib.export(workdir, "bnb4", workdir / "bnb4", dtype="float32")
    reloaded, _ = load_model(out, quantize="nf4", lora=LORA, with_tokenizer=False)
    load_peft_adapter(reloaded, out / "adapter")
    direct, _ = load_model(base_dir, quantize="nf4", lora=LORA, with_tokenizer=False)
    load_peft_adapter(direct, workdir / "adapter")
    for a, b in zip(jax.tree.leaves(nnx.state(reloaded)), jax.tree.leaves(nnx.state(direct))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------
# gguf
# ------------------------------------------------------------------------------------------

def _block_error_bound(weight: np.ndarray, qtype: str) -> np.ndarray:
    """Per-element bound on |dequantize(quantize(w)) - w| for ggml's 32-value blocks.

    Q8_0: scale d = absmax/127 stored as f16; values round to the nearest step:
          |err| <= d/2 + 127 |d - f16(d)|.
    Q4_0: d = (signed value of largest magnitude) / -8, codes -8..7, so the far end of the opposite
          sign is clipped by one step: |err| <= |d| + 8 |d - f16(d)|.
    A relative 1e-6 of absmax covers float32 rounding in the arithmetic.
    """
    blocks = weight.reshape(-1, 32).astype(np.float32)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    steps = 127.0 if qtype == "Q8_0" else 8.0
    d = absmax / np.float32(steps)
    d16_err = np.abs(d - d.astype(np.float16).astype(np.float32))
    bound = (0.5 * d if qtype == "Q8_0" else d) + steps * d16_err + 1e-6 * absmax
    return np.broadcast_to(bound, blocks.shape).reshape(weight.shape)


@pytest.fixture(scope="module")
def gguf_files(nf4_run):
    workdir, model, _ = nf4_run
    merged = dict(iter_hf_tensors(model, merge_lora=True))
    files = {t: export_lib.export(workdir, "gguf", gguf_type=t) for t in ("F16", "Q8_0", "Q4_0")}
    return files, merged


def test_gguf_tensors_round_trip(gguf_files):
    """Our reader (which undoes llama.cpp's q/k row order) gets back the merged weights: F16
    exactly the f16 rounding; Q8_0 / Q4_0 within the per-block bound, which is tight (measured max
    error / bound 0.9995 for Q8_0, 0.99998 for Q4_0; max errors 4e-4 and 9e-3 on weights of std
    0.02). Norms are F32 and exact."""
    files, merged = gguf_files
    for qtype, path in files.items():
        reader = open_gguf(path)  # parsed once, shared with gguf_config and iter_gguf_tensors
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == qtype
        assert types["output.weight"] == ("Q8_0" if qtype == "Q4_0" else qtype)  # the head stays 8-bit
        assert gguf_config(path)["vocab_size"] == merged["model.embed_tokens.weight"].shape[0]
        back = dict(iter_gguf_tensors(path))
        assert set(back) == set(merged)
        for name, value in merged.items():
            got_type = types[hf_to_gguf_name(name)]
            if value.ndim == 1 or got_type == "F32":
                np.testing.assert_array_equal(back[name], value, err_msg=name)
            elif got_type == "F16":
                np.testing.assert_array_equal(back[name], value.astype(np.float16).astype(np.float32), err_msg=name)
            else:
                err = np.abs(back[name] - value)
                ratio = float((err / _block_error_bound(value, got_type)).max())
                assert ratio <= 1.0, f"{name} ({got_type}): error reaches {ratio:.3f} x the block bound"
                assert err.max() > 0


def test_gguf_metadata_and_tokenizer(gguf_files, smol_tokenizer, nf4_run):
    """Architecture metadata reads back as the model's config; the tokenizer (tokens, merges, types,
    special ids, chat template) equals SmolLM2's as llama.cpp stored it, and tokenizes chats alike."""
    files, _ = gguf_files
    path = files["Q8_0"]
    model = nf4_run[1]
    config = gguf_config(path)
    c = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert config[key] == getattr(c, key), key
    assert (config["rms_norm_eps"], config["rope_theta"], config["rope_scaling"]) == (1e-6, 10000.0, None)
    assert config["model_type"] == "llama" and config["bos_token_id"] == 1 and config["eos_token_id"] == 2

    ours, smol = open_gguf(path), open_gguf(resolve_builtin("smollm2-135m-instruct"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == smol.fields[key].contents(), key
    back = gguf_tokenizer(path)
    for conversation in (CHAT, CHAT[:2]):
        assert back.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False) == \
            smol_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)


def test_gguf_f16_loads_in_transformers(gguf_files, nf4_run):
    """transformers' GGUF loader reads the F16 file into the same weights our reader does (logits of
    our model loaded from the file: measured 3e-7 apart), and those logits are our fine-tuned
    model's up to the f16 rounding of the weights (measured 3.6e-4 on logits up to ~0.8; bound 2e-3)."""
    files, merged = gguf_files
    path = files["F16"]
    _, _, ours = nf4_run
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    state = reference.state_dict()
    for name, value in merged.items():  # matrices F16, norms F32
        expected = value if value.ndim == 1 else value.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(state[name].numpy(), expected, err_msg=name)
    reloaded, _ = load_model(path, quantize=None, with_tokenizer=False)
    ref_logits = torch_logits(reference)
    assert max_abs(ref_logits, np.asarray(reloaded(jnp.asarray(IDS)))) <= 1e-5
    assert max_abs(ref_logits, ours) <= 2e-3


def test_run_on_gguf_source(gguf_files, tmp_path, smol_tokenizer):
    """A run whose base is a GGUF file (here the exported F16 one): merged export takes config.json
    from the GGUF metadata and transformers computes our logits (measured 3e-7); a GGUF export
    copies the source's tokenizer metadata field for field."""
    files, _ = gguf_files
    source = files["F16"]
    workdir, model = make_run(tmp_path, source, "nf4", seed=7)
    ours = np.asarray(model(jnp.asarray(IDS)))
    out = export_lib.export(workdir, "merged", tmp_path / "merged", dtype="float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_abs(torch_logits(reference), ours) <= PARITY_TOL
    assert transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(CHAT, return_dict=False) == \
        smol_tokenizer.apply_chat_template(CHAT, return_dict=False)

    path = export_lib.export(workdir, "gguf", tmp_path / "again.gguf", gguf_type="Q8_0")
    src, again = open_gguf(source), open_gguf(path)
    keys = sorted(k for k in src.fields if k.startswith("tokenizer."))
    assert keys == sorted(k for k in again.fields if k.startswith("tokenizer.")) and len(keys) >= 10
    for key in keys:
        assert again.fields[key].types == src.fields[key].types, key
        assert again.fields[key].contents() == src.fields[key].contents(), key


@pytest.mark.parametrize("family", ["llama3-rope", "qwen2", "qwen3"])
def test_gguf_architectures_round_trip(family, tmp_path):
    """qwen2 (q/k/v biases, unpermuted rows), qwen3 (q/k norms, explicit head_dim) and llama with
    llama3 rope scaling (stored as rope_freqs) read back through our reader as the merged weights
    (F16: exactly the f16 rounding) with the same config."""
    torch.manual_seed(5)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if family == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=True))
    elif family == "qwen3":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32, rope_theta=1e6,
                                                                    tie_word_embeddings=True))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}))
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p))
    hf.float().save_pretrained(tmp_path / "base")
    model, _ = load_model(tmp_path / "base", quantize="nf4", lora=LORA, with_tokenizer=False)
    randomize_lora_b(model, seed=6)
    path = save_gguf(model, tmp_path / "model.gguf", tensor_type="F16")

    merged = dict(iter_hf_tensors(model, merge_lora=True))
    back = dict(iter_gguf_tensors(path))
    assert set(back) == set(merged)
    for name, value in merged.items():
        expected = value if value.ndim == 1 else value.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(back[name], expected, err_msg=name)
    config = gguf_config(path)
    c = model.config
    assert config["model_type"] == c.model_type and config["head_dim"] == c.head_dim
    assert config["tie_word_embeddings"] == c.tie_word_embeddings
    assert config["attention_bias"] == (family == "qwen2")
    if family == "llama3-rope":
        assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    names = {t.name for t in open_gguf(path).tensors}
    assert ("rope_freqs.weight" in names) == (family == "llama3-rope")
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "qwen3")


@pytest.mark.parametrize("n_heads", [1, 2, 8])
def test_permute_rotary_is_the_readers_inverse(n_heads):
    rng = np.random.default_rng(n_heads)
    for shape in [(n_heads * 16, 24), (n_heads * 16,)]:
        weight = rng.standard_normal(shape).astype(np.float32)
        permuted = permute_rotary(weight, n_heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(unpermute_rotary(permuted, n_heads), weight)
    # llama.cpp pairs neighbours: HF rows j and j + head_dim/2 of head 0 land at rows 2j and 2j+1.
    w = np.arange(n_heads * 8, dtype=np.float32)
    p = permute_rotary(w, n_heads)
    assert list(p[:4]) == [0, 4, 1, 5]


def test_cli_writes_gguf(nf4_run, tmp_path, capsys):
    workdir, _, _ = nf4_run
    out = tmp_path / "cli.gguf"
    path = export_cli.main(["--workdir", str(workdir), "--format", "gguf", "--gguf-type", "Q4_0", "--out", str(out)])
    assert path == out and out.is_file() and f"gguf: {out}" in capsys.readouterr().out
    assert open_gguf(out).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)


# ------------------------------------------------------------------------------------------
# Nothing a user owns is overwritten; --overwrite replaces an earlier export as a whole
# ------------------------------------------------------------------------------------------

def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _no_loading(monkeypatch):
    """The target is checked before the model is loaded: loading here fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the target was checked")
    monkeypatch.setattr(export_lib, "load_run_model", fail)


def test_merged_export_refuses_a_users_model_directory(plain_run, tmp_path, capsys, monkeypatch):
    workdir, _, _ = plain_run
    users = tmp_path / "my_model"
    users.mkdir()
    (users / "config.json").write_text('{"mine": true}')
    (users / "model.safetensors").write_bytes(b"the user's weights")
    before = _tree(users)
    _no_loading(monkeypatch)
    for flags in ([], ["--overwrite"]):  # files no export wrote: refused even with --overwrite
        with pytest.raises(SystemExit) as exit_info:
            export_cli.main(["--workdir", str(workdir), "--format", "merged", "--out", str(users), *flags])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert err == (f"error: --out {users} holds config.json and 1 more file, which no export wrote there; "
                       "choose another --out (--overwrite replaces only an earlier export)")
    with pytest.raises(export_lib.ExportError, match="which no export wrote there"):
        export_lib.export(workdir, "merged", users, overwrite=True)
    assert _tree(users) == before and sorted(p.name for p in tmp_path.iterdir()) == ["my_model"]


def test_gguf_export_refuses_an_existing_file_unless_overwrite(nf4_run, tmp_path, capsys, monkeypatch):
    workdir, _, _ = nf4_run
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"an unrelated file")
    with monkeypatch.context() as m:
        _no_loading(m)
        with pytest.raises(SystemExit) as exit_info:
            export_cli.main(["--workdir", str(workdir), "--format", "gguf", "--out", str(existing)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err == f"error: --out {existing} already exists; pass --overwrite to replace it, or choose another --out"
    assert existing.read_bytes() == b"an unrelated file"
    with pytest.raises(export_lib.ExportError, match="is a directory"):
        export_lib.export(workdir, "gguf", tmp_path)

    path = export_cli.main(["--workdir", str(workdir), "--format", "gguf", "--gguf-type", "F16", "--out",
                            str(existing), "--overwrite"])
    assert path == existing and open_gguf(existing).fields["general.file_type"].contents() == \
        int(gguf.LlamaFileType.MOSTLY_F16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.gguf"]  # no temporary left


def test_peft_export_refuses_another_runs_adapter(plain_run, nf4_run, monkeypatch):
    workdir, _, _ = plain_run
    other_adapter = nf4_run[0] / "adapter"  # written by training, not by an export
    before = _tree(other_adapter)
    _no_loading(monkeypatch)
    for overwrite in (False, True):
        with pytest.raises(export_lib.ExportError) as info:
            export_lib.export(workdir, "peft", other_adapter, overwrite=overwrite)
        assert str(info.value) == (f"--out {other_adapter} holds adapter_config.json and 1 more file, which no "
                                   "export wrote there; choose another --out (--overwrite replaces only an earlier "
                                   "export)")
    assert _tree(other_adapter) == before


def test_overwrite_replaces_a_sharded_export_as_a_whole(plain_run, tmp_path, monkeypatch):
    """Several shards, then 1 file with --overwrite: only the new export's files remain; a failed
    export leaves the old one as it was."""
    workdir, model, _ = plain_run
    out = tmp_path / "export" / "merged"
    export_lib.export(workdir, "merged", out, max_shard_bytes=2_000_000)
    first = _tree(out)
    shards = sorted(n for n in first if n.startswith("model-"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    marker = json.loads(first[export_lib.EXPORT_MARKER])
    assert marker["format"] == "merged" and set(marker["files"]) == set(first) - {export_lib.EXPORT_MARKER}

    with pytest.raises(export_lib.ExportError) as info:
        export_lib.export(workdir, "merged", out, dtype="float32")
    assert str(info.value) == (f"--out {out} holds an earlier export; pass --overwrite to replace it, or choose "
                               "another --out")
    with monkeypatch.context() as m:  # an export that fails half-way changes nothing
        def broken(model, tokenizer, fmt, path, **kwargs):
            (path / "model.safetensors").write_bytes(b"half")
            raise OSError("disk full")
        m.setattr(export_lib, "_write_format", broken)
        with pytest.raises(OSError, match="disk full"):
            export_lib.export(workdir, "merged", out, dtype="float32", overwrite=True)
    assert _tree(out) == first and sorted(p.name for p in out.parent.iterdir()) == ["merged"]

    export_lib.export(workdir, "merged", out, dtype="float32", overwrite=True)
    second = _tree(out)
    assert not [n for n in second if n.startswith("model-") or n == "model.safetensors.index.json"]
    assert "model.safetensors" in second and set(second) == set(first) - set(shards) - {
        "model.safetensors.index.json"} | {"model.safetensors"}
    assert set(json.loads(second[export_lib.EXPORT_MARKER])["files"]) == set(second) - {export_lib.EXPORT_MARKER}
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # the old export is gone, no temporaries
    loaded = load_file(str(out / "model.safetensors"))
    expected = dict(iter_hf_tensors(model, merge_lora=True))
    assert set(loaded) == set(expected)
    np.testing.assert_array_equal(loaded["lm_head.weight"], expected["lm_head.weight"])

    # An earlier export with a file the user added since: --overwrite refuses it too.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(export_lib.ExportError, match=r"holds notes.txt, which no export wrote"):
        export_lib.export(workdir, "peft", out, overwrite=True)

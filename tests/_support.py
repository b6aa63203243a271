"""What the test files share: repository paths and the rule for reference libraries.

A test that checks against an independent reference (torch, transformers, bitsandbytes, peft, trl,
gguf, sentence-transformers, ...) imports it with :func:`require`. Where it is missing, a developer's
run skips those tests; with the environment variable ``CI`` set (as ``.ci/run`` and CI services
do) the missing library fails the run instead, so a file of parity tests cannot turn green by
being skipped whole.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the directory beside the checkout: model configs, reference tables
IN_CI = bool(os.environ.get("CI"))


def require(module: str, *, reason: str | None = None) -> ModuleType:
    """``module``, imported. Missing: skip the caller (the whole file at module level), or under
    ``CI`` fail with a message naming the module and how to install it."""
    if not IN_CI:
        return pytest.importorskip(module, reason=reason)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"{module} is required when CI is set (a reference the tests check against) but cannot be "
                    f"imported: {err}. Install the test extra: .venv/bin/pip install -e '.[test]'", pytrace=False)


def write_tiny_llama(directory: Path, tokenizer, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, embed_std: float = 0.02, seed: int = 0) -> Path:
    """A random LLaMA (tied embeddings, float32) written as a HF model directory: ``config.json``,
    ``model.safetensors`` (numpy, no torch) and ``tokenizer``'s files. Returns ``directory``."""
    import numpy as np
    from safetensors.numpy import save_file

    vocab, head_dim = len(tokenizer), hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "torch_dtype": "float32"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes.update({pre + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                       pre + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       pre + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                       pre + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                       pre + "mlp.gate_proj.weight": (intermediate, hidden),
                       pre + "mlp.up_proj.weight": (intermediate, hidden),
                       pre + "mlp.down_proj.weight": (hidden, intermediate),
                       pre + "input_layernorm.weight": (hidden,), pre + "post_attention_layernorm.weight": (hidden,)})
    rng = np.random.default_rng(seed)

    def init(name, shape):
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        return rng.normal(0, embed_std if "embed" in name else 0.02, shape).astype(np.float32)

    save_file({name: init(name, shape) for name, shape in shapes.items()}, str(directory / "model.safetensors"))
    tokenizer.save_pretrained(directory)
    return directory


def compile_in_venv(venv: str, worker: str, mesh: str, *, require_env: str, missing: str, **env_extra: str) -> dict:
    """Run ``tests/<worker>`` with ``<venv>/bin/python`` (a venv with an accelerator compiler: libtpu
    or the CUDA plugin) for ``mesh`` and return the last JSON line it prints. Without the venv the
    test is skipped, or fails when ``require_env`` is set (CI that builds the venv)."""
    import json
    import subprocess

    import pytest

    python = REPO / venv / "bin" / "python"
    if not python.exists():
        if os.environ.get(require_env):
            pytest.fail(f"{require_env} is set but {python} is missing (make {venv})")
        pytest.skip(f"no {venv} (make {venv}): {missing}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the CPU session's cache (conftest.py): not for TPU/GPU targets
    r = subprocess.run([str(python), str(REPO / "tests" / worker), mesh],
                       capture_output=True, text=True, env=env, timeout=1800, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows, r.stdout[-2000:] + r.stderr[-2000:]
    return rows[-1]


# Tiny transformers models as references (tests/test_families.py, test_phi3.py, test_moe.py).

def randomize_(model) -> None:
    """Weights larger than transformers' 0.02 init (norm scales around 1), so that windows,
    routing and norms move the logits measurably."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + (0.2 if "norm" in name else 0.1) * torch.randn_like(p))


def tensors_of(model) -> list[tuple[str, np.ndarray]]:
    return [(k, v.detach().numpy().copy()) for k, v in model.state_dict().items()]


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def f32_logits_error(model, reference, ids: np.ndarray, segment_ids: np.ndarray, label: str) -> tuple[float, np.ndarray]:
    """``model``'s float32 logits through ``hidden_states`` + ``logits_from_hidden`` (shapes and
    dtype checked) against transformers' ``reference``: ``(max |diff|, reference logits)``."""
    import chex
    import jax.numpy as jnp

    batch, seq = ids.shape
    hidden = model.hidden_states(jnp.asarray(ids), segment_ids=jnp.asarray(segment_ids))
    chex.assert_shape(hidden, (batch, seq, model.config.hidden_size))
    logits = model.logits_from_hidden(hidden)
    chex.assert_shape(logits, (batch, seq, model.config.vocab_size))
    chex.assert_type(logits, jnp.float32)
    ref = torch_logits(reference, ids)
    err = max_abs(logits, ref)
    print(f"{label}: max |logit diff| vs transformers = {err:.2e}")
    return err, ref

"""The real SmolLM2-135M-Instruct, ours and transformers', loaded once per pytest session.

Loading is slow on a 2-core machine (transformers' GGUF loader parses the file twice: ~30-45 s;
ours ~10 s), so the test files that need them share these cached loaders instead of fixtures.
Each loader skips the calling test when the built-in model package is not installed (with ``CI``
set it fails instead, like a missing reference library: see ``_support.require``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _support import IN_CI, require

CHATS = [  # real chat prompts of different lengths (through the chat template)
    "What is the capital of France?",
    "Write one sentence about the ocean, then name three animals that live in it.",
    "2+2=?",
]


def smol_path():
    from qlora_jax.checkpoints import resolve_builtin

    try:
        return resolve_builtin("smollm2-135m-instruct")
    except FileNotFoundError as err:
        if IN_CI:
            pytest.fail(f"the built-in model is required when CI is set: {err}", pytrace=False)
        pytest.skip(str(err))


@functools.cache
def tokenizer():
    from qlora_jax.checkpoints import gguf_tokenizer

    return gguf_tokenizer(smol_path())


@functools.cache
def ours(quantize: str | None = None, lora=None):
    """Our model in float32 compute (``quantize``: None or "nf4"), without its tokenizer."""
    from qlora_jax.checkpoints.load import load_model

    model, _ = load_model(smol_path(), quantize=quantize, dtype="float32", lora=lora, with_tokenizer=False)
    return model


@functools.cache
def transformers_gguf():
    """transformers' own GGUF loading of the file (dequantized to float32, eager attention)."""
    torch = require("torch")
    transformers = require("transformers")
    path = smol_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def chat_ids(text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return [int(t) for t in tokenizer().apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                            return_dict=False)]


def torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids)[None])).logits[0].float().numpy()


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

"""Several named adapters on one base (``qlora_jax.inference.adapters.AdapterSet``).

Reference: peft with the same two adapters loaded into one ``PeftModel`` (``load_adapter`` +
``set_adapter``) on the same tiny transformers model; the adapters differ in rank, alpha, targets
and rsLoRA and have nonzero B (peft's ``init_lora_weights=False``), so each one's output shows.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
from _support import require

torch = require("torch")
peft = require("peft")

from test_models import PARITY_TOL, hf_tensors, max_abs, random_ids, tiny_hf, torch_logits  # noqa: E402

from qlora_jax.inference.adapters import AdapterError, AdapterSet  # noqa: E402
from qlora_jax.models import build_model  # noqa: E402

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
}


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """A tiny LLaMA, two PEFT adapters saved by peft itself, and peft's model holding both."""
    hf_model, hf_cfg = tiny_hf("llama3-rope")
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(lora_dropout=0.0, init_lora_weights=False, **kw)  # random nonzero B
        peft.get_peft_model(copy.deepcopy(hf_model), cfg).save_pretrained(root / name)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), root / "a", adapter_name="a")
    reference.load_adapter(root / "b", adapter_name="b")
    return hf_model, hf_cfg, root, reference.eval()


def test_switching_adapters_per_call_matches_peft_set_adapter(two_adapters):
    hf_model, hf_cfg, root, reference = two_adapters
    base = build_model(hf_cfg, hf_tensors(hf_model), dtype=jnp.float32)  # float base: exact parity
    adapters = AdapterSet(base)
    for name in ADAPTERS:
        adapters.load(name, root / name)
    assert adapters.names == ("a", "b")
    assert (adapters.lora_config("a").r, adapters.lora_config("b").r) == (4, 8)
    ids = random_ids(2, 20)
    ours = {name: np.asarray(adapters(jnp.asarray(ids), adapter=name)) for name in ("b", "a", "b")}
    errors = {}
    for name in ("a", "b", "a"):  # switch back and forth on both sides
        reference.set_adapter(name)
        errors[name] = max_abs(ours[name], torch_logits(reference, ids))
    with reference.disable_adapter():
        errors[None] = max_abs(adapters(jnp.asarray(ids), adapter=None), torch_logits(reference, ids))
    print("max |logit diff| vs peft:", errors)
    assert max(errors.values()) <= PARITY_TOL
    assert max_abs(ours["a"], ours["b"]) > 100 * PARITY_TOL  # the two adapters really differ

    # The adapter state is shared, not copied, between calls; the frozen base is one set of arrays.
    assert adapters.model("a").embed_tokens.weight.get_value() is adapters.model("b").embed_tokens.weight.get_value()


def test_adapter_set_errors_name_the_adapter(two_adapters, tmp_path):
    hf_model, hf_cfg, root, _ = two_adapters
    adapters = AdapterSet(build_model(hf_cfg, hf_tensors(hf_model), dtype=jnp.float32))
    adapters.load("a", root / "a")
    with pytest.raises(AdapterError, match=r"^no adapter named 'c' \(adapters: 'a'\)$"):
        adapters.model("c")
    other_cfg = dict(hf_cfg, intermediate_size=hf_cfg["intermediate_size"] * 2)  # another architecture
    other = build_model(other_cfg, _resized(hf_tensors(hf_model), other_cfg), dtype=jnp.float32,
                        lora=adapters.lora_config("a"))
    with pytest.raises(AdapterError, match=r"^adapter 'x': its model's frozen weights differ from the set's base"):
        adapters.add_from_model("x", other)


def _resized(tensors, cfg):
    """The same tensors with the MLP widened to ``cfg``'s intermediate size (zeros appended)."""
    out = []
    for name, t in tensors:
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            t = np.concatenate([t, np.zeros_like(t)], axis=0)
        elif name.endswith("down_proj.weight"):
            t = np.concatenate([t, np.zeros_like(t)], axis=1)
        out.append((name, t))
    return out

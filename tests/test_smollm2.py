"""The real SmolLM2-135M-Instruct (30 layers) against transformers' PyTorch model of the same file.

Both sides load the built-in GGUF (Q4_1 / Q8_0 / F32 tensors, dequantized to float32):
transformers with ``from_pretrained(dir, gguf_file=...)``, we with our reader. A real chat
(system + user turn, through the file's ChatML template) goes through both.

* float32, unquantized: logits within ``F32_TOL``; the same argmax everywhere and the same greedy
  continuation (the batched greedy generation against ``generate`` is in ``test_generate.py``).
* NF4 (blocksize 64, double quantization), three comparisons:
  (1) our NF4 model vs transformers holding our dequantized NF4 weights: the same weights,
  only the computation differs, so the float32 tolerance holds;
  (2) our model built from bitsandbytes' own NF4 states (``quantize_4bit`` on CPU; codes, 8-bit
  absmax, nested absmax, offset) vs transformers holding bitsandbytes' dequantization of them:
  again the float32 tolerance -- we decode bitsandbytes' states bit for bit;
  (3) NF4 quantized here vs (2): the 4-bit codes are identical, but bitsandbytes-CPU's
  approximate 8-bit absmax encoder puts ~0.2% of blocks one code away from the exact nearest
  code (DEVELOPERS.md), which moves those weights by up to ~2e-2 and the logits by ``NF4_BNB_TOL``.

SmolLM2's residual stream reaches |h| ~ 2.5e4 (massive activations), so float32 rounding alone
gives ~1e-4 on the logits after 30 layers.
"""

from __future__ import annotations

import copy

import _smollm2 as smol
import jax.numpy as jnp
import numpy as np
from _support import require

torch = require("torch")

CHAT = [
    {"role": "system", "content": "You are a concise science tutor."},
    {"role": "user", "content": "Why is the sky blue? Explain Rayleigh scattering in two sentences."},
]
# Measured on the 2-core dev machine (jax 0.10.2, torch 2.13.0), 35 positions x 49152 logits in
# [-24, 38]: f32 8.6e-05; (1) 2.0e-04; (2) 1.4e-04; (3) 1.5e-01 (the NF4 effect itself,
# NF4 vs f32 logits, is 2.4e+01).
F32_TOL = 3e-4
NF4_BNB_TOL = 0.5


def chat_ids() -> list[int]:
    return [int(t) for t in smol.tokenizer().apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True,
                                                                 return_dict=False)]


def ours_logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray([ids])))[0]


def test_f32_logits_and_greedy_tokens_match_transformers():
    ids = chat_ids()
    reference = smol.transformers_gguf()
    ref = smol.torch_logits(reference, ids)
    got = ours_logits(smol.ours(), ids)
    err = smol.max_abs(got, ref)
    print(f"SmolLM2 f32: {len(ids)} positions, max |logit diff| {err:.2e} "
          f"(logit range {ref.min():.1f}..{ref.max():.1f})")
    assert err <= F32_TOL
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    # A few greedy tokens by plain re-forwarding on both sides (no cache involved). Ours runs on
    # one right-padded length (causal: the padding after position p cannot change its logits).
    steps = 4
    seq_ours, seq_ref = list(ids), list(ids)
    for _ in range(steps):
        padded = seq_ours + [0] * (len(ids) + steps - len(seq_ours))
        seq_ours.append(int(ours_logits(smol.ours(), padded)[len(seq_ours) - 1].argmax()))
        seq_ref.append(int(smol.torch_logits(reference, seq_ref)[-1].argmax()))
    assert seq_ours == seq_ref
    print("greedy:", repr(smol.tokenizer().decode(seq_ours[len(ids):])))


def _with_weights(reference, weights: dict[str, np.ndarray]):
    model = copy.deepcopy(reference)
    state = model.state_dict()
    with torch.no_grad():
        for name, value in weights.items():
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return model


def _bnb_nf4(weight: torch.Tensor):
    """bitsandbytes' NF4 + double quantization of one weight: (its dequantization, its states as a
    ``Quant4bit``)."""
    bnbF = require("bitsandbytes.functional")
    from qlora_jax.quant import Quant4bit

    packed, qs = bnbF.quantize_4bit(weight.reshape(-1).contiguous(), blocksize=64, quant_type="nf4",
                                    compress_statistics=True)
    dequant = bnbF.dequantize_4bit(packed, qs).reshape(weight.shape).numpy()
    q = Quant4bit(packed=jnp.asarray(packed.numpy().reshape(-1)), absmax=jnp.asarray(qs.absmax.numpy()),
                  nested_absmax=jnp.asarray(qs.state2.absmax.numpy()),
                  offset=jnp.asarray(qs.offset.numpy(), jnp.float32).reshape(()),
                  shape=tuple(weight.shape), dtype="float32", blocksize=64, quant_type="nf4")
    return dequant, q


def test_nf4_logits_match_transformers_with_nf4_weights():
    require("bitsandbytes")
    from qlora_jax.checkpoints import gguf_config, iter_gguf_tensors
    from qlora_jax.models import QuantConfig, build_model, iter_hf_tensors

    ids = chat_ids()
    reference = smol.transformers_gguf()
    nf4 = smol.ours("nf4")
    got = ours_logits(nf4, ids)
    nf4_effect = smol.max_abs(got, smol.torch_logits(reference, ids))

    # (1) transformers with our dequantized NF4 weights.
    dequantized = {n: v for n, v in iter_hf_tensors(nf4) if n.endswith("_proj.weight")}
    assert len(dequantized) == 7 * 30
    err_same = smol.max_abs(got, smol.torch_logits(_with_weights(reference, dequantized), ids))

    # (2) our model built from bitsandbytes' states vs transformers with bitsandbytes' weights.
    state = reference.state_dict()
    bnb_weights, bnb_states = {}, {}
    for name in dequantized:
        bnb_weights[name], bnb_states[name] = _bnb_nf4(state[name].detach())
    tensors = ((n, bnb_states.get(n, w)) for n, w in iter_gguf_tensors(smol.smol_path()))
    from_bnb = build_model(gguf_config(smol.smol_path()), tensors, quant=QuantConfig("nf4", 64, True),
                           dtype=jnp.float32)
    ref_bnb = smol.torch_logits(_with_weights(reference, bnb_weights), ids)
    err_bnb_states = smol.max_abs(ours_logits(from_bnb, ids), ref_bnb)

    # (3) quantized here vs bitsandbytes' quantization.
    err_bnb = smol.max_abs(got, ref_bnb)
    weight_diff = max(smol.max_abs(bnb_weights[n], dequantized[n]) for n in dequantized)
    print(f"SmolLM2 NF4: (1) vs transformers + our NF4 weights {err_same:.2e}; (2) bnb states in our model vs "
          f"transformers + bnb weights {err_bnb_states:.2e}; (3) ours vs transformers + bnb weights "
          f"{err_bnb:.2e} (max weight diff {weight_diff:.2e}); NF4 vs f32 model {nf4_effect:.2e}")
    assert err_same <= F32_TOL
    assert err_bnb_states <= F32_TOL
    assert err_bnb <= NF4_BNB_TOL
    assert nf4_effect > 20 * NF4_BNB_TOL  # the quantization itself is far larger than the disagreement
    assert got[-1].argmax() == ref_bnb[-1].argmax()

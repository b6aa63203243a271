"""Supervised fine-tuning: token NLL of the completion tokens, and held-out exact match.

The loss is summed over the loss tokens of every micro-batch and divided once by their count
(``weight_key = "tokens"``): the mean token NLL of the whole optimizer step, as a big batch gives.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax.objectives.base import forward
from qlora_jax.objectives.logprobs import masked_nll_sum


class SFTObjective:
    """Token-weighted NLL of the completion tokens: (sum of NLL, {"tokens": loss tokens})."""

    stat_keys = ("tokens",)
    weight_key = "tokens"
    frozen_adapters = False

    def reference(self, graphdef, lora, rest, batch, ref_lora):
        return None

    def loss_sums(self, graphdef, lora, rest, batch, key, reference):
        s, n = nll_sums(graphdef, lora, rest, batch, key=key, deterministic=False, router_aux=True)
        return s, {"tokens": n}


def nll_sums(graphdef: Any, lora: Any, rest: Any, batch: dict[str, jax.Array], *, key: Any = None,
             deterministic: bool = True, router_aux: bool = False) -> tuple[jax.Array, jax.Array]:
    """(summed NLL of the loss tokens, number of loss tokens) of a token batch.

    ``router_aux`` (training), for a mixture of experts whose config has ``output_router_logits``:
    the sum also holds ``router_aux_loss_coef * aux * tokens``, so that the mean is transformers'
    ``loss + router_aux_loss_coef * aux_loss`` (the load-balancing loss over the batch's real,
    non-padding tokens: ``segment_ids > 0``).
    """
    model = nnx.merge(graphdef, lora, rest)
    c = model.config
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], deterministic=deterministic, rngs=key)
    if router_aux and c.num_experts and c.output_router_logits:
        h, router_logits = model.hidden_and_router_logits(batch["input_ids"], **kw)
    else:
        h, router_logits = model.hidden_states(batch["input_ids"], **kw), None
    s, n = masked_nll_sum(h, model.lm_head_weight(), batch["targets"], batch["loss_mask"],
                          logit_soft_cap=c.final_logit_softcap)
    if router_logits is None:
        return s, n
    aux = model.router_aux_loss(router_logits, batch["segment_ids"] > 0)
    return s + c.router_aux_loss_coef * aux * n, n


SFT = SFTObjective()


def row_stats(graphdef: Any, lora: Any, rest: Any, batch: dict[str, jax.Array],
              lora_enabled: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row: (summed NLL of the loss tokens, loss tokens, loss tokens the argmax predicts).

    A row whose every loss token is the argmax under teacher forcing is exactly an example that
    greedy decoding reproduces (exact match). Full float32 logits: evaluation batches are small.
    """
    model, h = forward(graphdef, lora, rest, batch, lora_enabled=lora_enabled)
    logits = model.logits_from_hidden(h).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, -1)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32) * mask
    return jnp.sum((lse - picked) * mask, -1), jnp.sum(mask, -1), jnp.sum(correct, -1)


__all__ = ["SFT", "SFTObjective", "nll_sums", "row_stats"]

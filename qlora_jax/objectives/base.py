"""The objective protocol and the one forward pass every objective runs.

The trainer's step (``train/loop.py``) splits the model into trainable adapters (``lora``) and the
frozen rest (``rest``) and scans over micro-batches; per micro-batch it asks the objective for

* ``reference(graphdef, lora, rest, batch, ref_lora)``: anything computed outside the
  differentiated function (a reference policy's log-probs), or None;
* ``loss_sums(graphdef, lora, rest, batch, key, reference)``: ``(summed loss, {stat: float32 sum})``.

The summed loss and gradient of a whole optimizer step are divided once by the statistic named
``weight_key`` (loss tokens for SFT, pairs for DPO, GRPO's normalisation), so gradient
accumulation equals the big batch. ``stat_keys`` lists every statistic; ``frozen_adapters`` says
whether the step takes a frozen copy of starting adapters (the reference policy of DPO / GRPO
runs that start from earlier adapters).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
from flax import nnx


class Objective(Protocol):
    stat_keys: tuple[str, ...]
    weight_key: str
    frozen_adapters: bool

    def reference(self, graphdef: Any, lora: Any, rest: Any, batch: dict[str, jax.Array], ref_lora: Any) -> Any:
        ...

    def loss_sums(self, graphdef: Any, lora: Any, rest: Any, batch: dict[str, jax.Array], key: Any,
                  reference: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        ...


def forward(graphdef: Any, lora: Any, rest: Any, batch: dict[str, jax.Array], *, lora_enabled: bool = True,
            key: Any = None, deterministic: bool = True) -> tuple[Any, jax.Array]:
    """``(model, final hidden states [rows, seq, hidden])`` of a token batch.

    The adapters are merged into the frozen state (no copy: the same arrays), and the batch's
    ``input_ids``, ``positions`` and ``segment_ids`` (packed sequences) go through the decoder.
    ``lora_enabled=False`` is the base model (the default reference policy); ``key`` drives
    LoRA dropout when ``deterministic`` is False.
    """
    model = nnx.merge(graphdef, lora, rest)
    h = model.hidden_states(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                            lora_enabled=lora_enabled, deterministic=deterministic, rngs=key)
    return model, h


__all__ = ["Objective", "forward"]

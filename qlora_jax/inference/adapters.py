"""Several named LoRA adapters on one frozen base: load them side by side, pick one per call.

The frozen base (4-bit codes, norms, embeddings) is held once; each adapter is its own small
state of ``LoRAParam`` variables with its own LoRA config (rank, alpha, targets, rsLoRA and DoRA
may all differ), as peft's ``PeftModel.load_adapter`` / ``set_adapter`` keep several adapters on
one base. :meth:`AdapterSet.model` joins the base with one adapter (or none) without copying
either, so switching per call costs nothing, and adapters with the same LoRA config share one
compiled forward. Training one adapter with another frozen beside it is what the trainer's
preference objectives do with ``dpo.reference="init"`` (the frozen adapters are the reference).

An adapter initialised with PiSSA or LoftQ was trained against its own residual base: it cannot
share a base with others, and loading one is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax import lora as lora_lib
from qlora_jax.checkpoints.peft_io import load_peft_adapter
from qlora_jax.checkpoints.run_dir import lora_config_from_peft
from qlora_jax.errors import UserError
from qlora_jax.lora_init import changes_base
from qlora_jax.models import CausalLM


class AdapterError(UserError):
    """An adapter cannot join the set (unknown name, another base, a residual-base init)."""


class AdapterSet:
    """Named adapters over the frozen base of ``base`` (a loaded :class:`CausalLM`; its own
    adapters, if any, are not kept: add them with :meth:`add_from_model`).

    ``model(name)`` is a :class:`CausalLM` with that adapter (``None``: the base alone), usable
    wherever a model is (``generate``, evaluation, ``model(input_ids)``).
    """

    def __init__(self, base: CausalLM):
        self._config = base.config
        self._quant = base.quant_config
        self._dtype, self._param_dtype = base.dtype, base.param_dtype
        _, _, self._rest = lora_lib.split_model(base)  # the frozen base, shared by every adapter
        self._adapters: dict[str, tuple[object, nnx.State]] = {}  # name -> (graphdef, adapter state)
        self._base_graphdef = self._skeleton(None)[0]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def lora_config(self, name: str) -> lora_lib.LoraConfig:
        return self.model(name).lora_config

    def load(self, name: str, adapter_dir: str | os.PathLike) -> None:
        """Add the PEFT adapter in ``adapter_dir`` (``adapter_config.json`` +
        ``adapter_model.safetensors``) as ``name``; an existing ``name`` is replaced."""
        adapter_dir = Path(adapter_dir)
        lora = lora_config_from_peft(adapter_dir)
        if changes_base(lora.init):
            raise AdapterError(f"{adapter_dir}: adapter initialised with {lora.init!r} was trained against its own "
                               "residual base; load it alone (python -m qlora_jax.generate --adapter ...)")
        graphdef, abstract = self._skeleton(lora)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
        model = nnx.merge(graphdef, zeros, self._rest)
        try:
            load_peft_adapter(model, adapter_dir)
        except (ValueError, FileNotFoundError) as err:
            raise AdapterError(f"adapter {name!r}: {err}") from err
        self._adapters[name] = (graphdef, nnx.state(model, lora_lib.LoRAParam))

    def add_from_model(self, name: str, model: CausalLM) -> None:
        """Add ``model``'s adapters as ``name``; ``model`` must have the same frozen base (e.g. a
        copy loaded from the same source, or the set's own ``model(...)`` after training)."""
        if model.lora_config is None:
            raise AdapterError(f"adapter {name!r}: the model has no LoRA adapters")
        graphdef, adapters, rest = lora_lib.split_model(model)
        _check_same_base(rest, self._rest, name)
        self._adapters[name] = (graphdef, adapters)

    def remove(self, name: str) -> None:
        self._get(name)
        del self._adapters[name]

    def model(self, name: str | None) -> CausalLM:
        """The base with adapter ``name`` (``None``: no adapter). Shares the arrays: no copy."""
        if name is None:
            return nnx.merge(self._base_graphdef, self._rest)
        graphdef, adapters = self._get(name)
        return nnx.merge(graphdef, adapters, self._rest)

    def __call__(self, input_ids: jax.Array, *, adapter: str | None, **kw) -> jax.Array:
        """Logits ``[batch, seq, vocab]`` with ``adapter`` (``None``: the base)."""
        return self.model(adapter)(input_ids, **kw)

    # ------------------------------------------------------------------------------------------
    def _get(self, name: str):
        if name not in self._adapters:
            known = ", ".join(map(repr, self._adapters)) or "none loaded"
            raise AdapterError(f"no adapter named {name!r} (adapters: {known})")
        return self._adapters[name]

    def _skeleton(self, lora: lora_lib.LoraConfig | None):
        """(graphdef, abstract adapter state) of the base's architecture with ``lora``; the
        frozen part must have exactly the structure of the set's base."""
        abstract = nnx.eval_shape(lambda: CausalLM(self._config, lora=lora, quant=self._quant, dtype=self._dtype,
                                                   param_dtype=self._param_dtype, rngs=nnx.Rngs(0)))
        graphdef, adapters, rest = lora_lib.split_model(abstract)
        _check_same_base(rest, self._rest, "base")
        return graphdef, adapters


def _check_same_base(rest: nnx.State, base: nnx.State, name: str) -> None:
    shapes = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype).name), rest)
    expected = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype).name), base)
    if jax.tree.structure(shapes) != jax.tree.structure(expected) or shapes != expected:
        raise AdapterError(f"adapter {name!r}: its model's frozen weights differ from the set's base "
                           "(another architecture, quantization or dtype)")


__all__ = ["AdapterError", "AdapterSet"]

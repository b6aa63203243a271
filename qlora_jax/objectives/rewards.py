"""Reward functions for GRPO: a registry of built-ins and user functions named by import path.

A reward function has trl's signature::

    def my_reward(prompts: list, completions: list[str], **columns) -> list[float | None]

``prompts`` are the dataset's prompts as given (a string or a message list), ``completions`` the
generated texts (decoded without the stop token), and every other dataset column arrives as a
keyword argument holding one value per completion (e.g. ``answer=[...]``), plus
``completion_ids`` (token ids). ``None`` means "not applicable to this row": the row is then scored
by the other functions only, and a row no function scores gets advantage 0 (as trl does).

Names (``grpo.reward_funcs``, comma-separated):

* ``format`` -- 1.0 when the completion has seed 003's form ``<reasoning> ##### <answer>``: exactly
  one separator of five ``#``, non-empty reasoning before it and a non-empty answer after it.
* ``exact_match`` -- 1.0 when the completion has that form and its answer equals the ``answer``
  column after :func:`normalize_answer` (case, spaces, surrounding quotes / final period, and
  equal numbers such as ``12`` and ``12.0``).
* ``package.module:function`` (or ``package.module.function``, or ``path/to/file.py:function``) --
  any user function with the signature above.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlora_jax.errors import UserError

RewardFn = Callable[..., Sequence[float | None]]
SEPARATOR = "#####"
_HASH_RUN = re.compile(r"#{5,}")


class RewardError(UserError):
    """A reward function cannot be found, or it returned something unusable."""


def split_reasoning_answer(text: str) -> tuple[str, str] | None:
    """``(reasoning, answer)`` of a completion in the form ``reasoning ##### answer``, else None.

    The text must contain exactly one run of five or more ``#`` and that run must be exactly
    ``#####``; both sides, stripped, must be non-empty.
    """
    runs = _HASH_RUN.findall(text)
    if len(runs) != 1 or runs[0] != SEPARATOR:
        return None
    reasoning, answer = (part.strip() for part in text.split(SEPARATOR))
    if not reasoning or not answer:
        return None
    return reasoning, answer


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding quotes or a final period; a number
    (thousands commas allowed) is written in one canonical way, so "1,200" == "1200.0"."""
    s = " ".join(str(text).split()).casefold()
    s = s.strip().strip("\"'`").strip()
    s = s.rstrip(".").strip()
    bare = s.replace(",", "")
    if _NUMBER.fullmatch(bare):
        value = float(bare)
        if math.isfinite(value):
            return str(int(value)) if value == int(value) else repr(value)
    return s


def format_reward(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float]:
    """1.0 for ``<reasoning> ##### <answer>``, else 0.0."""
    return [1.0 if split_reasoning_answer(c) is not None else 0.0 for c in completions]


def exact_match_reward(prompts: Sequence[Any], completions: Sequence[str], *, answer: Sequence[Any] | None = None,
                       **_: Any) -> list[float]:
    """1.0 when the answer after ``#####`` equals the ``answer`` column (normalized), else 0.0."""
    if answer is None:
        raise RewardError("the 'exact_match' reward needs an 'answer' column in the dataset")
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        parts = split_reasoning_answer(completion)
        out.append(1.0 if parts is not None and normalize_answer(parts[1]) == normalize_answer(gold) else 0.0)
    return out


REWARD_FUNCTIONS: dict[str, RewardFn] = {"format": format_reward, "exact_match": exact_match_reward}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a function available under ``name`` in ``grpo.reward_funcs``."""
    def add(fn: RewardFn) -> RewardFn:
        REWARD_FUNCTIONS[name] = fn
        return fn
    return add


# Module paths written in configs before the objectives moved into ``qlora_jax/objectives/``.
_MOVED_MODULES = {"qlora_jax.rewards": "qlora_jax.objectives.rewards"}


def _import_attr(module_name: str, attr: str, spec: str) -> RewardFn:
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise RewardError(f"reward function {spec!r}: file {path} not found")
            mod_spec = importlib.util.spec_from_file_location(f"_qlora_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(_MOVED_MODULES.get(module_name, module_name))
    except ImportError as err:
        raise RewardError(f"reward function {spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {module_name}.{attr} is not callable")
    return fn


def resolve_reward(spec: str) -> RewardFn:
    """A built-in or registered name, ``module:function``, ``module.function`` or ``file.py:function``."""
    spec = spec.strip()
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    if ":" in spec:
        module_name, attr = spec.rsplit(":", 1)
    elif "." in spec:
        module_name, attr = spec.rsplit(".", 1)
    else:
        raise RewardError(f"unknown reward function {spec!r}: built-ins are {', '.join(sorted(REWARD_FUNCTIONS))}; "
                          "a user function is named 'package.module:function'")
    if not module_name or not attr:
        raise RewardError(f"reward function {spec!r}: expected 'package.module:function'")
    return _import_attr(module_name, attr, spec)


def parse_reward_specs(specs: str | Sequence[str]) -> list[str]:
    """``"format, exact_match"`` or a list -> the non-empty names."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    names = [s.strip() for s in items if str(s).strip()]
    if not names:
        raise RewardError("no reward function given")
    return names


def compute_rewards(fns: Sequence[tuple[str, RewardFn]], prompts: Sequence[Any], completions: Sequence[str],
                    columns: dict[str, Sequence[Any]] | None = None) -> np.ndarray:
    """float32 ``[rows, len(fns)]``; ``None`` from a function becomes NaN."""
    columns = dict(columns or {})
    out = np.full((len(completions), len(fns)), np.nan, np.float32)
    for j, (name, fn) in enumerate(fns):
        values = fn(prompts=list(prompts), completions=list(completions), **columns)
        values = list(values)
        if len(values) != len(completions):
            raise RewardError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                              "completions")
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                out[i, j] = float(v)
            except (TypeError, ValueError) as err:
                raise RewardError(f"reward function {name!r} returned {v!r} (row {i}); expected a number or None") \
                    from err
    return out


__all__ = [
    "REWARD_FUNCTIONS", "SEPARATOR", "RewardError", "compute_rewards", "exact_match_reward", "format_reward",
    "normalize_answer", "parse_reward_specs", "register_reward", "resolve_reward", "split_reasoning_answer",
]

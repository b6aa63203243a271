"""Retrieval-augmented prompts: the top-k passages put into a template.

Templates are plain ``str.format`` strings with two fields:

* ``{context}``: the passages, one per paragraph, most relevant *last* (nearest the question,
  where a small model attends most), each on its own line;
* ``{question}`` (chat) or ``{prompt}`` (MCQA: the whole harness prompt, header and options).
"""

from __future__ import annotations

from collections.abc import Sequence

from qlora_jax.rag.errors import RagError

CHAT_TEMPLATE = ("Answer the question using the background passages when they are relevant.\n\n"
                 "Background:\n{context}\n\nQuestion: {question}")
MCQA_TEMPLATE = "Background:\n{context}\n\n{prompt}"


def format_context(passages: Sequence[str]) -> str:
    """The passages (given best first) as a block, best last, whitespace inside each collapsed."""
    return "\n".join(" ".join(p.split()) for p in reversed(list(passages)))


def fill(template: str, *, context: str, **fields: str) -> str:
    """``template.format(context=..., **fields)`` with an error that names the bad field."""
    try:
        return template.format(context=context, **fields)
    except (KeyError, IndexError) as err:
        raise RagError(f"rag template: unknown field {err} in {template!r}; "
                       f"use {{context}} and {', '.join('{' + f + '}' for f in fields)}") from None


def check_template(template: str, *fields: str) -> None:
    """Raise unless ``template`` uses ``{context}`` and each of ``fields`` and nothing else."""
    probe = fill(template, context="\0context\0", **{f: f"\0{f}\0" for f in fields})
    missing = [f for f in ("context", *fields) if f"\0{f}\0" not in probe]
    if missing:
        raise RagError(f"rag template {template!r} does not use {missing}")


def chat_prompt(question: str, passages: Sequence[str], template: str = CHAT_TEMPLATE) -> str:
    """The user message for a chat question with retrieved passages (the question alone without)."""
    if not passages:
        return question
    return fill(template, context=format_context(passages), question=question)


def mcqa_prompt(prompt: str, passages: Sequence[str], template: str = MCQA_TEMPLATE) -> str:
    """The harness prompt with retrieved passages before it (unchanged without)."""
    if not passages:
        return prompt
    return fill(template, context=format_context(passages), prompt=prompt)

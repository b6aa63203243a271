"""Documents -> overlapping chunks of whole sentences, each short enough for the embedder.

A text is cut into *units*: its lines, and the sentences within a line (a break after ``.``,
``!`` or ``?`` followed by white space). Units are packed greedily into chunks of at most
``chunk_words`` words; the next chunk starts with the previous chunk's last units worth at
most ``overlap_words`` words, so a fact cut at a boundary is whole in one of the two. A single
unit longer than ``chunk_words`` is cut into word windows. Chunk text is the source slice from
its first to its last unit (line breaks kept). With the defaults (80 words, ~110 tokens) a chunk
stays well below all-MiniLM-L6-v2's 256-token truncation for ordinary English prose, and a
few of them still make a short prompt for a small model on a CPU.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from qlora_jax.rag.errors import RagError
from qlora_jax.rag.loaders import Document

_UNIT = re.compile(r"[^\n]+?(?:[.!?](?=\s)|$)", re.MULTILINE)  # a sentence, or the rest of a line
_WORD = re.compile(r"\S+")
CHUNK_WORDS = 80  # default words per chunk, at most
OVERLAP_WORDS = 20  # default words shared by neighbouring chunks, at most


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A passage of a document: what is embedded, retrieved and shown."""

    text: str
    source: str
    line: int  # line of the source where the chunk starts
    page: int | None = None

    @property
    def location(self) -> str:
        """``source, page 2`` or ``source:14``, for display."""
        return f"{self.source}, page {self.page}" if self.page is not None else f"{self.source}:{self.line}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _units(text: str) -> list[tuple[int, int, int]]:
    """(start, end, words) of each sentence or line piece with at least one word."""
    units = []
    for m in _UNIT.finditer(text):
        words = len(_WORD.findall(m.group()))
        if words:
            start = m.start() + len(m.group()) - len(m.group().lstrip())
            units.append((start, m.end(), words))
    return units


def _split_long(text: str, start: int, end: int, chunk_words: int, overlap_words: int) -> list[tuple[int, int, int]]:
    """Word windows over one over-long unit."""
    words = [(m.start() + start, m.end() + start) for m in _WORD.finditer(text[start:end])]
    step = max(1, chunk_words - overlap_words)
    out = []
    for lo in range(0, len(words), step):
        window = words[lo:lo + chunk_words]
        out.append((window[0][0], window[-1][1], len(window)))
        if lo + chunk_words >= len(words):
            break
    return out


def chunk_spans(text: str, chunk_words: int = CHUNK_WORDS, overlap_words: int = OVERLAP_WORDS) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the chunks of ``text``, in order."""
    if chunk_words < 1:
        raise RagError(f"chunk_words must be >= 1, got {chunk_words}")
    if not 0 <= overlap_words < chunk_words:
        raise RagError(f"overlap_words must be in [0, chunk_words), got {overlap_words} (chunk_words {chunk_words})")
    units = []
    for start, end, words in _units(text):
        units.extend(_split_long(text, start, end, chunk_words, overlap_words) if words > chunk_words
                     else [(start, end, words)])
    spans: list[tuple[int, int]] = []
    current: list[tuple[int, int, int]] = []
    for unit in units:
        if current and sum(u[2] for u in current) + unit[2] > chunk_words:
            spans.append((current[0][0], current[-1][1]))
            carried: list[tuple[int, int, int]] = []  # the tail of the chunk just closed
            for u in reversed(current):
                if sum(c[2] for c in carried) + u[2] > overlap_words or \
                        sum(c[2] for c in carried) + u[2] + unit[2] > chunk_words:
                    break
                carried.insert(0, u)
            current = carried
        current.append(unit)
    if current:
        spans.append((current[0][0], current[-1][1]))
    return spans


def chunk_documents(docs: Sequence[Document], chunk_words: int = CHUNK_WORDS,
                    overlap_words: int = OVERLAP_WORDS) -> list[Chunk]:
    """The chunks of every document, each labelled with its source line (or PDF page)."""
    chunks = []
    for doc in docs:
        for start, end in chunk_spans(doc.text, chunk_words, overlap_words):
            line = doc.line + doc.text.count("\n", 0, start)
            chunks.append(Chunk(doc.text[start:end], doc.source, line, doc.page))
    return chunks

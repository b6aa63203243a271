"""Corpus files -> :class:`Document` s: plain text / Markdown, JSONL records, PDF pages.

    load_corpus(["data/rag_corpus"])          # a directory is read recursively, in sorted order
    documents_from_bytes("notes.pdf", data)   # an upload

* ``.txt``, ``.md``, ``.rst``: one document per file (UTF-8).
* ``.jsonl``: one document per line, an object with a ``text`` (or ``content``) string and an
  optional ``title``, which is put on the text's first line.
* ``.pdf``: one document per page with text, read with pypdf.

Every error is a :class:`~qlora_jax.rag.errors.RagError` naming the file (and line or page):
a missing path, an unsupported type, a file over the size limit, invalid UTF-8, a bad JSONL
line, an unreadable or encrypted PDF, or a corpus with no text at all. Nothing is read lazily,
so a caller that catches the error has changed nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from qlora_jax.rag.errors import RagError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".pdf")
DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # per file


@dataclasses.dataclass(frozen=True)
class Document:
    """A unit of source text: a text file, one JSONL record or one PDF page."""

    text: str
    source: str  # file path or upload name
    line: int = 1  # line of the source where ``text`` starts (JSONL: the record's line)
    page: int | None = None  # 1-based PDF page


def format_size(n: int) -> str:
    """``1.5 MiB`` / ``64 KiB`` / ``12 bytes``."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if max_bytes and size > max_bytes:
        raise RagError(f"{name}: {format_size(size)} is over the {format_size(max_bytes)} limit per file")


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise RagError(f"{name}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _text_documents(name: str, data: bytes) -> list[Document]:
    text = _decode(name, data)
    return [Document(text, name)] if text.strip() else []


def _jsonl_documents(name: str, data: bytes) -> list[Document]:
    docs = []
    for n, line in enumerate(_decode(name, data).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RagError(f"{name}:{n}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise RagError(f"{name}:{n}: expected an object with a 'text' field, got {type(row).__name__}")
        field = "text" if "text" in row else "content" if "content" in row else None
        if field is None or not isinstance(row[field], str):
            raise RagError(f"{name}:{n}: needs a 'text' (or 'content') string field (have {sorted(row)})")
        title = row.get("title")
        text = (f"{title}\n" if isinstance(title, str) and title.strip() else "") + row[field]
        if text.strip():
            docs.append(Document(text, name, line=n))
    return docs


def _pdf_documents(name: str, data: bytes) -> list[Document]:
    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise RagError(f"{name}: the PDF is encrypted; decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except RagError:
        raise
    except Exception as err:  # pypdf raises several types (PdfReadError, ValueError, KeyError, ...)
        raise RagError(f"{name}: not a readable PDF ({type(err).__name__}: {err})") from None
    docs = [Document(text, name, page=i) for i, text in enumerate(pages, 1) if text.strip()]
    if not docs:
        raise RagError(f"{name}: no extractable text in {len(pages)} page(s) (a scan needs OCR first)")
    return docs


def documents_from_bytes(name: str, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Document]:
    """The documents of one file's contents; ``name``'s suffix says how to read it."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise RagError(f"{name}: unsupported file type {suffix or '(none)'!r}; expected one of {list(SUFFIXES)}")
    _check_size(name, len(data), max_bytes)
    if suffix == ".pdf":
        return _pdf_documents(name, data)
    if suffix == ".jsonl":
        return _jsonl_documents(name, data)
    return _text_documents(name, data)


def corpus_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files named, with directories expanded (recursively, sorted, supported types only)."""
    files = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not found:
                raise RagError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise RagError(f"{path}: no such file or directory")
    return files


def load_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                max_bytes: int = DEFAULT_MAX_BYTES) -> list[Document]:
    """Every document of the files and directories in ``paths``; raises when there is no text."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = corpus_files(paths)
    if not files:
        raise RagError("empty corpus: no files given")
    docs = []
    for f in files:
        _check_size(str(f), f.stat().st_size, max_bytes)
        docs.extend(documents_from_bytes(str(f), f.read_bytes(), max_bytes=max_bytes))
    if not docs:
        raise RagError(f"empty corpus: no text in {', '.join(map(str, files))}")
    return docs

"""A vector index of corpus chunks: all-MiniLM-L6-v2 embeddings in a faiss ``IndexFlatIP``.

    index = RagIndex.build(["data/rag_corpus"])        # load, chunk, embed, index
    hits = index.search("What is the SI unit of force?", k=3)   # best first
    index.save("runs/rag_index"); RagIndex.load("runs/rag_index")

Embeddings are unit length, so the inner product is the cosine similarity and the flat index
is an exact search (``tests/test_rag.py`` checks it against a brute-force numpy top-k).

**On disk** (a directory): ``manifest.json`` names the current ``index-<version>.faiss`` and
``chunks-<version>.jsonl`` (one chunk record per line, row ``i`` = vector ``i``) and records the
embedder, chunking settings and counts. :meth:`save` writes the new data files under the next
version, then replaces ``manifest.json`` atomically (temporary file + ``os.replace``), then
deletes the previous version's files; a reader or a crash sees either the old or the new index,
never a mix. :meth:`add_documents` embeds everything before touching the index, so a failed add
(an unreadable PDF, no text) leaves it -- in memory and on disk -- as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qlora_jax.embed import default_embedder
from qlora_jax.rag.chunking import CHUNK_WORDS, OVERLAP_WORDS, Chunk, chunk_documents, chunk_spans
from qlora_jax.rag.errors import RagError
from qlora_jax.rag.loaders import DEFAULT_MAX_BYTES, Document, documents_from_bytes, load_corpus

FORMAT = "qlora_jax.rag/1"
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # cosine similarity to the query
    rank: int  # 1 = best

    def to_json(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 4), "location": self.chunk.location,
                **self.chunk.to_json()}


class RagIndex:
    """Chunks and their embeddings in a faiss flat inner-product index.

    ``embedder``: an :class:`~qlora_jax.embed.Embedder` (default: the shared packaged model);
    ``chunk_words`` / ``overlap_words``: see :mod:`qlora_jax.rag.chunking`. Thread-safe: adds and
    searches take a lock.
    """

    def __init__(self, embedder=None, *, chunk_words: int = CHUNK_WORDS, overlap_words: int = OVERLAP_WORDS):
        import faiss

        if embedder is None:

            embedder = default_embedder()
        self.embedder = embedder
        self.chunk_words, self.overlap_words = int(chunk_words), int(overlap_words)
        chunk_spans("", self.chunk_words, self.overlap_words)  # validates the two settings
        self.chunks: list[Chunk] = []
        self.faiss = faiss.IndexFlatIP(embedder.dim)
        self.version = 0  # of the files on disk this index was loaded from or saved as
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def sources(self) -> dict[str, int]:
        """Chunks per source file, in the order first added."""
        out: dict[str, int] = {}
        for c in self.chunks:
            out[c.source] = out.get(c.source, 0) + 1
        return out

    def copy(self) -> RagIndex:
        """An independent copy (same embedder): add to it, then swap it in."""
        import faiss

        with self._lock:
            other = RagIndex(self.embedder, chunk_words=self.chunk_words, overlap_words=self.overlap_words)
            other.chunks, other.faiss, other.version = list(self.chunks), faiss.clone_index(self.faiss), self.version
        return other

    # -- adding ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], embedder=None, *,
              chunk_words: int = CHUNK_WORDS, overlap_words: int = OVERLAP_WORDS, max_bytes: int = DEFAULT_MAX_BYTES,
              progress: bool = False) -> RagIndex:
        """An index of every file under ``paths`` (files or directories)."""
        index = cls(embedder, chunk_words=chunk_words, overlap_words=overlap_words)
        index.add_documents(load_corpus(paths, max_bytes=max_bytes), progress=progress)
        return index

    def add_documents(self, docs: Sequence[Document], *, progress: bool = False) -> int:
        """Chunk, embed and add ``docs``; returns the number of chunks added. Raises
        :class:`RagError` (index unchanged) when they hold no text."""
        chunks = chunk_documents(docs, self.chunk_words, self.overlap_words)
        if not chunks:
            names = sorted({d.source for d in docs})
            raise RagError(f"no text to index in {', '.join(names) if names else 'the documents given'}")
        vectors = self.embedder.encode([c.text for c in chunks], progress="embedding chunks" if progress else False)
        with self._lock:
            self.faiss.add(np.ascontiguousarray(vectors, np.float32))
            self.chunks.extend(chunks)
        return len(chunks)

    def add_paths(self, paths, *, max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = False) -> int:
        return self.add_documents(load_corpus(paths, max_bytes=max_bytes), progress=progress)

    def add_bytes(self, name: str, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
        """Add an uploaded file's contents (type from ``name``'s suffix)."""
        docs = documents_from_bytes(name, data, max_bytes=max_bytes)
        if not docs:
            raise RagError(f"{name}: the file has no text to index")
        return self.add_documents(docs)

    # -- searching ------------------------------------------------------------------------------
    def search(self, queries: str | Sequence[str], k: int = 3) -> list[Hit] | list[list[Hit]]:
        """The ``k`` chunks most similar to each query, best first (a list per query when given
        a list). Raises :class:`RagError` when the index is empty."""
        single = isinstance(queries, str)
        queries = [queries] if single else list(queries)
        if k < 1:
            raise RagError(f"top_k must be >= 1, got {k}")
        with self._lock:
            if not self.chunks:
                raise RagError("the retrieval index is empty: add documents first (upload a file, or pass a "
                               "corpus: python -m qlora_jax.rag build --corpus DIR --index OUT)")
            vectors = self.embedder.encode(queries) if queries else np.zeros((0, self.embedder.dim), np.float32)
            scores, ids = self.faiss.search(np.ascontiguousarray(vectors, np.float32), min(k, len(self.chunks)))
            chunks = list(self.chunks)
        out = [[Hit(chunks[i], float(s), r) for r, (s, i) in enumerate(zip(row_s, row_i), 1) if i >= 0]
               for row_s, row_i in zip(scores, ids)]
        return out[0] if single else out

    def vectors(self) -> np.ndarray:
        """All stored embeddings ``[len(self), dim]`` (row i = chunk i)."""
        with self._lock:
            return self.faiss.reconstruct_n(0, self.faiss.ntotal) if self.faiss.ntotal else \
                np.zeros((0, self.embedder.dim), np.float32)

    # -- disk -----------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {"format": FORMAT, "embedder": getattr(self.embedder, "name", type(self.embedder).__name__),
                "dim": int(self.embedder.dim), "chunk_words": self.chunk_words, "overlap_words": self.overlap_words,
                "count": len(self.chunks), "version": self.version,
                "index_file": f"index-{self.version:06d}.faiss", "chunks_file": f"chunks-{self.version:06d}.jsonl",
                "sources": self.sources}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` as its next version (see the module doc)."""
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            previous = _read_manifest(directory) if (directory / MANIFEST).is_file() else None
            self.version = max(self.version, previous["version"] if previous else 0) + 1
            manifest = self.manifest()
            _atomic_write(directory / manifest["chunks_file"],
                          "".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in self.chunks).encode())
            _atomic_write(directory / manifest["index_file"], faiss.serialize_index(self.faiss).tobytes())
            _atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        for f in directory.glob("*-*.*"):  # the files of older versions
            if f.name not in (manifest["chunks_file"], manifest["index_file"]) and \
                    f.name.startswith(("index-", "chunks-")):
                f.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, embedder=None) -> RagIndex:
        """The index saved in ``directory``; checks the embedder and that counts agree."""
        import faiss

        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise RagError(f"{directory}: no retrieval index here (no {MANIFEST}); build one with "
                           f"python -m qlora_jax.rag build --corpus DIR --index {directory}")
        m = _read_manifest(directory)
        index = cls(embedder, chunk_words=m["chunk_words"], overlap_words=m["overlap_words"])
        want = getattr(index.embedder, "name", type(index.embedder).__name__)
        if m["embedder"] != want or m["dim"] != index.embedder.dim:
            raise RagError(f"{directory / MANIFEST}: built with {m['embedder']} (dim {m['dim']}), "
                           f"but the embedder is {want} (dim {index.embedder.dim}); rebuild the index")
        try:
            raw = np.frombuffer((directory / m["index_file"]).read_bytes(), np.uint8)
            index.faiss = faiss.deserialize_index(raw)
            lines = (directory / m["chunks_file"]).read_text(encoding="utf-8").splitlines()
            index.chunks = [Chunk(**json.loads(line)) for line in lines if line.strip()]
        except (OSError, RuntimeError, ValueError, TypeError) as err:
            raise RagError(f"{directory}: index files unreadable ({err}); rebuild the index") from None
        if not (len(index.chunks) == index.faiss.ntotal == m["count"]) or index.faiss.d != m["dim"]:
            raise RagError(f"{directory}: {len(index.chunks)} chunks, {index.faiss.ntotal} vectors, manifest "
                           f"says {m['count']}: the index is inconsistent; rebuild it")
        index.version = m["version"]
        return index


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RagError(f"{path}: unreadable ({err})") from None
    if m.get("format") != FORMAT:
        raise RagError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""Retrieval: corpus files -> chunks -> all-MiniLM-L6-v2 embeddings -> a faiss index -> prompts.

    python -m qlora_jax.rag build --corpus data/rag_corpus --index runs/rag_index
    python -m qlora_jax.rag query --index runs/rag_index "What is the SI unit of force?"

    loaders.py   text / Markdown / JSONL / PDF files (or uploaded bytes) -> Documents
    chunking.py  Documents -> overlapping sentence-aligned Chunks
    index.py     RagIndex: embed, add, exact inner-product search, atomic save / load
    prompt.py    retrieved passages -> chat and MCQA prompt templates
"""

from qlora_jax.rag.chunking import Chunk, chunk_documents, chunk_spans
from qlora_jax.rag.errors import RagError
from qlora_jax.rag.index import Hit, RagIndex
from qlora_jax.rag.loaders import SUFFIXES, Document, documents_from_bytes, load_corpus
from qlora_jax.rag.prompt import CHAT_TEMPLATE, MCQA_TEMPLATE, chat_prompt, format_context, mcqa_prompt

__all__ = [
    "CHAT_TEMPLATE", "MCQA_TEMPLATE", "SUFFIXES", "Chunk", "Document", "Hit", "RagError", "RagIndex",
    "chat_prompt", "chunk_documents", "chunk_spans", "documents_from_bytes", "format_context",
    "load_corpus", "mcqa_prompt",
]

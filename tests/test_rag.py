"""Retrieval: our JAX all-MiniLM-L6-v2 against sentence-transformers, chunking, loaders (text,
JSONL, PDF), the faiss index against a brute-force numpy top-k, atomic save/load, bad input, and
retrieval-augmented MCQA prompts scored against transformers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from _support import require

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlora_jax.embed import Embedder, default_embedder, minilm_dir  # noqa: E402
from qlora_jax.rag import (  # noqa: E402
    MCQA_TEMPLATE,
    Document,
    RagError,
    RagIndex,
    chunk_documents,
    chunk_spans,
    documents_from_bytes,
    format_context,
    load_corpus,
    mcqa_prompt,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data/rag_corpus"

TEXTS = [
    "What is the SI unit of force?",
    "The newton is the SI unit of force.",
    "Mitochondria are the powerhouse of the cell.",
    "Café naïve résumé, 東京 and ümlauts: tokenizer normalization.",
    "x",
    "",
    "A long passage that the model has to truncate. " * 60,  # > 256 word pieces
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return default_embedder()


def make_pdf(path: Path, pages: list[str]) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=A4)
    for text in pages:
        y = 800
        for line in text.split("\n"):
            c.drawString(72, y, line)
            y -= 16
        c.showPage()
    c.save()
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Embeddings

def test_embeddings_match_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    want = reference.encode(TEXTS, batch_size=3, convert_to_numpy=True)  # its pipeline ends in Normalize
    got = embedder.encode(TEXTS, batch_size=4)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert len(embedder.tokenize([TEXTS[-1]])[0]) == reference.max_seq_length == 256
    # order and batch composition do not matter (sorted by length, padded to buckets)
    np.testing.assert_allclose(embedder.encode(TEXTS[::-1], batch_size=2)[::-1], got, atol=1e-5)


def test_embedder_bad_input(tmp_path):
    from qlora_jax.embed import EmbedError

    with pytest.raises(TypeError, match="list of strings"):
        default_embedder().encode(["ok", 3])
    assert default_embedder().encode([]).shape == (0, 384)
    with pytest.raises(EmbedError, match="max_seq_length"):
        Embedder(max_seq_length=4096)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(EmbedError, match="BERT"):
        Embedder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Chunking and loaders

@pytest.mark.parametrize("chunk_words,overlap_words", [(12, 4), (30, 0), (80, 20)])
def test_chunks_cover_the_text_in_order(chunk_words, overlap_words):
    """Each chunk is a run of consecutive words (by position in the text), at most chunk_words
    long; consecutive chunks leave no gap and share at most overlap_words words."""
    import re

    text = (CORPUS / "physics.md").read_text() + "\n" + " ".join(f"w{i}" for i in range(100)) + ".\n"
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    spans = chunk_spans(text, chunk_words, overlap_words)
    runs = []
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(words) if a >= start and b <= end]
        assert inside == list(range(inside[0], inside[-1] + 1)) and 1 <= len(inside) <= chunk_words
        assert (words[inside[0]][0], words[inside[-1]][1]) == (start, end)  # cut at word boundaries
        runs.append((inside[0], inside[-1]))
    assert runs[0][0] == 0 and runs[-1][1] == len(words) - 1
    for (first0, last0), (first1, last1) in zip(runs, runs[1:]):
        assert first0 < first1 <= last0 + 1 and last1 > last0
        assert last0 - first1 + 1 <= overlap_words


def test_chunk_locations_and_bad_settings():
    docs = [Document("first line.\n\nsecond para here.\nthird", "a.md", line=10)]
    chunks = chunk_documents(docs, chunk_words=2, overlap_words=0)
    # "second para here." is longer than a chunk: cut into word windows; "third" fits beside "here."
    assert [(c.text, c.line) for c in chunks] == [("first line.", 10), ("second para", 12), ("here.\nthird", 12)]
    assert chunks[0].location == "a.md:10"
    with pytest.raises(RagError, match="overlap_words"):
        chunk_spans("x", 5, 5)
    with pytest.raises(RagError, match="chunk_words"):
        chunk_spans("x", 0, 0)


def test_loaders_text_jsonl_pdf(tmp_path):
    (tmp_path / "notes.md").write_text("# Title\nThe quokka lives on Rottnest Island.\n")
    (tmp_path / "facts.jsonl").write_text('{"title": "Otters", "text": "Sea otters hold hands."}\n\n'
                                          '{"content": "Axolotls regrow limbs."}\n')
    make_pdf(tmp_path / "paper.pdf", ["Page one talks about glaciers.", "Page two covers volcanoes."])
    (tmp_path / "ignored.csv").write_text("a,b\n")
    docs = load_corpus(tmp_path)
    assert [(Path(d.source).name, d.line, d.page) for d in docs] == [
        ("facts.jsonl", 1, None), ("facts.jsonl", 3, None), ("notes.md", 1, None), ("paper.pdf", 1, 1),
        ("paper.pdf", 1, 2)]
    assert docs[0].text == "Otters\nSea otters hold hands." and "volcanoes" in docs[4].text
    chunks = chunk_documents(docs)
    assert [c.location.split("/")[-1] for c in chunks][-2:] == ["paper.pdf, page 1", "paper.pdf, page 2"]


def test_loader_errors_name_the_file(tmp_path):
    with pytest.raises(RagError, match="no such file"):
        load_corpus(tmp_path / "missing")
    with pytest.raises(RagError, match=r"no \.txt/.*files in this directory"):
        load_corpus(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(RagError, match="empty corpus: no text in .*empty.txt"):
        load_corpus(tmp_path)
    with pytest.raises(RagError, match=r"bad.jsonl:2: not valid JSON"):
        documents_from_bytes("bad.jsonl", b'{"text": "ok"}\n{oops\n')
    with pytest.raises(RagError, match=r"bad.jsonl:1: needs a 'text'"):
        documents_from_bytes("bad.jsonl", b'{"body": "x"}\n')
    with pytest.raises(RagError, match=r"latin.txt:2: not UTF-8"):
        documents_from_bytes("latin.txt", "ok\ncaf\xe9".encode("latin-1"))
    with pytest.raises(RagError, match=r"unsupported file type '.docx'"):
        documents_from_bytes("report.docx", b"PK")
    with pytest.raises(RagError, match=r"big.txt: 2.0 MiB is over the 1.0 MiB limit"):
        documents_from_bytes("big.txt", b"a" * (2 * 2**20), max_bytes=2**20)
    with pytest.raises(RagError, match=r"broken.pdf: not a readable PDF"):
        documents_from_bytes("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage")
    blank = make_pdf(tmp_path / "blank.pdf", ["", ""])
    with pytest.raises(RagError, match=r"blank.pdf: no extractable text in 2 page"):
        documents_from_bytes("blank.pdf", blank)


# ---------------------------------------------------------------------------------------------
# The index

@pytest.fixture(scope="module")
def corpus_index(embedder) -> RagIndex:
    return RagIndex.build([CORPUS], embedder)


def test_search_equals_brute_force_top_k(corpus_index, embedder):
    queries = ["What is the SI unit of force?", "Which planet is the Red Planet?", "binary digits",
               "how do plants make food", "a question about nothing in particular"]
    chunk_vectors = embedder.encode([c.text for c in corpus_index.chunks])
    np.testing.assert_allclose(corpus_index.vectors(), chunk_vectors, atol=1e-6)
    sims = embedder.encode(queries) @ chunk_vectors.T  # [queries, chunks]
    k = 4
    for q, hits in enumerate(corpus_index.search(queries, k=k)):
        want = np.argsort(-sims[q], kind="stable")[:k]
        assert [corpus_index.chunks.index(h.chunk) for h in hits] == list(want)
        np.testing.assert_allclose([h.score for h in hits], sims[q][want], atol=1e-5)
        assert [h.rank for h in hits] == [1, 2, 3, 4]
    # more than there is: every chunk once
    assert len(corpus_index.search("x", k=10_000)) == len(corpus_index)


def test_save_load_add_and_failed_add_leaves_disk_unchanged(tmp_path, embedder):
    (tmp_path / "a.txt").write_text("Kelp forests grow along cold rocky coasts.\n")
    index = RagIndex.build([tmp_path / "a.txt"], embedder)
    where = tmp_path / "index"
    index.save(where)
    loaded = RagIndex.load(where, embedder)
    assert loaded.chunks == index.chunks and loaded.version == 1
    np.testing.assert_array_equal(loaded.vectors(), index.vectors())

    added = loaded.add_bytes("b.md", b"Tardigrades survive in space.\n\nThey are also called water bears.")
    loaded.save(where)
    assert sorted(p.name for p in where.iterdir()) == ["chunks-000002.jsonl", "index-000002.faiss", "manifest.json"]
    again = RagIndex.load(where, embedder)
    assert len(again) == len(index) + added and again.version == 2
    assert again.search("water bears", k=1)[0].chunk.source == "b.md"

    before = {p.name: p.read_bytes() for p in where.iterdir()}
    for name, data in [("broken.pdf", b"%PDF-1.7 not really"), ("empty.txt", b"\n \n")]:
        with pytest.raises(RagError, match=name):
            again.add_bytes(name, data)
        assert len(again) == len(index) + added and again.faiss.ntotal == len(again)
    assert {p.name: p.read_bytes() for p in where.iterdir()} == before


def test_index_errors(tmp_path, embedder):
    empty = RagIndex(embedder)
    with pytest.raises(RagError, match="the retrieval index is empty: add documents first"):
        empty.search("anything")
    with pytest.raises(RagError, match="no retrieval index here"):
        RagIndex.load(tmp_path / "nowhere", embedder)
    with pytest.raises(RagError, match="empty corpus"):
        RagIndex.build([], embedder)
    index = RagIndex.build([CORPUS / "mathematics.md"], embedder)
    index.save(tmp_path / "ix")
    manifest = json.loads((tmp_path / "ix/manifest.json").read_text())
    manifest["count"] += 1
    (tmp_path / "ix/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RagError, match="inconsistent"):
        RagIndex.load(tmp_path / "ix", embedder)
    with pytest.raises(RagError, match="top_k"):
        index.search("x", k=0)


def test_cli_build_add_query(tmp_path, capsys):
    from qlora_jax.cli.rag import main

    (tmp_path / "extra.txt").write_text("The okapi is a relative of the giraffe.\n")
    assert main(["build", "--corpus", str(CORPUS), "--index", str(tmp_path / "ix")]) == 0
    n = json.loads((tmp_path / "ix/manifest.json").read_text())["count"]
    assert main(["add", "--index", str(tmp_path / "ix"), str(tmp_path / "extra.txt")]) == 0
    assert json.loads((tmp_path / "ix/manifest.json").read_text())["count"] == n + 1
    assert main(["query", "--index", str(tmp_path / "ix"), "--top-k", "1", "relative of the giraffe"]) == 0
    assert "extra.txt:1: The okapi" in capsys.readouterr().out
    assert main(["query", "--index", str(tmp_path / "none"), "q"]) == 2
    assert "no retrieval index here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Retrieval-augmented MCQA

def test_shipped_corpus_covers_the_mcqa_set(corpus_index, tmp_path):
    """What the README says: over ``data/rag_corpus``, the top-2 passages contain the gold option's
    text (a word-boundary match) for all 56 questions of ``data/mcqa_demo.jsonl``, and the record
    ``evaluate`` writes per question says so."""
    from configs import eval_mcqa
    from qlora_jax.inference.evaluate import load_mcqa, retrieve_passages

    items = load_mcqa(REPO / "data/mcqa_demo.jsonl")
    assert len(items) == 56
    corpus = " ".join(" ".join(c.text.split()) for c in corpus_index.chunks).lower()
    assert all(it.choices[it.answer].lower() in corpus for it in items)  # every gold option is stated

    def mentions(text: str, answer: str) -> bool:  # whole words, any line breaks inside the option
        return re.search(r"(?<!\w)" + re.escape(answer.lower()) + r"(?!\w)", " ".join(text.split()).lower()) is not None

    hits = corpus_index.search([it.question for it in items], k=2)
    missed = [it.question for it, row in zip(items, hits) if not any(mentions(h.chunk.text, it.choices[it.answer])
                                                                     for h in row)]
    assert missed == []  # 56 of 56

    rag = eval_mcqa.get_config().rag  # the README's settings: top 2, 80-word chunks, 20 overlapping
    assert (rag.top_k, rag.chunk_words, rag.overlap_words) == (2, 80, 20)
    corpus_index.save(tmp_path / "ix")
    rag.index = str(tmp_path / "ix")
    passages, record = retrieve_passages(rag, items)
    assert passages == [[h.chunk.text for h in row] for row in hits]
    assert record["gold_in_passages"] == 1.0 and len(record["retrieved"]) == 56
    assert all(r["gold_in_passages"] for r in record["retrieved"])


def test_rag_prompts_scored_as_transformers_scores_them(tmp_path, corpus_index):
    """``evaluate.run`` with ``rag.enabled``: each question's prompt is the harness prompt after
    its top-k passages, and the option log-likelihoods equal transformers' on that text."""
    torch = require("torch")
    transformers = require("transformers")
    import _smollm2 as smol

    from configs import eval_mcqa
    from qlora_jax.inference.evaluate import format_prompt, load_mcqa, run

    tok = smol.tokenizer()
    cfg_t = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                     tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(cfg_t, attn_implementation="eager").eval()
    with torch.no_grad():
        reference.model.embed_tokens.weight.mul_(20.0)
    reference.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    corpus_index.save(tmp_path / "ix")

    cfg = eval_mcqa.get_config()
    cfg.model.source, cfg.model.quantize = str(tmp_path / "tiny"), "none"
    cfg.data.max_questions = 3
    cfg.rag.enabled, cfg.rag.index, cfg.rag.top_k = True, str(tmp_path / "ix"), 2
    cfg.output = str(tmp_path / "rag.json")
    out = run(cfg)

    items = load_mcqa(REPO / "data/mcqa_demo.jsonl")[:3]
    for item, q in zip(items, out["questions"]):
        passages = [h.chunk.text for h in corpus_index.search(item.question, k=2)]
        prompt = "Background:\n" + "\n".join(" ".join(p.split()) for p in passages[::-1]) + "\n\n" + \
            format_prompt(item)
        assert mcqa_prompt(format_prompt(item), passages, MCQA_TEMPLATE) == prompt
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1].double(), -1)
        for letter in "ABCD":
            want = float(logprobs[tok(" " + letter, add_special_tokens=False)["input_ids"][0]])
            assert abs(q["logprobs"][letter] - want) < 1e-4
        assert q["retrieved"]["locations"] == [h.chunk.location for h in corpus_index.search(item.question, k=2)]
    assert out["example_prompt"].startswith("Background:\n") and out["rag"]["top_k"] == 2
    assert format_context(["best", "second"]) == "second\nbest"

    cfg.rag.index = str(tmp_path / "missing")
    with pytest.raises(RagError, match="rag.index: .*missing: no retrieval index here"):
        run(cfg)
    cfg.rag.index, cfg.rag.template = str(tmp_path / "ix"), "{context} {question}"
    with pytest.raises(RagError, match="unknown field"):
        run(cfg)

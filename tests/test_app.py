"""The local web app end to end on the real SmolLM2-135M-Instruct: uploads into the retrieval
index, streamed answers equal to the generator's own, bad input, and the page in headless
Chromium (Debian's ``chromium``; skipped only where it is not installed, never in CI)."""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.parse
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _smollm2 as smol  # noqa: E402

from qlora_jax.app import ChatService, make_server  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
MAX_NEW = 8  # tokens per answer: enough to see a stream, short enough for a 2-core CPU
FACT = ("The Zorblat festival is held every March in the mountain town of Quillby, "
        "where people race wooden sledges down the main street.")
QUESTION = "Where is the Zorblat festival held?"
OTHER = "Kelp forests grow in cold, nutrient-rich water along rocky coasts.\n\nSea urchins eat kelp."


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(service, base url, index dir): the app on a free loopback port, no index at first."""
    from qlora_jax.embed import default_embedder
    from qlora_jax.generate import Generator

    index_dir = tmp_path_factory.mktemp("app") / "index"
    service = ChatService(Generator(smol.ours(None), smol.tokenizer()), description="SmolLM2-135M-Instruct (test)",
                          index_dir=index_dir, embedder=default_embedder(), max_upload_bytes=64 * 1024,
                          top_k=1, max_new_tokens=MAX_NEW)
    server = make_server(service, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    yield service, f"http://{host}:{port}", index_dir
    server.shutdown()
    server.server_close()


def request(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def chat(base: str, question: str, **options) -> list[tuple[str, dict]]:
    body = json.dumps({"messages": [{"role": "user", "content": question}], **options}).encode()
    status, raw = request(base, "POST", "/api/chat", body, {"Content-Type": "application/json"})
    assert status == 200
    return events(raw)


def reference_answer(service: ChatService, question: str, passages: list[str]) -> str:
    """What the generator itself answers for the same retrieval-augmented chat (greedy)."""
    from qlora_jax.rag import chat_prompt

    ids = service.generator.chat_prompt([{"role": "user", "content": chat_prompt(question, passages)}])
    return service.generator.generate([ids], max_new_tokens=MAX_NEW).texts[0]


def test_bad_input_before_and_around_the_index(app):
    service, base, index_dir = app
    # a question before any index exists: a clear notice, and still an answer
    ev = chat(base, "What is 2+2?")
    assert ev[0][0] == "passages" and ev[0][1]["hits"] == []
    assert "No documents are indexed yet" in ev[0][1]["notice"]
    assert [e for e, _ in ev][-1] == "done" and "".join(d["text"] for e, d in ev if e == "token")

    # uploads that fail leave no index behind (none in memory, nothing on disk)
    too_big = b"word " * (65 * 1024 // 5)  # 65 KiB
    status, data = request(base, "POST", "/api/upload?name=big.txt", too_big)
    assert status == 413 and json.loads(data)["error"] == "the upload is 65 KiB; the limit is 64 KiB"
    status, data = request(base, "POST", "/api/upload?name=scan.pdf", b"%PDF-1.4\n%%garbage without objects")
    assert status == 400 and "scan.pdf: not a readable PDF" in json.loads(data)["error"]
    status, data = request(base, "POST", "/api/upload?name=empty.md", b"\n\n  \n")
    assert status == 400 and "empty.md: the file has no text" in json.loads(data)["error"]
    status, data = request(base, "POST", "/api/upload?name=x.exe", b"MZ")
    assert status == 400 and "unsupported file type" in json.loads(data)["error"]
    assert service.index is None and not index_dir.exists()

    # requests not addressed to the loopback name are refused; bad chat bodies get a reason
    status, _ = request(base, "GET", "/api/status", headers={"Host": "attacker.example:80"})
    assert status == 403
    status, data = request(base, "POST", "/api/chat", b"[1, 2]", {"Content-Type": "application/json"})
    assert status == 400
    ev = events(request(base, "POST", "/api/chat", json.dumps({"messages": []}).encode())[1])
    assert ev == [("error", {"message": ev[0][1]["message"]})] and "messages must be" in ev[0][1]["message"]


def test_upload_then_streamed_answer_equals_the_generators(app):
    service, base, index_dir = app
    status, data = request(base, "POST", "/api/upload?name=" + urllib.parse.quote("festival notes.txt"),
                           (FACT + "\n\n" + OTHER).encode())
    assert status == 200, data
    reply = json.loads(data)
    assert reply["added"] >= 1 and reply["chunks"] == len(service.index)
    on_disk = sorted(p.name for p in index_dir.iterdir())
    assert "manifest.json" in on_disk

    ev = chat(base, QUESTION, top_k=1)
    kinds = [e for e, _ in ev]
    assert kinds[0] == "passages" and kinds[-1] == "done" and kinds.count("token") >= 2  # streamed
    hit = ev[0][1]["hits"][0]
    assert hit["source"] == "festival notes.txt" and "Quillby" in hit["text"]
    best = service.index.search(QUESTION, k=1)[0]
    assert hit["text"] == best.chunk.text and abs(hit["score"] - best.score) < 1e-3
    answer = "".join(d["text"] for e, d in ev if e == "token")
    assert answer == reference_answer(service, QUESTION, [best.chunk.text])
    assert ev[-1][1]["tokens"] <= MAX_NEW

    # a failed upload leaves the saved index byte for byte as it was
    before = {p.name: p.read_bytes() for p in index_dir.iterdir()}
    status, _ = request(base, "POST", "/api/upload?name=broken.pdf", b"%PDF-1.7\nnot a pdf")
    assert status == 400
    assert {p.name: p.read_bytes() for p in index_dir.iterdir()} == before


def test_page_in_headless_chromium(app, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs Debian's chromium (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    service, base, _ = app
    upload = tmp_path / "kelp.md"
    upload.write_text(OTHER)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.set_default_timeout(180_000)
            expect.set_options(timeout=180_000)
            page.goto(base + "/")
            expect(page.locator("#status")).to_contain_text("chunks")
            assert "SmolLM2-135M-Instruct (test)" in page.text_content("#status")

            page.set_input_files("#file", str(upload))
            page.click("#upload")
            expect(page.locator("#upload-status")).to_contain_text("added")
            assert page.text_content("#upload-status").startswith("kelp.md: added ")

            page.fill("#top-k", "1")
            page.fill("#question", QUESTION)
            page.click("#send")
            page.wait_for_selector(".msg.assistant.complete")
            best = service.index.search(QUESTION, k=1)[0]
            shown = page.text_content("#passages .passage .text")
            assert shown == best.chunk.text and "Quillby" in shown
            assert "festival notes.txt" in page.text_content("#passages .passage .meta")
            answer = page.text_content(".msg.assistant")
            assert answer and answer == reference_answer(service, QUESTION, [best.chunk.text])
            assert int(page.get_attribute(".msg.assistant", "data-chunks")) >= 2  # it arrived as a stream
            assert "tokens in" in page.text_content("#chat-status")
        finally:
            browser.close()

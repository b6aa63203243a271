"""The local web app end to end on the real SmolLM2-135M-Instruct: uploads into the retrieval
index, streamed answers equal to the generator's own, bad input, and the page in headless
Chromium (Debian's ``chromium``; skipped only where it is not installed, never in CI).

The request-handling tests (cross-site writes, truncated and stalled uploads, numeric fields)
drive a running server with raw ``http.client`` requests and sockets on 127.0.0.1; a stub
generator stands in for the model there, since no answer is checked. Every test starts its own
server with an empty index: none depends on another's uploads.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _smollm2 as smol  # noqa: E402

from qlora_jax.inference.app import CLIENT_HEADER, ChatService, make_server  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
MAX_NEW = 8  # tokens per answer: enough to see a stream, short enough for a 2-core CPU
FACT = ("The Zorblat festival is held every March in the mountain town of Quillby, "
        "where people race wooden sledges down the main street.")
QUESTION = "Where is the Zorblat festival held?"
OTHER = "Kelp forests grow in cold, nutrient-rich water along rocky coasts.\n\nSea urchins eat kelp."


@pytest.fixture(scope="module")
def embedder():
    from qlora_jax.embed import default_embedder

    return default_embedder()


@pytest.fixture(scope="module")
def generator():
    """The real model: loaded once per module (~10 s), shared read-only by the tests that answer."""
    from qlora_jax.inference.generate import Generator

    return Generator(smol.ours(None), smol.tokenizer())


class StubGenerator:
    """Stands in for the model where no answer is checked: the prompt is 3 tokens, and it
    "generates" ``max_new_tokens`` tokens of text "x" (so a test sees the value that arrived)."""

    stop_token_ids = (0,)

    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    def chat_prompt(self, messages, system=None):
        return [1, 2, 3]

    def stream(self, prompts, *, max_new_tokens, sampling):
        if self.fail is not None:
            raise self.fail
        for i in range(max_new_tokens):
            yield SimpleNamespace(tokens=[[i + 1]], texts=["x"], finished=[i == max_new_tokens - 1])


def serve(service: ChatService, **server_options):
    """Start ``service`` on a free loopback port; returns (base url, stop function)."""
    server = make_server(service, port=0, **server_options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"

    def stop():
        server.shutdown()
        server.server_close()

    return f"http://{host}:{port}", stop


@pytest.fixture
def app(tmp_path, generator, embedder):
    """(service, base url, index dir): the real model on a free loopback port, no index at first."""
    index_dir = tmp_path / "index"
    service = ChatService(generator, description="SmolLM2-135M-Instruct (test)", index_dir=index_dir,
                          embedder=embedder, max_upload_bytes=64 * 1024, top_k=1, max_new_tokens=MAX_NEW)
    base, stop = serve(service)
    yield service, base, index_dir
    stop()


@pytest.fixture
def stub_app(tmp_path, embedder):
    """(service, base url, index dir): the stub generator, a saved index, a 1 s read timeout."""
    index_dir = tmp_path / "index"
    service = ChatService(StubGenerator(), description="stub", index_dir=index_dir, embedder=embedder,
                          max_upload_bytes=64 * 1024, top_k=1, max_new_tokens=4)
    base, stop = serve(service, read_timeout=1.0)
    yield service, base, index_dir
    stop()


def raw_request(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """``(status, body)`` of one request carrying exactly ``headers`` (plus http.client's Host,
    Accept-Encoding and Content-Length)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def request(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """A request as a script sends it: no Origin or Referer, so it carries the app's client header."""
    return raw_request(base, method, path, body, {CLIENT_HEADER: "1", **(headers or {})})


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


def upload_count(service: ChatService) -> int:
    return 0 if service.index is None else len(service.index.sources)


def test_cross_site_writes_are_refused(stub_app):
    service, base, index_dir = stub_app
    port = urllib.parse.urlsplit(base).port
    own = f"http://127.0.0.1:{port}"
    text = b"Cross-site requests must not write into the index."

    def upload(name, headers):
        status, data = raw_request(base, "POST", f"/api/upload?name={name}", text, headers)
        return status, json.loads(data)

    # the case: a simple (no preflight) cross-site POST from another site's page
    status, reply = upload("evil.txt", {"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert status == 403
    assert reply["error"] == (f"cross-site request refused: Origin 'http://evil.example' is not this app's origin "
                              f"{own}; only the app's own page may change its state")
    for headers in ({"Origin": "null"},  # sandboxed frames, file:// pages
                    {"Origin": f"http://127.0.0.1:{port + 1}"},  # another port is another origin
                    {"Origin": f"https://127.0.0.1:{port}"},
                    {"Origin": f"http://localhost:{port}"},  # the page under the other name: not as served
                    {"Origin": "http://evil.example", CLIENT_HEADER: "1"},  # the header does not override Origin
                    {"Referer": "http://evil.example/page.html"},
                    {"Referer": f"http://127.0.0.1:{port}.evil.example/"}):
        status, reply = upload("evil.txt", headers)
        assert status == 403 and "cross-site request refused" in reply["error"], headers
    # neither Origin nor Referer, and no client header: what a stripped cross-site form post looks like
    status, reply = upload("evil.txt", {"Content-Type": "text/plain"})
    assert status == 403 and f"must carry the header {CLIENT_HEADER}" in reply["error"]
    # chat and the other write methods are checked the same way
    status, _ = raw_request(base, "POST", "/api/chat", b'{"messages": [{"role": "user", "content": "hi"}]}',
                            {"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert status == 403
    for method in ("PUT", "DELETE", "PATCH"):
        assert raw_request(base, method, "/api/upload?name=a.txt", text, {"Origin": "http://evil.example"})[0] == 403
        assert raw_request(base, method, "/api/upload?name=a.txt", text, {"Origin": own})[0] == 405
    assert service.index is None and not index_dir.exists()  # nothing indexed, nothing saved

    # the app's own page (Origin, or only a Referer), under either name it is served as, and scripts
    assert upload("page.txt", {"Origin": own})[0] == 200
    assert upload("referer.txt", {"Referer": own + "/"})[0] == 200
    assert upload("localhost.txt", {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})[0] == 200
    assert upload("script.txt", {CLIENT_HEADER: "1"})[0] == 200
    assert sorted(service.index.sources) == ["localhost.txt", "page.txt", "referer.txt", "script.txt"]
    assert (index_dir / "manifest.json").is_file()


def post_raw(base: str, head_extra: str, body: bytes, length: int, *, close: str) -> bytes:
    """Send an upload whose Content-Length is ``length`` but whose body is ``body``, then
    ``close``: "write" (half-close: the server reads EOF, we still read its answer), "full"
    (close at once; returns b"") or "stall" (keep the connection open and silent)."""
    url = urllib.parse.urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=20)
    try:
        sock.sendall((f"POST /api/upload?name=cut.txt HTTP/1.1\r\nHost: {url.netloc}\r\n{CLIENT_HEADER}: 1\r\n"
                      f"{head_extra}Content-Type: text/plain\r\nContent-Length: {length}\r\n\r\n").encode() + body)
        if close == "full":
            return b""
        if close == "write":
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out
    finally:
        sock.close()


def test_truncated_or_stalled_upload_is_never_indexed(stub_app):
    service, base, index_dir = stub_app
    body = b"The Zorblat festival is held every March in Quillby. " * 30  # 1620 bytes of indexable text
    # Content-Length 1000, 10 bytes sent, connection closed: refused, nothing indexed or saved
    answer = post_raw(base, "", body[:10], 1000, close="write")
    status_line, _, payload = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"400", answer
    assert json.loads(payload.split(b"\r\n\r\n", 1)[1])["error"] == (
        "the request body ended after 10 of the 1000 bytes its Content-Length announced; nothing was changed")
    post_raw(base, "", body[:10], 1000, close="full")
    # a client that goes silent mid-body: the read timeout (1 s here, READ_TIMEOUT by default) ends it
    t0 = time.monotonic()
    answer = post_raw(base, "", body[:500], 1000, close="stall")
    assert answer.split()[1] == b"408" and b"no data for 1 s" in answer, answer
    assert time.monotonic() - t0 < 15
    time.sleep(0.5)  # let the fully closed connection's handler finish
    assert service.index is None and not index_dir.exists()

    # the same body sent whole is indexed, which shows the refusals were about the length alone
    status, data = request(base, "POST", "/api/upload?name=whole.txt", body[:1000])
    assert status == 200, data
    assert sorted(service.index.sources) == ["whole.txt"]


def chat_raw(base: str, fields: str) -> list[tuple[str, dict]]:
    """The events of a chat request whose extra JSON fields are ``fields`` verbatim (``1e999``,
    ``Infinity`` and ``NaN`` are what a hand-written or non-standard JSON client sends)."""
    body = '{"messages": [{"role": "user", "content": "How many tokens?"}]' + (", " + fields if fields else "") + "}"
    status, raw = request(base, "POST", "/api/chat", body.encode(), {"Content-Type": "application/json"})
    assert status == 200
    return events(raw)


@pytest.mark.parametrize("fields, message", [
    ('"top_k": 1e999', "top_k must be a finite integer, got inf"),
    ('"max_new_tokens": Infinity', "max_new_tokens must be a finite integer, got inf"),
    ('"max_new_tokens": -Infinity', "max_new_tokens must be a finite integer, got -inf"),
    ('"top_k": NaN', "top_k must be a finite integer, got nan"),
    ('"max_new_tokens": 2.5', "max_new_tokens must be a finite integer, got 2.5"),
    ('"top_k": "3"', 'top_k must be a number, got "3"'),
    ('"top_k": true', "top_k must be a number, got true"),
    ('"top_k": [2]', "top_k must be a number, got [2]"),
    ('"top_k": 0', "top_k must be between 1 and 10, got 0"),
    ('"top_k": 11', "top_k must be between 1 and 10, got 11"),
    ('"max_new_tokens": -1', "max_new_tokens must be between 1 and 1024, got -1"),
    ('"max_new_tokens": 1e20', "max_new_tokens must be between 1 and 1024, got 100000000000000000000"),
    ('"rag": "yes"', 'rag must be true or false, got "yes"'),
])
def test_numeric_fields_are_checked(stub_app, fields, message):
    _, base, _ = stub_app
    assert chat_raw(base, fields) == [("error", {"message": message})]


def test_valid_fields_and_unexpected_errors_end_in_an_event(stub_app):
    service, base, _ = stub_app
    ev = chat_raw(base, '"top_k": 2.0, "max_new_tokens": 3, "rag": false')
    assert [e for e, _ in ev] == ["passages", "token", "token", "token", "done"] and ev[-1][1]["tokens"] == 3
    ev = chat_raw(base, '"top_k": null, "max_new_tokens": null')  # null: the server's defaults (4 tokens)
    assert ev[-1] == ("done", ev[-1][1]) and ev[-1][1]["tokens"] == 4
    # a failure after the 200 header is sent still ends the stream with an error event, not silence
    service.generator = StubGenerator(fail=RuntimeError("boom"))
    ev = chat_raw(base, "")
    assert ev[-1] == ("error", {"message": "internal error: RuntimeError: boom"})


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


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, got -5"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive number, got nan"),
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
])
def test_bad_flags_end_in_one_line_before_loading(argv, message, capsys, monkeypatch):
    import qlora_jax.embed
    from qlora_jax.cli.app import main

    monkeypatch.setattr(qlora_jax.embed, "default_embedder", lambda: pytest.fail("loaded before the flags were checked"))
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}"


def test_page_in_headless_chromium(app, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs Debian's chromium (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    service, base, _ = app
    notes, kelp = tmp_path / "festival notes.txt", tmp_path / "kelp.md"
    notes.write_text(FACT + "\n\n" + OTHER)
    kelp.write_text(OTHER)
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

            page.set_input_files("#file", [str(notes), str(kelp)])  # the page uploads them one by one
            page.click("#upload")
            expect(page.locator("#upload-status")).to_contain_text("kelp.md: added")
            assert page.text_content("#upload-status").startswith("kelp.md: added ")
            assert sorted(service.index.sources) == ["festival notes.txt", "kelp.md"]
            expect(page.locator("#status")).to_contain_text("from 2 file(s)")

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

"""A local web app to try a (fine-tuned) model: chat with retrieval over your documents.

    python -m qlora_jax.app [--model smollm2-135m-instruct] [--adapter runs/sft_demo/adapter]
        [--corpus data/rag_corpus] [--index runs/rag_index] [--port 7860] [--quantize none]

then open http://127.0.0.1:7860. The page streams the answer token by token from the KV-cache
:class:`~qlora_jax.inference.generate.Generator`, lets you upload .txt/.md/.rst/.jsonl/.pdf files into the
retrieval index, and shows the passages retrieved for each question (source, line or page,
cosine score).

* Retrieval (:mod:`qlora_jax.rag`): the question is embedded with all-MiniLM-L6-v2, the top-k
  chunks are put into the user turn (``CHAT_TEMPLATE``); earlier turns are sent as they were
  asked. ``--index DIR`` loads a saved index (or builds it from ``--corpus`` when DIR has none)
  and saves every upload into it atomically; ``--corpus`` alone keeps the index in memory;
  neither starts with no index, and a question then gets an answer without retrieval and a
  notice saying so.
* Bad input: an upload over ``--max-upload-mb`` is refused (HTTP 413) before its body is read;
  an unreadable PDF, an empty file or an unsupported type gets HTTP 400 with the reason, and the
  index is left as it was. A body shorter than its ``Content-Length`` (the client closed the
  connection, or sent nothing for ``READ_TIMEOUT`` seconds) gets HTTP 400 (408 on the timeout)
  and is never indexed. Numeric chat fields must be finite integers in range; anything else is
  answered with an ``error`` event naming the field.
* Served by the standard library (``ThreadingHTTPServer``) on 127.0.0.1 only; requests whose
  ``Host`` is not this loopback address are refused (no DNS rebinding). One generation runs at
  a time; a second question waits for the first.
* Cross-site writes are refused (HTTP 403). A state-changing request (POST, PUT, DELETE, PATCH)
  is accepted only from the app's own origin: its ``Origin`` header, or without one its
  ``Referer``, must be ``http://`` + the ``Host`` it is addressed to (``127.0.0.1:PORT`` or
  ``localhost:PORT``, the two names the app answers to; a page served under one name may not
  write through the other, as a browser's same-origin rule would have it). Browsers send
  ``Origin`` with every POST, so the page passes and another site's form or ``fetch`` does not.
  A request with neither header (curl, scripts; or a browser whose privacy settings strip both)
  must carry the header ``X-Qlora-App`` (any value, e.g. ``curl -H 'X-Qlora-App: 1'``): a
  cross-site page can only set a custom header after a CORS preflight, which this server never
  grants. The page sends that header too.

HTTP API (used by the page): ``GET /api/status``; ``POST /api/upload?name=FILE`` with the raw
file as body; ``POST /api/chat`` with ``{"messages": [{"role", "content"}...], "rag": bool,
"top_k": int (1-10), "max_new_tokens": int (1-1024)}`` (a missing or null number takes the
server's default) answers with server-sent events ``passages``
(``{"hits": [...], "notice": str | null}``), ``token`` (``{"text"}``) ... and ``done``
(``{"tokens", "seconds", "finish"}``) or ``error`` (``{"message"}``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from qlora_jax.errors import UserError
from qlora_jax.inference.generate import SamplingParams
from qlora_jax.rag import RagError, RagIndex, chat_prompt
from qlora_jax.rag.loaders import format_size

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_CHAT_BODY = 256 * 1024  # bytes of a chat request
HISTORY_MESSAGES = 8  # earlier messages kept in the prompt
READ_TIMEOUT = 30.0  # seconds a client may leave the socket silent while we read its request
MAX_TOP_K = 10  # passages a chat request may ask for
MAX_NEW_TOKENS = 1024  # tokens a chat request may ask for
CLIENT_HEADER = "X-Qlora-App"  # required on a write that has neither Origin nor Referer
WRITE_METHODS = ("POST", "PUT", "DELETE", "PATCH")


class BadRequest(UserError):
    """A chat request field the client must fix; the message names the field and the value."""


def int_field(request: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    """``request[name]`` as an int in ``[lo, hi]`` (absent or null: ``default``).

    JSON numbers arrive as int or float; ``1e999`` and ``Infinity`` parse to float inf and
    ``NaN`` to nan, so a float must be finite and integral. Strings and booleans are refused.
    """
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {json.dumps(value)[:40]}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise BadRequest(f"{name} must be a finite integer, got {value!r}")
        value = int(value)
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, got {value}")
    return value


class ChatService:
    """The model, the generator and the retrieval index behind the web app.

    ``generator``: a :class:`~qlora_jax.inference.generate.Generator`; ``index``: a
    :class:`~qlora_jax.rag.RagIndex` or None (created by the first upload); ``index_dir``: where
    uploads are saved (None: memory only); ``embedder``: for an index created by an upload.
    """

    def __init__(self, generator, *, description: str = "", index=None, index_dir: str | os.PathLike | None = None,
                 embedder=None, max_upload_bytes: int = 10 * 2**20, top_k: int = 2, max_new_tokens: int = 256,
                 system: str | None = None):
        self.generator, self.description = generator, description
        self.index, self.index_dir = index, Path(index_dir) if index_dir else None
        self.embedder = embedder if embedder is not None else getattr(index, "embedder", None)
        self.max_upload_bytes, self.top_k, self.max_new_tokens = max_upload_bytes, top_k, max_new_tokens
        self.system = system
        self._generate_lock = threading.Lock()
        self._index_lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        index = self.index
        return {"model": self.description, "chunks": len(index) if index is not None else 0,
                "sources": index.sources if index is not None else {},
                "index_dir": str(self.index_dir) if self.index_dir else None,
                "max_upload_mb": self.max_upload_bytes / 2**20, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens}

    def upload(self, name: str, data: bytes) -> dict[str, Any]:
        """Add one file to the index (creating it on the first upload); raises RagError with the
        index unchanged, in memory and on disk."""
        name = Path(name).name or "upload"  # a label only: nothing is written under this name
        with self._index_lock:  # add to a copy, save it, then swap: a failure changes nothing
            index = self.index.copy() if self.index is not None else RagIndex(self.embedder)
            added = index.add_bytes(name, data, max_bytes=self.max_upload_bytes)
            if self.index_dir is not None:
                index.save(self.index_dir)
            self.index = index
        return {"name": name, "added": added, **self.status()}

    def retrieve(self, question: str, top_k: int):
        """``(hits, notice)``: the passages for ``question``, or none and a message why."""
        if self.index is None or len(self.index) == 0:
            return [], ("No documents are indexed yet, so this answer uses no retrieval. Upload a file "
                        "(or start the app with --corpus DIR) to answer from your documents.")
        try:
            return self.index.search(question, k=top_k), None
        except RagError as err:
            return [], str(err)

    def chat_events(self, request: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        """The server-sent events of one chat request: passages, tokens, done (or error)."""
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                for m in messages) or messages[-1]["role"] != "user":
            yield "error", {"message": "messages must be a list of {role: user|assistant, content: str} ending "
                                       "with the user's question"}
            return
        question = messages[-1]["content"].strip()
        if not question:
            yield "error", {"message": "the question is empty"}
            return
        try:
            top_k = int_field(request, "top_k", self.top_k, 1, max(MAX_TOP_K, self.top_k))
            max_new = int_field(request, "max_new_tokens", self.max_new_tokens, 1,
                                max(MAX_NEW_TOKENS, self.max_new_tokens))
            use_rag = request.get("rag", True)
            if not isinstance(use_rag, bool):
                raise BadRequest(f"rag must be true or false, got {json.dumps(use_rag)[:40]}")
        except BadRequest as err:
            yield "error", {"message": str(err)}
            return
        hits, notice = self.retrieve(question, top_k) if use_rag else ([], None)
        yield "passages", {"hits": [h.to_json() for h in hits], "notice": notice}
        turn = chat_prompt(question, [h.chunk.text for h in hits])
        history = [dict(role=m["role"], content=m["content"]) for m in messages[:-1]][-HISTORY_MESSAGES:]
        try:
            ids = self.generator.chat_prompt(history + [{"role": "user", "content": turn}], system=self.system)
        except Exception as err:  # a template that rejects the message order, ...
            yield "error", {"message": f"cannot build the prompt: {err}"}
            return
        t0, n, finish = time.perf_counter(), 0, "length"
        with self._generate_lock:
            try:
                for chunk in self.generator.stream([ids], max_new_tokens=max_new, sampling=SamplingParams()):
                    n += len(chunk.tokens[0])
                    if chunk.texts[0]:
                        yield "token", {"text": chunk.texts[0]}
                    if chunk.finished[0] and chunk.tokens[0] and chunk.tokens[0][-1] in self.generator.stop_token_ids:
                        finish = "stop"
            except ValueError as err:  # prompt too long for the model
                yield "error", {"message": str(err)}
                return
        yield "done", {"tokens": n, "seconds": round(time.perf_counter() - t0, 2), "finish": finish,
                       "prompt_tokens": len(ids)}


def make_handler(service: ChatService, port_ref: list[int], read_timeout: float = READ_TIMEOUT):
    """The request handler class bound to ``service`` (``port_ref[0]`` is the bound port)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "qlora_jax-app"
        protocol_version = "HTTP/1.0"  # one request per connection; streams end when closed
        timeout = read_timeout  # socket timeout: a silent client cannot hold a thread forever

        def log_message(self, fmt, *args):  # quieter than the default: one line per request
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def _host_ok(self) -> bool:
            allowed = {f"{HOST}:{port_ref[0]}", f"localhost:{port_ref[0]}"}
            if self.headers.get("Host", "") in allowed:
                return True
            self._json(HTTPStatus.FORBIDDEN, {"error": "requests must be addressed to this machine's loopback"})
            return False

        def _origin_ok(self) -> bool:
            """A write must come from the app's own origin (see the module docstring); else 403."""
            own = "http://" + self.headers.get("Host", "")  # _host_ok has checked the Host
            origin, referer = self.headers.get("Origin"), self.headers.get("Referer")
            if origin is not None:
                if origin == own:
                    return True
                why = f"Origin {origin[:100]!r}"
            elif referer is not None:
                url = urllib.parse.urlsplit(referer)
                if f"{url.scheme}://{url.netloc}" == own:
                    return True
                why = f"Referer {referer[:100]!r}"
            elif self.headers.get(CLIENT_HEADER) is not None:
                return True
            else:
                self._json(HTTPStatus.FORBIDDEN, {
                    "error": f"a {self.command} without an Origin or Referer header must carry the header "
                             f"{CLIENT_HEADER} (e.g. curl -H '{CLIENT_HEADER}: 1'); this refuses cross-site writes"})
                return False
            self._json(HTTPStatus.FORBIDDEN, {
                "error": f"cross-site request refused: {why} is not this app's origin {own}; "
                         "only the app's own page may change its state"})
            return False

        def _write_ok(self) -> bool:
            return self._host_ok() and self._origin_ok()

        def _read_body(self, length: int) -> bytes | None:
            """Exactly ``length`` bytes of body, or None after answering 400/408: a body cut short
            (the client closed the connection or went silent) is never used."""
            try:
                data = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True
                self._json(HTTPStatus.REQUEST_TIMEOUT,
                           {"error": f"no data for {self.timeout:g} s while reading the request body; "
                                     "nothing was changed"})
                return None
            if len(data) != length:
                self.close_connection = True
                self._json(HTTPStatus.BAD_REQUEST,
                           {"error": f"the request body ended after {len(data)} of the {length} bytes its "
                                     "Content-Length announced; nothing was changed"})
                return None
            return data

        def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client is gone (e.g. it closed after a truncated upload)

        def _length(self, limit: int) -> int | None:
            """The request body's declared length, or None after answering 411/413."""
            raw = self.headers.get("Content-Length")
            if raw is None:
                self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
                return None
            if not (raw.isascii() and raw.isdigit()) or len(self.headers.get_all("Content-Length")) > 1:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad Content-Length header: {raw[:40]!r}"})
                return None
            if int(raw) > limit:
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           {"error": f"the upload is {format_size(int(raw))}; the limit is {format_size(limit)}"})
                return None
            return int(raw)

        def do_GET(self):
            if not self._host_ok():
                return
            path = urllib.parse.urlsplit(self.path).path
            if path == "/":
                body = PAGE.encode()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; "
                                                           "script-src 'unsafe-inline'")
                self.end_headers()
                self.wfile.write(body)
            elif path == "/api/status":
                self._json(HTTPStatus.OK, service.status())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

        def do_POST(self):
            if not self._write_ok():
                return
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/api/upload":
                name = urllib.parse.parse_qs(url.query).get("name", [""])[0]
                length = self._length(service.max_upload_bytes)
                if length is None:
                    return
                data = self._read_body(length)
                if data is None:
                    return
                try:
                    self._json(HTTPStatus.OK, service.upload(name, data))
                except RagError as err:
                    self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            elif url.path == "/api/chat":
                length = self._length(MAX_CHAT_BODY)
                if length is None:
                    return
                body = self._read_body(length)
                if body is None:
                    return
                try:
                    request = json.loads(body or b"{}")
                    if not isinstance(request, dict):
                        raise ValueError("expected a JSON object")
                except ValueError as err:
                    self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad JSON: {err}"})
                    return
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                def send(event: str, data: dict[str, Any]) -> None:
                    self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                    self.wfile.flush()

                try:
                    try:
                        for event, data in service.chat_events(request):
                            send(event, data)
                    except (BrokenPipeError, ConnectionResetError):
                        raise
                    except Exception as err:  # a bug: the headers are sent, so say it in the stream
                        log.exception("chat request failed")
                        send("error", {"message": f"internal error: {type(err).__name__}: {err}"})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the page went away; generation stops with the stream
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {url.path}"})

        def _not_allowed(self):
            if self._write_ok():
                self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not supported here"})

        do_PUT = do_DELETE = do_PATCH = _not_allowed

    return Handler


def make_server(service: ChatService, port: int = 7860, *, read_timeout: float = READ_TIMEOUT) -> ThreadingHTTPServer:
    """An HTTP server for ``service`` on 127.0.0.1 (``port=0``: any free port; see
    ``server.server_address``). Call ``serve_forever()`` (e.g. in a thread) and ``shutdown()``.
    ``read_timeout``: seconds a client may stay silent while its request is read."""
    port_ref = [port]
    server = ThreadingHTTPServer((HOST, port), make_handler(service, port_ref, read_timeout))
    server.daemon_threads = True
    port_ref[0] = server.server_address[1]
    return server


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qlora_jax chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f4f5f7; }
 header { padding: 10px 18px; background: #1d2330; color: #fff; font-size: 14px; }
 header b { font-size: 16px; margin-right: 10px; }
 main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 16px; padding: 16px; }
 section { background: #fff; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 3px #0002; }
 h2 { font-size: 15px; margin: 0 0 8px; }
 #passages { max-height: 66vh; overflow-y: auto; }
 #messages { height: 52vh; overflow-y: auto; border: 1px solid #dde; border-radius: 6px; padding: 8px; }
 .msg { margin: 6px 0; padding: 8px 10px; border-radius: 8px; white-space: pre-wrap; }
 .user { background: #e4ecff; } .assistant { background: #eef7ee; } .meta { color: #667; font-size: 12px; }
 textarea { width: 100%; box-sizing: border-box; font: inherit; min-height: 60px; margin-top: 8px; }
 .row { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin-top: 6px; font-size: 13px; }
 button { font: inherit; padding: 5px 14px; }
 .passage { border-left: 3px solid #7a9; padding: 4px 8px; margin: 8px 0; font-size: 13px; white-space: pre-wrap; }
 .passage .meta { display: block; } .notice { color: #a55; font-size: 13px; } input[type=number] { width: 4em; }
</style></head><body>
<header><b>qlora_jax chat</b><span id="status">loading...</span></header>
<main>
 <section><h2>Chat</h2>
  <div id="messages"></div>
  <textarea id="question" placeholder="Ask a question (Enter to send, Shift+Enter for a new line)"></textarea>
  <div class="row"><button id="send">Send</button>
   <label><input type="checkbox" id="use-rag" checked> use retrieval</label>
   <label>top-k <input type="number" id="top-k" min="1" max="10"></label>
   <label>max tokens <input type="number" id="max-new" min="1" max="1024"></label>
   <button id="clear">New chat</button><span id="chat-status" class="meta"></span></div>
 </section>
 <section><h2>Documents</h2>
  <div class="row"><input type="file" id="file" accept=".txt,.md,.rst,.jsonl,.pdf" multiple>
   <button id="upload">Upload</button></div>
  <div id="upload-status" class="meta"></div>
  <h2 style="margin-top:14px">Retrieved passages</h2>
  <div id="passages" class="meta">Ask a question to see the passages it retrieves.</div>
 </section>
</main>
<script>
const $ = (id) => document.getElementById(id);
let history = [], maxUpload = 0, busy = false;
const APP_HEADERS = {'X-Qlora-App': '1'};  // see the module docstring: cross-site writes are refused
const num = (id) => ($(id).value === '' ? null : +$(id).value);  // empty: the server's default
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
async function refresh() {
  const s = await (await fetch('/api/status')).json();
  maxUpload = s.max_upload_mb;
  $('status').textContent = s.model + ' | index: ' + s.chunks + ' chunks from ' +
    Object.keys(s.sources).length + ' file(s)';
  if (!$('top-k').value) $('top-k').value = s.top_k;
  if (!$('max-new').value) $('max-new').value = s.max_new_tokens;
}
function showPassages(p) {
  const box = $('passages'); box.textContent = '';
  if (p.notice) box.appendChild(el('div', 'notice', p.notice));
  for (const h of p.hits) {
    const d = el('div', 'passage'); d.appendChild(el('span', 'meta', '[' + h.rank + '] ' + h.location +
      '  (score ' + h.score.toFixed(3) + ')'));
    d.appendChild(el('span', 'text', h.text)); box.appendChild(d);
  }
  if (!p.notice && !p.hits.length) box.appendChild(el('div', 'meta', 'retrieval off'));
}
async function send() {
  const q = $('question').value.trim(); if (!q || busy) return;
  busy = true; $('send').disabled = true; $('question').value = '';
  $('messages').appendChild(el('div', 'msg user', q));
  const answer = el('div', 'msg assistant'); $('messages').appendChild(answer);
  $('chat-status').textContent = 'thinking...';
  const messages = history.concat([{role: 'user', content: q}]);
  let text = '';
  try {
    const r = await fetch('/api/chat', {method: 'POST', headers: {...APP_HEADERS, 'Content-Type': 'application/json'},
      body: JSON.stringify({messages, rag: $('use-rag').checked, top_k: num('top-k'),
                            max_new_tokens: num('max-new')})});
    if (!r.ok) throw new Error((await r.json()).error);
    const reader = r.body.getReader(), dec = new TextDecoder(); let buf = '';
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true}); let cut;
      while ((cut = buf.indexOf('\\n\\n')) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        const ev = (block.match(/^event: (.*)$/m) || [])[1], data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1]);
        if (ev === 'passages') showPassages(data);
        else if (ev === 'token') { text += data.text; answer.textContent = text;
          answer.dataset.chunks = (+(answer.dataset.chunks || 0) + 1);
          $('messages').scrollTop = $('messages').scrollHeight; $('chat-status').textContent = 'streaming...'; }
        else if (ev === 'done') $('chat-status').textContent = data.tokens + ' tokens in ' + data.seconds + ' s';
        else if (ev === 'error') throw new Error(data.message);
      }
    }
    answer.classList.add('complete');
    history = messages.concat([{role: 'assistant', content: text}]);
  } catch (e) { answer.classList.add('error'); answer.textContent = text + ' [error: ' + e.message + ']';
    $('chat-status').textContent = ''; }
  busy = false; $('send').disabled = false;
}
async function upload() {
  const files = $('file').files; if (!files.length) { $('upload-status').textContent = 'choose a file first'; return; }
  for (const f of files) {
    if (f.size > maxUpload * 1048576) { $('upload-status').textContent = f.name + ': ' +
      (f.size / 1048576).toFixed(1) + ' MiB is over the ' + maxUpload + ' MiB limit'; continue; }
    $('upload-status').textContent = 'indexing ' + f.name + '...';
    const r = await fetch('/api/upload?name=' + encodeURIComponent(f.name), {method: 'POST', headers: APP_HEADERS, body: f});
    const s = await r.json();
    $('upload-status').textContent = r.ok ? f.name + ': added ' + s.added + ' chunks (index: ' + s.chunks + ')'
                                          : 'error: ' + s.error;
  }
  refresh();
}
$('send').onclick = send; $('upload').onclick = upload;
$('clear').onclick = () => { history = []; $('messages').textContent = ''; };
$('question').addEventListener('keydown', (e) => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); send(); } });
refresh();
</script></body></html>
"""

"""python -m qlora_jax.app [--model smollm2-135m-instruct] [--adapter runs/sft_demo/adapter]
    [--corpus data/rag_corpus] [--index runs/rag_index] [--port 7860] [--quantize none]

Flags are checked before anything is loaded; the server is :mod:`qlora_jax.inference.app`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from qlora_jax.cli._common import ArgumentParser, cli_main, quiet_logs
from qlora_jax.errors import UserError
from qlora_jax.inference.app import HOST, ChatService, make_server


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qlora_jax.app",
                       description="Chat with a (fine-tuned) model and your documents in the browser.")
    p.add_argument("--model", default=None, help="base model (default: the adapter run's, else smollm2-135m-instruct)")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (RUN_DIR/adapter) or a run directory")
    p.add_argument("--quantize", default="default", help="nf4 | fp4 | none (default: the run's, else nf4)")
    p.add_argument("--corpus", action="append", default=None,
                   help="file or directory to index at start (repeatable); .txt .md .rst .jsonl .pdf")
    p.add_argument("--index", default=None, help="index directory: loaded if it exists (else built from --corpus), "
                                                 "and uploads are saved into it")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--top-k", type=int, default=2, help="passages retrieved per question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted")
    p.add_argument("--system", default=None, help="system message (default: the chat template's)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flags checked before anything is loaded (a UserError names the flag)."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        raise UserError(f"--max-upload-mb must be a positive number, got {args.max_upload_mb}")


@cli_main
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    check_args(args)
    quiet_logs()
    from qlora_jax.embed import EmbedError, default_embedder
    from qlora_jax.inference.generate import Generator, check_adapter_path, load_for_inference

    if args.adapter is not None:  # before minutes of indexing
        check_adapter_path(args.adapter)
    from qlora_jax.rag import RagIndex

    try:
        embedder = default_embedder()
    except EmbedError as err:  # not a UserError subclass: a broken install, said in one line
        raise UserError(str(err)) from err
    index = None  # a RagError (a UserError) names the corpus file or index and what is wrong
    if args.index and (Path(args.index) / "manifest.json").is_file():
        index = RagIndex.load(args.index, embedder)
    elif args.corpus:
        index = RagIndex.build(args.corpus, embedder, progress=True)
        if args.index:
            index.save(args.index)
    model, tokenizer, what = load_for_inference(args.model, args.adapter, quantize=args.quantize)
    service = ChatService(Generator(model, tokenizer), description=what, index=index, index_dir=args.index,
                          embedder=embedder, max_upload_bytes=int(args.max_upload_mb * 2**20), top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, system=args.system)
    try:
        server = make_server(service, args.port)
    except OSError as err:  # port in use, ...
        raise UserError(f"--port {args.port}: cannot listen on {HOST}:{args.port}: {err.strerror or err}") from err
    host, port = server.server_address[:2]
    print(f"{what}; index: {len(index) if index else 0} chunks\nserving on http://{host}:{port}  (Ctrl-C to stop)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def console() -> None:
    """``python -m qlora_jax.app`` and the ``qlora-app`` script."""
    sys.exit(main())

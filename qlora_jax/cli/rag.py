"""Build, extend and query a retrieval index from the command line.

    python -m qlora_jax.rag build --corpus data/rag_corpus [--corpus more.pdf] --index runs/rag_index
        [--chunk-words 80 --overlap-words 20]
    python -m qlora_jax.rag add --index runs/rag_index notes.pdf other_dir/
    python -m qlora_jax.rag query --index runs/rag_index [--top-k 3] "question" ["question" ...]

``build`` replaces the index in ``--index``; ``add`` appends to it (nothing is written when a
file fails). Errors print one line naming the file or setting and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlora_jax.cli._common import ArgumentParser, cli_main, quiet_logs, report  # noqa: E402
from qlora_jax.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qlora_jax.rag", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index a corpus (files or directories), replacing --index")
    b.add_argument("--corpus", action="append", required=True, help="a .txt/.md/.rst/.jsonl/.pdf file or a directory")
    b.add_argument("--index", required=True, help="directory to write the index to")
    b.add_argument("--chunk-words", type=int, default=80, help="words per chunk at most")
    b.add_argument("--overlap-words", type=int, default=20, help="words repeated between neighbouring chunks")
    a = sub.add_parser("add", help="add files to an existing index")
    a.add_argument("--index", required=True)
    a.add_argument("paths", nargs="+")
    q = sub.add_parser("query", help="print the passages retrieved for each question")
    q.add_argument("--index", required=True)
    q.add_argument("--top-k", type=int, default=2)
    q.add_argument("questions", nargs="+")
    for s in (b, a):
        s.add_argument("--max-file-mb", type=float, default=20.0, help="size limit per file")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    from qlora_jax.embed import EmbedError
    from qlora_jax.rag import RagIndex

    args = build_parser().parse_args(argv)
    quiet_logs()
    t0 = time.perf_counter()
    try:
        if args.command == "build":
            index = RagIndex.build(args.corpus, chunk_words=args.chunk_words, overlap_words=args.overlap_words,
                                   max_bytes=int(args.max_file_mb * 2**20), progress=True)
            # a fresh build replaces whatever was there: start the version count after it
            index.save(args.index)
            print(f"indexed {len(index)} chunks from {len(index.sources)} file(s) into {args.index} "
                  f"in {time.perf_counter() - t0:.1f} s")
        elif args.command == "add":
            index = RagIndex.load(args.index)
            added = index.add_paths(args.paths, max_bytes=int(args.max_file_mb * 2**20), progress=True)
            index.save(args.index)
            print(f"added {added} chunks; {args.index} now holds {len(index)}")
        else:
            index = RagIndex.load(args.index)
            for question, hits in zip(args.questions, index.search(args.questions, k=args.top_k)):
                print(f"Q: {question}")
                for h in hits:
                    print(f"  [{h.rank}] {h.score:.3f} {h.chunk.location}: {' '.join(h.chunk.text.split())}")
    except UserError as err:  # RagError: one line, status returned for callers of main()
        return report(err)
    except EmbedError as err:  # a broken install of the embedding model, said in one line
        return report(UserError(str(err)))
    return 0


def console() -> None:
    """``python -m qlora_jax.rag`` and the ``qlora-rag`` script."""
    sys.exit(main())

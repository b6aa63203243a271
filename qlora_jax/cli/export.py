"""python -m qlora_jax.export --workdir RUN_DIR --format merged|peft|bnb4|gguf [--out PATH] [...]

Flags only; the export is :func:`qlora_jax.checkpoints.export.export`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qlora_jax.checkpoints.export import FORMATS, export
from qlora_jax.cli._common import ArgumentParser, cli_main, quiet_logs


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m qlora_jax.export",
        description="Export a training run's fine-tuned model (base + trained LoRA adapters).",
        epilog="bnb4 keeps the 4-bit base codes as trained and writes the adapters unmerged beside it "
               "(OUT/adapter, PEFT format); merged and gguf merge the adapters into the dequantized base.")
    parser.add_argument("--workdir", required=True, help="run directory (summary.json, adapter/, checkpoints/)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", help="output directory (file for gguf); default RUN_DIR/export/<format> "
                                      "or RUN_DIR/export/model-<TYPE>.gguf")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="dtype of float weights for merged and bnb4 (default bfloat16)")
    parser.add_argument("--gguf-type", default="Q8_0", choices=tuple(("Q8_0", "F16", "Q4_0", "F32")),
                        help="GGUF tensor type of matrices (default Q8_0)")
    parser.add_argument("--adapter", help="PEFT adapter directory to use instead of the run's own")
    parser.add_argument("--source", help="base model, if not the one the run recorded")
    parser.add_argument("--quantize", choices=("nf4", "fp4", "none"),
                        help="base quantization, if not the one the run recorded")
    parser.add_argument("--blocksize", type=int, help="4-bit block size, if not the recorded one (default 64)")
    parser.add_argument("--double-quant", dest="double_quant", action=argparse.BooleanOptionalAction,
                        default=None, help="double quantization, if not the recorded one (default on)")
    parser.add_argument("--max-shard-size", type=_size, default=None,
                        help="largest safetensors shard, e.g. 2GB (default 5GiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export at --out (as a whole); without it an existing target "
                             "is refused. A directory holding files no export wrote is refused either way")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_logs()
    path = export(args.workdir, args.format, args.out, dtype=args.dtype, gguf_type=args.gguf_type,
                  adapter=args.adapter, source=args.source, quantize=args.quantize, blocksize=args.blocksize,
                  double_quant=args.double_quant, max_shard_bytes=args.max_shard_size,
                  overwrite=args.overwrite)
    print(f"{args.format}: {path}")
    return path


def console() -> None:
    """``python -m qlora_jax.export`` and the ``qlora-export`` script."""
    main()

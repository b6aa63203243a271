"""python -m qlora_jax.generate [--model smollm2-135m-instruct] [--adapter RUN_DIR/adapter]
    --prompt "..." [--prompt "..."] [--system "..."] [--raw] [--max-new-tokens 128]
    [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--quantize nf4|none] [--stream]

Every flag is checked before the model is loaded; the generation itself is
:class:`qlora_jax.inference.generate.Generator`.
"""

from __future__ import annotations

import argparse
import sys
import time

from qlora_jax.cli._common import ArgumentParser, cli_main, quiet_logs
from qlora_jax.errors import UserError
from qlora_jax.inference.generate import Generator, SamplingParams, check_adapter_path, load_for_inference


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qlora_jax.generate",
                       description="Answer prompts with a (fine-tuned) model; greedy by default.")
    p.add_argument("--model", default=None,
                   help="base model: built-in name, GGUF file, HF directory (default: the adapter run's "
                        "base, else smollm2-135m-instruct)")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (RUN_DIR/adapter) or a run directory")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("--raw", action="store_true", help="continue the prompt text as is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", default="default", help="nf4 | fp4 | none (default: the run's, else nf4)")
    p.add_argument("--no-lora", action="store_true", help="switch the adapters off (the base model's answer)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop token (string, one token); repeatable; default: eos + end-of-turn tokens")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt only)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    quiet_logs()
    try:  # every flag is checked before the model is loaded
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise UserError(f"--{str(e).replace('_', '-', 1)}") from e
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens}: must be >= 1")
    if args.stream and len(args.prompt) > 1:
        raise UserError("--stream takes a single --prompt")
    if args.raw and any(not p for p in args.prompt):
        raise UserError("--prompt: an empty prompt with --raw has no token to continue from")
    if args.adapter is not None:
        check_adapter_path(args.adapter)
    model, tokenizer, what = load_for_inference(args.model, args.adapter, quantize=args.quantize)
    stop = None
    if args.stop:
        vocab = tokenizer.get_vocab()
        missing = [s for s in args.stop if s not in vocab]
        if missing:
            raise UserError(f"--stop {missing}: not single tokens of the vocabulary")
        stop = [vocab[s] for s in args.stop]
    gen = Generator(model, tokenizer, stop_token_ids=stop)
    prompts = [gen.encode(p) if args.raw else gen.chat_prompt(p, system=args.system) for p in args.prompt]
    limit = model.config.max_position_embeddings
    for i, ids in enumerate(prompts):
        if not ids:
            raise UserError(f"--prompt #{i + 1} ({args.prompt[i]!r}) is empty after tokenization")
        if len(ids) + args.max_new_tokens > limit:
            raise UserError(f"--prompt #{i + 1}: {len(ids)} prompt tokens + --max-new-tokens {args.max_new_tokens} "
                            f"exceed the model's context of {limit} tokens; shorten the prompt or lower "
                            f"--max-new-tokens")
    print(f"# {what}", file=sys.stderr)
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, lora_enabled=not args.no_lora)
    if args.stream:
        t0 = time.perf_counter()
        pieces, n = [], 0
        for chunk in gen.stream(prompts, **kw):
            sys.stdout.write(chunk.texts[0])
            sys.stdout.flush()
            pieces.append(chunk.texts[0])
            n += len(chunk.tokens[0])
        sys.stdout.write("\n")
        print(f"# {n} tokens in {time.perf_counter() - t0:.1f}s (compilation included)", file=sys.stderr)
        return ["".join(pieces)]
    result = gen.generate(prompts, **kw)
    for i, (prompt, text) in enumerate(zip(args.prompt, result.texts)):
        if len(prompts) > 1:
            print(f"=== [{i}] {prompt}")
        print(text)
    print(f"# {result.new_tokens} tokens in {result.seconds:.1f}s (compilation included); finish: "
          f"{', '.join(result.finish_reasons)}", file=sys.stderr)
    return result.texts


def console() -> None:
    """``python -m qlora_jax.generate`` and the ``qlora-generate`` script."""
    main()

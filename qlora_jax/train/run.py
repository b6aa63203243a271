"""One training run from a config: load, tokenize, train with resume, evaluate, export.

``run(config)`` is what ``python -m qlora_jax.train --config configs/sft.py`` calls. It resumes
automatically from the newest checkpoint in ``config.workdir``. ``config.objective`` picks the
objective: "sft" (token NLL on completions) or "dpo" (preference pairs, ``train/preference.py``);
both share the step, optimizer, checkpoints, metrics and export. "grpo" (sampled groups scored by
reward functions) runs its own loop around the same step and checkpoints (``train/grpo_run.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from qlora_jax import data as data_lib
from qlora_jax.checkpoints.load import load_model
from qlora_jax.lora import ALL_LINEAR, LoraConfig
from qlora_jax.train import checkpoint as ckpt_lib
from qlora_jax.train import loop
from qlora_jax.train import preference as pref_lib
from qlora_jax.train import sharding as shard_lib
from qlora_jax.train.config_check import ConfigError, check_inputs, validate_config
from qlora_jax.train.metrics import MetricsWriter, plot_loss, read_metrics
from qlora_jax.train.optim import make_optimizer, warmup_steps

log = logging.getLogger("qlora_jax.train")
# Testing hook: SIGKILL this process right after optimizer step N (0 = never).
_FAULT_KILL_AT_STEP = int(os.environ.get("QLORA_FAULT_KILL_AT_STEP", "0"))


def lora_config_from(cfg: ConfigDict) -> LoraConfig:
    t = cfg.lora.targets
    if isinstance(t, str) and t != ALL_LINEAR and "," in t:
        targets: Any = tuple(s.strip() for s in t.split(",") if s.strip())
    elif isinstance(t, str) and t != ALL_LINEAR and t.isidentifier():
        targets = (t,)
    else:
        targets = tuple(t) if isinstance(t, (list, tuple)) else t
    return LoraConfig(r=cfg.lora.r, alpha=float(cfg.lora.alpha), dropout=float(cfg.lora.dropout),
                      targets=targets, init=cfg.lora.init, init_std=float(cfg.lora.init_std),
                      use_rslora=bool(cfg.lora.rslora))


def lora_record(lora: LoraConfig, cfg: ConfigDict) -> dict[str, Any]:
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets,
            "init": lora.init, "use_rslora": lora.use_rslora, "model_source": str(cfg.model.source),
            "quantize": cfg.model.quantize, "blocksize": cfg.model.blocksize,
            "double_quant": cfg.model.double_quant}


def sharding_fn(mesh):
    """(name, shape) -> PartitionSpec for build_model, from the logical-axis tables."""
    def fn(name: str, shape: tuple[int, ...]):
        return shard_lib.spec_for(mesh, shard_lib.logical_axes_for(name.replace(".", "/"), shape), shape)
    return fn


def _setup_logging(workdir: Path) -> None:
    root = logging.getLogger("qlora_jax")
    if any(getattr(h, "_qlora", False) for h in root.handlers):
        return
    root.setLevel(logging.INFO)
    root.propagate = False  # absl's root handler would print every line twice
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(workdir / "train.log")
    fh.setFormatter(fmt)
    fh._qlora = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    if jax.process_index() == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._qlora = True  # type: ignore[attr-defined]
        root.addHandler(sh)


def _eval_fn(graphdef, mesh):
    """Per-row (nll sum, loss tokens, correctly predicted loss tokens), adapters on or off."""

    def fn(lora, rest, batch, lora_enabled):
        model = nnx.merge(graphdef, lora, rest)
        h = model.hidden_states(batch["input_ids"], positions=batch["positions"],
                                segment_ids=batch["segment_ids"], lora_enabled=lora_enabled)
        logits = model.logits_from_hidden(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, -1)
        picked = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        mask = batch["loss_mask"].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32) * mask
        return jnp.sum((lse - picked) * mask, -1), jnp.sum(mask, -1), jnp.sum(correct, -1)

    repl = shard_lib.replicated(mesh)
    return jax.jit(fn, static_argnums=(3,), out_shardings=(repl, repl, repl))


def evaluate(eval_fn, lora, rest, examples, *, batch_size: int, seq_len: int, pad_id: int,
             lora_enabled: bool = True) -> dict[str, float]:
    """Eval loss (per loss token) and exact match: every completion token is the argmax under
    teacher forcing -- exactly the examples greedy decoding would reproduce."""
    if not examples:
        return {}
    it = data_lib.BatchIterator(examples, batch_size=batch_size, seq_len=seq_len, pack=False,
                                group_by_length=False, shuffle=False, pad_id=pad_id, num_epochs=1)
    nll = tok = exact = rows = 0.0
    for batch in it:
        s, n, c = eval_fn(lora, rest, batch, lora_enabled)
        s, n, c = np.asarray(s), np.asarray(n), np.asarray(c)
        live = n > 0
        nll += s[live].sum()
        tok += n[live].sum()
        exact += (c[live] == n[live]).sum()
        rows += live.sum()
    return {"loss": float(nll / max(tok, 1)), "exact_match": float(exact / max(rows, 1)), "examples": int(rows)}


def _progress(total: int, initial: int):
    if jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def run(cfg: ConfigDict) -> dict[str, Any]:
    if cfg.get("objective", "sft") == "grpo":  # sampling and rewards: its own loop around the same step
        from qlora_jax.train.grpo_run import run_grpo

        return run_grpo(cfg)
    validate_config(cfg)
    done = already_finished(cfg)  # `make train` twice: say so, change nothing
    if done is not None:
        return done
    check_inputs(cfg)  # data files, init_from, a writable workdir: before the model is loaded
    workdir = Path(cfg.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    _setup_logging(workdir)
    t_start = time.perf_counter()

    mesh = shard_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    lora = lora_config_from(cfg)
    quantize = None if cfg.model.quantize in ("none", "") else cfg.model.quantize
    log.info("loading %s (quantize=%s, compute %s)", cfg.model.source, quantize, cfg.model.dtype)
    model, tokenizer = load_model(
        cfg.model.source, quantize=quantize, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
        lora=lora, mesh=mesh, shardings=sharding_fn(mesh), blocksize=cfg.model.blocksize,
        double_quant=cfg.model.double_quant, remat=cfg.model.remat, rng_seed=cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---- data ---------------------------------------------------------------------------------
    dpo = cfg.get("objective", "sft") == "dpo"
    if dpo:  # pairs; batch_size counts pairs (2 rows each)
        train_ex, eval_ex, it, pair_stats = pref_lib.prepare_data(cfg, tokenizer, pad_id)
        data_counts = pref_lib.data_summary(pair_stats)
    else:
        fmt = None if cfg.data.format == "auto" else cfg.data.format
        overflow = "drop" if cfg.data.drop_long else "truncate"
        train_ex, train_stats = data_lib.prepare_sft(
            cfg.data.train, tokenizer, max_length=cfg.data.max_length, format=fmt,
            train_on_prompt=cfg.data.train_on_prompt, overflow=overflow)
        eval_ex = []
        if cfg.data.eval:
            eval_ex, _ = data_lib.prepare_sft(cfg.data.eval, tokenizer, max_length=cfg.data.max_length,
                                              format=fmt, overflow=overflow)
            eval_ex = eval_ex[: cfg.data.max_eval_examples]
        it = data_lib.BatchIterator(
            train_ex, batch_size=cfg.train.batch_size, seq_len=cfg.data.max_length, pack=cfg.data.pack,
            group_by_length=cfg.data.group_by_length, pad_to_multiple_of=cfg.data.pad_to_multiple_of,
            pad_id=pad_id, seed=cfg.seed)
        data_counts = {"train_examples": train_stats.kept, "truncated": train_stats.truncated,
                       "dropped": train_stats.dropped_too_long + train_stats.dropped_no_completion}
    accum = cfg.train.grad_accum
    if cfg.train.max_steps > 0:
        total_steps = cfg.train.max_steps
    else:
        total_steps = max(1, math.ceil(cfg.train.epochs * it.steps_per_epoch / accum))

    # ---- optimizer, step functions, checkpoints ---------------------------------------------------
    tx, schedule = make_optimizer(
        lr=cfg.optim.lr, total_steps=total_steps, warmup_ratio=cfg.optim.warmup_ratio,
        schedule=cfg.optim.schedule, weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.max_grad_norm, b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps)
    objective = loop.SFT
    if dpo:
        objective = pref_lib.DPOObjective(
            beta=float(cfg.dpo.beta), loss_type=cfg.dpo.loss_type, label_smoothing=float(cfg.dpo.label_smoothing),
            frozen_adapters=cfg.dpo.reference == "init" or (cfg.dpo.reference == "auto" and bool(cfg.model.init_from)))
    fns, lora_state, rest, opt_state = loop.make_step_fns(model, tx, mesh, offload_optimizer=cfg.optim.offload,
                                                          objective=objective)
    eval_fn = _eval_fn(fns.graphdef, mesh)
    del model
    ckpts = ckpt_lib.RunCheckpoints(workdir, keep=cfg.train.keep_checkpoints)
    record = lora_record(lora, cfg)
    start = 0
    # The run's PRNG key, kept as host numpy (uint32 key data) and saved replicated; per-step keys
    # are fold_in(key, step), so a resumed run draws the same dropout masks.
    repl = shard_lib.replicated(mesh)
    base_key = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    # DPO with a frozen-adapter reference: a copy of the starting adapters, saved with the train state.
    ref_lora = None
    stopper = pref_lib.EarlyStopping(patience=int(cfg.train.get("early_stopping_patience", 0)))
    latest = ckpts.latest_step()
    if latest is None:  # from step 0: an attempt killed before its first checkpoint left rows behind
        drop_records_after(workdir, -1)
    if latest is not None:
        meta = ckpts.read_meta(latest)
        ckpt_lib.check_lora_record(meta.get("lora", {}), record, f"{ckpts.directory / str(latest)}")
        abstract_train = {"opt_state": ckpt_lib.abstract_like(opt_state),
                          "rng": jax.ShapeDtypeStruct(base_key.shape, base_key.dtype, sharding=repl)}
        if objective.frozen_adapters:
            abstract_train["ref_lora"] = ckpt_lib.abstract_like(lora_state)
        lora_state, train_state, meta = ckpts.restore(latest, ckpt_lib.abstract_like(lora_state), abstract_train)
        opt_state, base_key = train_state["opt_state"], np.asarray(train_state["rng"])
        ref_lora = train_state.get("ref_lora")
        it.restore(meta["data"])
        start = int(meta["step"])
        stopper = pref_lib.EarlyStopping.from_state(meta.get("early_stopping"), stopper.patience)
        if start >= total_steps or stopper.stopped:  # finished (the config asks for no more steps)
            done = finished_summary(workdir)
            if done is not None and done["final_step"] == start:
                ckpts.close()
                return report_already_finished(workdir, done)
        drop_records_after(workdir, start)
        log.info("resumed from %s at step %d", ckpts.directory / str(latest), start)
    elif cfg.model.init_from:
        lora_state, where = ckpt_lib.init_adapters_from(cfg.model.init_from, ckpt_lib.abstract_like(lora_state), record)
        log.info("adapters initialised from %s", where)
    if objective.frozen_adapters and ref_lora is None:
        ref_lora = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=fns.lora_shardings)(lora_state)
        log.info("DPO reference: the starting adapters, frozen")
    step_extra = (ref_lora,) if objective.frozen_adapters else ()

    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora_state))
    n_frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(rest))
    summary = {
        "model": str(cfg.model.source), "quantize": quantize, "blocksize": cfg.model.blocksize,
        "double_quant": cfg.model.double_quant, "compute_dtype": cfg.model.dtype,
        "trainable_params": n_lora, "frozen_state_bytes": int(n_frozen_bytes),
        "mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
        **data_counts, "eval_examples": len(eval_ex), "micro_batches_per_epoch": it.steps_per_epoch,
        "grad_accum": accum, "total_steps": total_steps,
        "warmup_steps": warmup_steps(total_steps, cfg.optim.warmup_ratio),
        "max_steps": cfg.train.max_steps, "epochs": cfg.train.epochs,
    }
    if dpo:
        summary.update(objective="dpo", dpo={"beta": objective.beta, "loss_type": objective.loss_type,
                                             "label_smoothing": objective.label_smoothing},
                       reference="frozen starting adapters" if objective.frozen_adapters else "adapters off")
    log.info("run: %s", json.dumps(summary))
    metrics = MetricsWriter(workdir)
    eval_kw = dict(batch_size=cfg.train.batch_size, seq_len=cfg.data.max_length, pad_id=pad_id)
    if dpo:
        pref_eval = pref_lib.PreferenceEvaluator(fns.graphdef, mesh, eval_ex, objective,
                                                 pad_to_multiple_of=cfg.data.pad_to_multiple_of, **eval_kw)

        def run_eval(adapters):
            return pref_eval(adapters, rest, ref_lora)

        eval_row = pref_lib.eval_row
    else:
        def run_eval(adapters):
            return evaluate(eval_fn, adapters, rest, eval_ex, **eval_kw)

        def eval_row(ev):
            return {"eval_loss": ev["loss"], "eval_exact_match": ev["exact_match"]}

    def keep_if_best(ev, at_step):  # DPO: the adapters of the best held-out reward accuracy
        if dpo and stopper.update(at_step, ev["reward_accuracy"]):
            _save_adapter(fns, lora_state, rest, workdir / "best_adapter", cfg, {"step": at_step, **ev})
            log.info("step %d: new best held-out reward accuracy %.1f%% -> %s", at_step,
                     100 * ev["reward_accuracy"], workdir / "best_adapter")

    before = {}
    if start == 0 and eval_ex:
        t_eval = time.perf_counter()
        before = run_eval(lora_state)
        if dpo:
            log.info("eval before training: loss %.4f, reward accuracy %.1f%%, log-prob accuracy %.1f%% (%.0f s)",
                     before["loss"], 100 * before["reward_accuracy"], 100 * before["logp_accuracy"],
                     time.perf_counter() - t_eval)
        else:
            log.info("eval before training: loss %.4f, exact match %.1f%%", before["loss"], 100 * before["exact_match"])
        metrics.write(0, eval_row(before))
        (workdir / "eval_before.json").write_text(json.dumps(before))
    elif (workdir / "eval_before.json").exists():
        before = json.loads((workdir / "eval_before.json").read_text())

    # ---- the loop ---------------------------------------------------------------------------------
    bar = _progress(total_steps, start)
    step = start
    tokens_seen = 0.0
    t_loop = t_prev = time.perf_counter()
    failure = None
    last_eval = None  # (step, metrics) of the newest evaluation in the loop
    try:
        with loop.GracefulExit() as stop:
            def next_batch():
                """The next step's batch, its real-token count and the data position after it."""
                host = loop.stack_microbatches([next(it) for _ in range(accum)], pad_id)
                return (loop.process_local_batch(host, fns.batch_sharding),
                        float((host["segment_ids"] > 0).sum()), it.state())

            upcoming = next_batch() if step < total_steps else None
            while step < total_steps and not stopper.stopped:
                batch, tokens_in_batch, data_state = upcoming
                key = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base_key), step)))
                lora_state, opt_state, m = fns.train_step(lora_state, opt_state, rest, batch, key, *step_extra)
                # The step runs asynchronously: build the next batch on the host meanwhile, then
                # wait for this step's scalars (the only device -> host transfer of a step).
                upcoming = next_batch() if step + 1 < total_steps else None
                m = jax.device_get(m)
                if not bool(m["finite"]):
                    failure = step + 1
                    raise non_finite_stop(ckpts, f"non-finite loss or gradient at step {step + 1} (loss="
                                          f"{float(m['loss'])}, grad_norm={float(m['grad_norm'])})",
                                          failed_step=step + 1, bad_checkpoint=step)
                step += 1
                tokens_seen += float(m["tokens"])
                now = time.perf_counter()
                row = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                       "lr": float(schedule(step - 1)), "loss_tokens": float(m["tokens"]),
                       "tokens_per_s": tokens_in_batch / max(now - t_prev, 1e-9)}
                if dpo:
                    row.update(pref_lib.step_metrics(m))
                t_prev = now
                if step % cfg.train.log_every == 0 or step == total_steps:
                    metrics.write(step, row)
                if step == _FAULT_KILL_AT_STEP:  # fault injection for the resume test: die like a preempted VM
                    os.kill(os.getpid(), signal.SIGKILL)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and eval_ex and step < total_steps:
                    ev = run_eval(lora_state)
                    metrics.write(step, eval_row(ev))
                    keep_if_best(ev, step)
                    last_eval = (step, ev)
                    if stopper.stopped:
                        log.info("early stopping at step %d: no better held-out reward accuracy in %d evaluations "
                                 "(best %.1f%% at step %d)", step, stopper.patience, 100 * stopper.best,
                                 stopper.best_step)
                if (step % cfg.train.checkpoint_every == 0 or step == total_steps or stop.requested
                        or stopper.stopped):
                    if not ckpt_lib.all_finite((lora_state, opt_state)):
                        failure = step
                        raise non_finite_stop(ckpts, f"non-finite adapters or optimizer state after step {step} "
                                              "(not saved)", failed_step=step)
                    rng = jax.make_array_from_process_local_data(repl, base_key)
                    train_state = {"opt_state": opt_state, "rng": rng}
                    meta = {"step": step, "data": data_state, "lora": record}
                    if objective.frozen_adapters:
                        train_state["ref_lora"] = ref_lora
                    if dpo:
                        meta["early_stopping"] = stopper.state()
                    ckpts.save(step, lora_state, train_state, meta)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                    bar.update(1)
                if stop.requested:
                    log.info("stop requested: checkpoint written at step %d", step)
                    break
    finally:
        if bar is not None:
            bar.close()
        ckpts.wait()
        metrics.close()
    train_seconds = time.perf_counter() - t_loop

    # ---- after -----------------------------------------------------------------------------------
    result: dict[str, Any] = {**summary, "final_step": step, "train_seconds": round(train_seconds, 1),
                              "failure_step": failure}
    finished = step >= total_steps or stopper.stopped
    result["finished"] = finished
    if stopper.stopped:
        result["early_stopped_at"] = step
    rows = read_metrics(workdir / "metrics.jsonl")
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]  # skip compile steps
    result["tokens_per_s_median"] = float(np.median(tps)) if tps else None
    if finished and eval_ex and last_eval is not None and last_eval[0] == step:  # early stop: just evaluated
        result["eval_before"], result["eval_after"] = before, last_eval[1]
    elif finished and eval_ex:
        after = run_eval(lora_state)
        metrics = MetricsWriter(workdir, tensorboard=False)
        metrics.write(step, eval_row(after))
        result["eval_before"], result["eval_after"] = before, after
        if dpo and cfg.train.eval_every and not stopper.stopped:
            keep_if_best(after, step)
    if dpo and stopper.best_step >= 0:
        result["best"] = {"step": stopper.best_step, "eval_reward_accuracy": stopper.best,
                          "adapter_dir": str(workdir / "best_adapter")}
    if finished and cfg.train.export_peft:
        _save_adapter(fns, lora_state, rest, workdir / "adapter", cfg)
        result["adapter_dir"] = str(workdir / "adapter")
    plot = plot_loss(workdir, ylabel="DPO loss per pair" if dpo else None)
    result["loss_plot"] = str(plot) if plot else None
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    ckpts.close()
    _print_end(result)
    return result


def _save_adapter(fns, lora_state, rest, out: Path, cfg: ConfigDict, eval_metrics: dict | None = None) -> None:
    from qlora_jax.checkpoints.peft_io import save_peft_adapter

    merged = nnx.merge(fns.graphdef, lora_state, rest)
    save_peft_adapter(merged, out, base_model=str(cfg.model.source))
    if eval_metrics is not None and jax.process_index() == 0:
        (out / "eval_metrics.json").write_text(json.dumps(eval_metrics, indent=2))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows of steps after the restored one (they are recomputed)."""
    if not path.exists() or jax.process_index() != 0:
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def drop_records_after(workdir: Path, step: int) -> None:
    """Before training from ``step`` (-1: from scratch), drop what an earlier attempt recorded
    after it: metric rows (evaluations before training included, when from scratch),
    ``eval_completions/step_N.jsonl`` with N > step, and ``eval_before.json``. They are recomputed."""
    if jax.process_index() != 0:
        return
    path = workdir / "metrics.jsonl"
    n_rows = len(read_metrics(path))
    _truncate_metrics(path, step)
    dropped = n_rows - len(read_metrics(path))
    for f in sorted((workdir / "eval_completions").glob("step_*.jsonl")):
        if f.stem[5:].isdigit() and int(f.stem[5:]) > step:
            f.unlink()
            dropped += 1
    if step < 0 and (workdir / "eval_before.json").exists():
        (workdir / "eval_before.json").unlink()
    if dropped:
        log.info("dropped %d metric rows / evaluation files of an earlier attempt after step %d", dropped, max(step, 0))


def _checkpoint_steps(workdir: Path) -> list[int]:
    """Steps of the finished Orbax checkpoints (``checkpoints/<step>``; unfinished ones have other names)."""
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def finished_summary(workdir: Path) -> dict[str, Any] | None:
    """``summary.json`` of a run in ``workdir`` that finished, if its newest checkpoint (when it has
    any) is the step it finished at; else None. Reads two small things, loads nothing."""
    try:
        summary = json.loads((workdir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("final_step"), int):
        return None
    final = summary["final_step"]
    finished = summary.get("finished")
    if finished is None:  # a summary written before the flag
        finished = final >= summary.get("total_steps", final + 1) or bool(summary.get("early_stopped_at"))
    steps = _checkpoint_steps(workdir)
    return summary if finished and (not steps or steps[-1] == final) else None


def already_finished(cfg: ConfigDict) -> dict[str, Any] | None:
    """If ``cfg.workdir`` holds a finished run of the length ``cfg`` asks for, say so (stdout) and
    return its summary (with ``already_finished: True``); nothing is loaded or written. A finished
    run asked for another length resumes from its newest checkpoint (None), or, with none left,
    is refused: starting over would replace its records. Else None."""
    workdir = Path(cfg.workdir).absolute()
    summary = finished_summary(workdir)
    if summary is None:
        return None
    max_steps = cfg.train.max_steps
    if max_steps > 0:
        same_length = summary.get("total_steps") == max_steps
    else:  # derived from epochs (a summary that does not record them: assume the same)
        same_length = (summary.get("max_steps", max_steps) <= 0
                       and summary.get("epochs", cfg.train.get("epochs")) == cfg.train.get("epochs"))
    if same_length:
        return report_already_finished(workdir, summary)
    if not _checkpoint_steps(workdir):  # training from scratch would replace the finished run's records
        raise ConfigError(f"config.workdir={workdir} holds a finished run of {summary['final_step']} steps and no "
                          "checkpoint to continue it from; start a new run: --config.workdir=<new dir>")
    return None


def report_already_finished(workdir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    if jax.process_index() == 0:
        how = " (early stopped)" if summary.get("early_stopped_at") else ""
        lines = [f"already finished: the run in {workdir} trained {summary['final_step']}/"
                 f"{summary.get('total_steps', summary['final_step'])} steps{how}; nothing was changed",
                 f"summary        {workdir / 'summary.json'}"]
        if summary.get("adapter_dir") and Path(summary["adapter_dir"]).is_dir():
            lines.append(f"PEFT adapter   {summary['adapter_dir']}")
        lines.append("to train again, start a new run: --config.workdir=<new dir>")
        print("\n".join(lines), flush=True)
    return {**summary, "already_finished": True}


def non_finite_stop(ckpts: ckpt_lib.RunCheckpoints, what: str, *, failed_step: int,
                    bad_checkpoint: int | None = None) -> loop.NonFiniteLoss:
    """The error ending a run whose loss or state stopped being finite at ``failed_step``.

    Every saved checkpoint has finite adapters and optimizer state (checked before saving), but
    the one at ``bad_checkpoint`` holds the adapters that gave the non-finite loss (with a huge lr,
    finite values near 1e38): resuming from it would fail the same way, so it is removed. The
    message names the newest checkpoint left, the one a rerun resumes from.
    """
    ckpts.wait()
    what += "; stopped"
    if bad_checkpoint is not None and bad_checkpoint in ckpts.all_steps():
        ckpts.delete(bad_checkpoint)
        what += f"; removed checkpoint {bad_checkpoint}, whose adapters gave it"
    good = ckpts.latest_step()
    if good is None:
        where = "no checkpoint with finite adapters and optimizer state is left; a rerun starts from step 0"
    else:
        where = (f"the newest checkpoint with finite adapters and optimizer state is step {good}; "
                 "resume continues from it")
    return loop.NonFiniteLoss(f"{what}; {where} (the same config stops at step {failed_step} again: "
                              "lower --config.optim.lr)")


def _print_end(r: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    tps = r["tokens_per_s_median"]  # None for runs of <= 2 steps (compile steps are not counted)
    speed = f"median {tps:.0f} tokens/s" if tps else "too few steps for a tokens/s median"
    lines = [f"done: {r['final_step']}/{r['total_steps']} steps in {r['train_seconds']} s ({speed})"]
    if r.get("early_stopped_at"):
        lines.append(f"early stopped  at step {r['early_stopped_at']} (no better held-out reward accuracy)")
    if "eval_after" in r and r.get("eval_before") and "reward_accuracy" in r["eval_after"]:
        b, a = r["eval_before"], r["eval_after"]
        lines.append(f"DPO eval loss  {b['loss']:.4f} -> {a['loss']:.4f}")
        lines.append(f"reward acc.    {100 * b['reward_accuracy']:.1f}% -> {100 * a['reward_accuracy']:.1f}% "
                     f"of {a['examples']} held-out pairs (beta*logratio chosen > rejected)")
        lines.append(f"log-prob acc.  {100 * b['logp_accuracy']:.1f}% -> {100 * a['logp_accuracy']:.1f}% "
                     "(policy log p(chosen) > log p(rejected))")
        lines.append(f"reward margin  {b['reward_margin']:.3f} -> {a['reward_margin']:.3f}")
    elif "eval_after" in r and r.get("eval_before"):
        b, a = r["eval_before"], r["eval_after"]
        lines.append(f"eval loss      {b['loss']:.4f} -> {a['loss']:.4f}")
        lines.append(f"exact match    {100 * b['exact_match']:.1f}% -> {100 * a['exact_match']:.1f}% "
                     f"of {a['examples']} held-out examples (greedy answer == reference)")
    if r.get("adapter_dir"):
        lines.append(f"PEFT adapter   {r['adapter_dir']}")
    if r.get("best"):
        lines.append(f"best adapter   {r['best']['adapter_dir']} (step {r['best']['step']}, reward accuracy "
                     f"{100 * r['best']['eval_reward_accuracy']:.1f}%)")
    if r.get("loss_plot"):
        lines.append(f"loss curve     {r['loss_plot']}")
    print("\n".join(lines), flush=True)


__all__ = ["ConfigError", "already_finished", "drop_records_after", "evaluate", "finished_summary",
           "lora_config_from", "non_finite_stop", "run"]

"""The one training run: ``run(config)`` is what ``python -m qlora_jax.train --config ...`` calls.

Whatever the objective (``config.objective``: "sft", "dpo", "orpo", "cpo", "kto" or "grpo";
``train/tasks.py``), a run is the same sequence, written once here:

1. check the config (``train/config.py``, every bad key in one message) and the inputs; a run
   directory holding a finished run of the same length is reported and left untouched;
2. load the base model onto the mesh (NF4, tensor by tensor) with fresh adapters;
3. build the task's data, the optimizer and the jit'd step (``train/loop.py``);
4. resume from the newest checkpoint of ``config.workdir`` (adapters, optimizer state, RNG, data
   position, the task's own state), or start from another run's adapters (``model.init_from``,
   the Stage-1 -> Stage-2 handoff), or from scratch;
5. evaluate before training, then loop: batch -> step -> metrics -> evaluation -> checkpoint,
   stopping cleanly on SIGTERM (checkpoint written) and on a non-finite loss (exit 3, naming the
   checkpoint a rerun resumes from);
6. evaluate after, export the adapters in PEFT format, plot, write ``summary.json``, print the
   figures that matter.

The run directory is read and written through ``checkpoints/run_dir.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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

from qlora_jax.checkpoints import run_dir
from qlora_jax.checkpoints.load import load_model
from qlora_jax.checkpoints.peft_io import save_peft_adapter
from qlora_jax.data.tokenize import pad_id_of
from qlora_jax.train import loop
from qlora_jax.train import sharding as shard_lib
from qlora_jax.train.config import ConfigError, RunConfig, check_inputs
from qlora_jax.train.metrics import MetricsWriter, plot_loss
from qlora_jax.train.optim import make_optimizer, warmup_steps
from qlora_jax.train.tasks import Task, eval_row, make_task

log = logging.getLogger("qlora_jax.train")
# Testing hook: SIGKILL this process right after optimizer step N (0 = never).
_FAULT_KILL_AT_STEP = int(os.environ.get("QLORA_FAULT_KILL_AT_STEP", "0"))


def run(cfg: ConfigDict | RunConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the run's summary (also written to ``summary.json``)."""
    rc = cfg if isinstance(cfg, RunConfig) else RunConfig.from_config(cfg)
    done = already_finished(rc)  # `make train` twice: say so, change nothing
    if done is not None:
        return done
    if not isinstance(cfg, RunConfig):
        check_inputs(cfg)  # data files, init_from, a writable workdir: before the model is loaded
    return _train(rc)


def load_for_training(rc: RunConfig, mesh: jax.sharding.Mesh):
    """(model with fresh adapters on the mesh, tokenizer)."""
    m = rc.model
    log.info("loading %s (quantize=%s, compute %s)", m.source, m.quantize, m.dtype)
    return load_model(m.source, quantize=m.quantize, dtype=m.dtype, param_dtype=m.param_dtype, lora=rc.lora,
                      mesh=mesh, shardings=shard_lib.param_sharding_fn(mesh), blocksize=m.blocksize,
                      double_quant=m.double_quant, remat=m.remat, attention_impl=m.attention_impl,
                      quant_matmul_impl=m.quant_matmul_impl,
                      rng_seed=rc.seed)


def _train(rc: RunConfig) -> dict[str, Any]:
    rc.workdir.mkdir(parents=True, exist_ok=True)
    _attach_run_log(rc.workdir)
    return _train_logged(rc)


def _train_logged(rc: RunConfig) -> dict[str, Any]:
    workdir = rc.workdir
    t_start = time.perf_counter()

    mesh = shard_lib.make_mesh(*rc.mesh)
    model, tokenizer = load_for_training(rc, mesh)
    pad_id = pad_id_of(tokenizer)
    task = make_task(rc, tokenizer, pad_id)
    total_steps = task.total_steps()
    o = rc.optim
    tx, schedule = make_optimizer(lr=o.lr, total_steps=total_steps, warmup_ratio=o.warmup_ratio,
                                  schedule=o.schedule, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
                                  b1=o.b1, b2=o.b2, eps=o.eps, loraplus_lr_ratio=o.loraplus_lr_ratio)
    layout = loop.frozen_layout_for(jax.default_backend(), mesh.devices.shape)  # "auto": TPU, data parallel
    fns, lora_state, rest, opt_state = loop.make_step_fns(model, tx, mesh, offload_optimizer=o.offload,
                                                          objective=task.objective, frozen_layout=layout,
                                                          example_batch=(rc.train.batch_size, rc.data.max_length))
    del model
    task.bind(fns.graphdef, mesh, rest)
    frozen_ref = task.objective.frozen_adapters

    # ---- resume, hand off, or start ----------------------------------------------------------------
    ckpts = run_dir.RunCheckpoints(workdir, keep=rc.train.keep_checkpoints)
    record = rc.lora_record()
    # The run's PRNG key, kept as host numpy (uint32 key data) and saved replicated; per-step keys
    # are fold_in(key, step), so a resumed run draws the same dropout masks.
    repl = shard_lib.replicated(mesh)
    base_key = np.asarray(jax.random.key_data(jax.random.key(rc.seed)))
    ref_lora, start = None, 0
    latest = ckpts.latest_step()
    if latest is None:  # from step 0: an attempt killed before its first checkpoint left rows behind
        _drop_records_after(workdir, -1)
    else:
        meta = ckpts.read_meta(latest)
        run_dir.check_lora_record(meta.get("lora", {}), record, f"{ckpts.directory / str(latest)}")
        _check_optimizer_groups(meta, rc.optim.loraplus_lr_ratio, ckpts.directory / str(latest))
        abstract_train = {"opt_state": run_dir.abstract_like(opt_state),
                          "rng": jax.ShapeDtypeStruct(base_key.shape, base_key.dtype, sharding=repl)}
        if frozen_ref:
            abstract_train["ref_lora"] = run_dir.abstract_like(lora_state)
        lora_state, train_state, meta = ckpts.restore(latest, run_dir.abstract_like(lora_state), abstract_train)
        opt_state, base_key = train_state["opt_state"], np.asarray(train_state["rng"])
        ref_lora = train_state.get("ref_lora")
        start = int(meta["step"])
        try:
            task.restore(meta, start)
        except ValueError as err:  # the data (or its batching) changed since the checkpoint
            raise run_dir.CheckpointMismatch(
                f"{ckpts.directory / str(latest)}: {err}; resume with the data and batch settings it was trained "
                "with, or start a new run: --config.workdir=<new dir>") from err
        if start >= total_steps or task.stopped:  # finished (the config asks for no more steps)
            done = run_dir.finished_summary(workdir)
            if done is not None and done["final_step"] == start:
                ckpts.close()
                return report_already_finished(workdir, done)
        _drop_records_after(workdir, start)
        log.info("resumed from %s at step %d", ckpts.directory / str(latest), start)
    if latest is None and rc.model.init_from:
        lora_state, where = run_dir.init_adapters_from(rc.model.init_from, run_dir.abstract_like(lora_state), record)
        log.info("adapters initialised from %s", where)
    if frozen_ref and ref_lora is None:
        ref_lora = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=fns.lora_shardings)(lora_state)
        log.info("reference policy: the starting adapters, frozen")
    step_extra = (ref_lora,) if frozen_ref else ()

    m_cfg = rc.model
    summary = {
        "model": m_cfg.source, "quantize": m_cfg.quantize, "blocksize": m_cfg.blocksize,
        "double_quant": m_cfg.double_quant, "compute_dtype": m_cfg.dtype,
        "trainable_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora_state)),
        "frozen_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(rest))),
        "mesh": dict(mesh.shape), "devices": jax.device_count(), "processes": jax.process_count(),
        **task.summary(), "grad_accum": rc.train.grad_accum, "total_steps": total_steps,
        "warmup_steps": warmup_steps(total_steps, o.warmup_ratio), "max_steps": rc.train.max_steps,
        "epochs": rc.train.epochs,
    }
    if o.loraplus_lr_ratio:
        summary["loraplus_lr_ratio"] = o.loraplus_lr_ratio
    log.info("run: %s", json.dumps(summary))
    metrics = MetricsWriter(workdir, wandb_project=rc.train.wandb_project, wandb_mode=rc.train.wandb_mode,
                            run_config={**summary, "lora": record, "optim": dataclasses.asdict(o)})
    try:
        def save_best(eval_metrics: dict[str, Any]) -> Path:
            out = workdir / run_dir.BEST_ADAPTER_DIR
            _save_adapter(fns, lora_state, rest, out, rc, eval_metrics)
            return out

        def evaluate(at_step: int) -> dict[str, Any]:
            ev = task.evaluate(lora_state, ref_lora, at_step)
            metrics.write(at_step, eval_row(ev))
            return ev

        before = {}
        if start == 0 and task.has_eval:
            before = evaluate(0)
            run_dir.write_json(workdir / run_dir.EVAL_BEFORE_FILE, before)
            if rc.train.eval_every:  # evaluations during the run pick a best adapter
                task.after_first_eval(before, save_best)
        elif task.has_eval:
            before = run_dir.read_eval_before(workdir)

        # ---- the loop ---------------------------------------------------------------------------------
        bar = _progress(total_steps, start)
        step, failure, last_eval = start, None, None  # last_eval: (step, metrics) of the newest in-loop evaluation
        t_loop = t_prev = time.perf_counter()
        try:
            with loop.GracefulExit() as stop:
                def fetch(at_step):
                    return task.next_batch(at_step, lora_state, ref_lora)

                upcoming = fetch(step) if task.prefetch and step < total_steps else None
                while step < total_steps and not task.stopped:
                    batch = upcoming if task.prefetch else fetch(step)
                    key = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base_key), step)))
                    lora_state, opt_state, m = fns.train_step(
                        lora_state, opt_state, rest, loop.process_local_batch(batch.arrays, fns.batch_sharding), key,
                        *step_extra)
                    # The step runs asynchronously: build the next batch on the host meanwhile (when it does
                    # not depend on this step's adapters), then wait for this step's scalars.
                    if task.prefetch:
                        upcoming = fetch(step + 1) if step + 1 < total_steps else None
                    m = jax.device_get(m)
                    if not bool(m["finite"]):
                        failure = step + 1
                        raise non_finite_stop(ckpts, f"non-finite loss or gradient at step {step + 1} (loss="
                                              f"{float(m['loss'])}, grad_norm={float(m['grad_norm'])})",
                                              failed_step=step + 1, bad_checkpoint=step)
                    step += 1
                    now = time.perf_counter()
                    row = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                           "lr": float(schedule(step - 1)),
                           **task.step_row(m, batch, now - t_prev)}
                    t_prev = now
                    if step % rc.train.log_every == 0 or step == total_steps:
                        metrics.write(step, row)
                    if step == _FAULT_KILL_AT_STEP:  # fault injection for the resume tests: die like a preempted VM
                        os.kill(os.getpid(), signal.SIGKILL)
                    if rc.train.eval_every and step % rc.train.eval_every == 0 and task.has_eval and step < total_steps:
                        ev = evaluate(step)
                        task.after_eval(ev, step, save_best)
                        last_eval = (step, ev)
                    if (step % rc.train.checkpoint_every == 0 or step == total_steps or stop.requested
                            or task.stopped):
                        if not run_dir.all_finite((lora_state, opt_state)):
                            failure = step
                            raise non_finite_stop(ckpts, f"non-finite adapters or optimizer state after step {step} "
                                                  "(not saved)", failed_step=step)
                        train_state = {"opt_state": opt_state,
                                       "rng": jax.make_array_from_process_local_data(repl, base_key)}
                        if frozen_ref:
                            train_state["ref_lora"] = ref_lora
                        ckpts.save(step, lora_state, train_state,
                                   {"step": step, **batch.meta, **task.checkpoint_meta(), "lora": record,
                                    "loraplus_lr_ratio": rc.optim.loraplus_lr_ratio})
                    if bar is not None:
                        bar.set_postfix(**task.postfix(row))
                        bar.update(1)
                    if stop.requested:
                        log.info("stop requested: checkpoint written at step %d", step)
                        break
        finally:
            if bar is not None:
                bar.close()
            ckpts.wait()
        train_seconds = time.perf_counter() - t_loop

        # ---- after -----------------------------------------------------------------------------------
        finished = step >= total_steps or task.stopped
        result: dict[str, Any] = {**summary, "final_step": step, "train_seconds": round(train_seconds, 1),
                                  "failure_step": failure, "finished": finished}
        if task.stopped:
            result["early_stopped_at"] = step
        if finished and task.has_eval:
            if last_eval is not None and last_eval[0] == step:  # just evaluated (an early stop, or eval_every)
                after = last_eval[1]
            else:
                after = task.evaluate(lora_state, ref_lora, step)
                metrics.write(step, eval_row(after))
                if rc.train.eval_every and not task.stopped:
                    task.after_eval(after, step, save_best)
            result["eval_before"], result["eval_after"] = before, after
        task.finish(result, workdir)
        if finished and rc.train.export_peft:
            _save_adapter(fns, lora_state, rest, workdir / run_dir.ADAPTER_DIR, rc)
            result["adapter_dir"] = str(workdir / run_dir.ADAPTER_DIR)
        plot = plot_loss(workdir, ylabel=task.loss_label)
        result["loss_plot"] = str(plot) if plot else None
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        run_dir.write_json(workdir / run_dir.SUMMARY_FILE, result)
        ckpts.close()
        _print_end(task, result)
        return result
    finally:
        metrics.close()


def _save_adapter(fns, lora_state, rest, out: Path, rc: RunConfig, eval_metrics: dict | None = None) -> None:
    merged = nnx.merge(fns.graphdef, lora_state, rest)
    save_peft_adapter(merged, out, base_model=rc.model.source)
    if eval_metrics is not None and jax.process_index() == 0:
        (out / "eval_metrics.json").write_text(json.dumps(eval_metrics, indent=2))


def _check_optimizer_groups(meta: dict, ratio: float, where: Path) -> None:
    """LoRA+ gives B its own AdamW group: its optimizer state is another tree, which cannot be
    restored into the other layout. (A different nonzero ratio is a learning-rate change: allowed.)"""
    saved = float(meta.get("loraplus_lr_ratio", 0.0) or 0.0)  # checkpoints from before LoRA+: one group
    if (saved > 0) != (ratio > 0):
        raise run_dir.CheckpointMismatch(
            f"{where}: optim.loraplus_lr_ratio: checkpoint has {saved:g}, config has {ratio:g} (LoRA+ on/off "
            "changes the optimizer state's layout); resume with the checkpoint's setting, or start a new run: "
            "--config.workdir=<new dir>")


def _drop_records_after(workdir: Path, step: int) -> None:
    dropped = run_dir.drop_records_after(workdir, step)
    if dropped:
        log.info("dropped %d metric rows / evaluation files of an earlier attempt after step %d", dropped,
                 max(step, 0))


def already_finished(rc: RunConfig) -> dict[str, Any] | None:
    """If ``rc.workdir`` holds a finished run of the length ``rc`` asks for, say so (stdout) and
    return its summary (with ``already_finished: True``); nothing is loaded or written. A finished
    run asked for another length resumes from its newest checkpoint (None), or, with none left,
    is refused: starting over would replace its records. Else None."""
    if isinstance(rc, ConfigDict):
        rc = RunConfig.from_config(rc)
    workdir = rc.workdir
    summary = run_dir.finished_summary(workdir)
    if summary is None:
        return None
    max_steps = rc.train.max_steps
    if max_steps > 0:
        same_length = summary.get("total_steps") == max_steps
    else:  # derived from epochs (a summary that does not record them: assume the same)
        same_length = summary.get("max_steps", max_steps) <= 0 and summary.get("epochs", rc.train.epochs) == rc.train.epochs
    if same_length:
        return report_already_finished(workdir, summary)
    if not run_dir.checkpoint_steps(workdir):  # training from scratch would replace the finished run's records
        raise ConfigError(f"config.workdir={workdir} holds a finished run of {summary['final_step']} steps and no "
                          "checkpoint to continue it from; start a new run: --config.workdir=<new dir>")
    return None


def report_already_finished(workdir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    if jax.process_index() == 0:
        how = " (early stopped)" if summary.get("early_stopped_at") else ""
        lines = [f"already finished: the run in {workdir} trained {summary['final_step']}/"
                 f"{summary.get('total_steps', summary['final_step'])} steps{how}; nothing was changed",
                 f"summary        {workdir / run_dir.SUMMARY_FILE}"]
        if summary.get("adapter_dir") and Path(summary["adapter_dir"]).is_dir():
            lines.append(f"PEFT adapter   {summary['adapter_dir']}")
        lines.append("to train again, start a new run: --config.workdir=<new dir>")
        print("\n".join(lines), flush=True)
    return {**summary, "already_finished": True}


def non_finite_stop(ckpts: run_dir.RunCheckpoints, what: str, *, failed_step: int,
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


def _attach_run_log(workdir: Path) -> None:
    """The package's log goes to ``workdir/train.log`` from here until the next run of the process
    starts (each of the self-refinement pipeline's jobs gets its own file; an error reported after
    the run, by the command line, still lands in this run's file) and, on process 0, to stderr."""
    root = logging.getLogger("qlora_jax")
    for h in [h for h in root.handlers if getattr(h, "_qlora_run", False)]:
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.INFO)
    root.propagate = False  # absl's root handler would print every line twice
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if jax.process_index() == 0 and not any(getattr(h, "_qlora_stderr", False) for h in root.handlers):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._qlora_stderr = True  # type: ignore[attr-defined]
        root.addHandler(sh)
    fh = logging.FileHandler(workdir / "train.log")
    fh.setFormatter(fmt)
    fh._qlora_run = True  # type: ignore[attr-defined]
    root.addHandler(fh)


def _progress(total: int, initial: int):
    if jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def _print_end(task: Task, r: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    lines = task.end_lines(r)
    if r.get("adapter_dir"):
        lines.append(f"PEFT adapter   {r['adapter_dir']}")
    if r.get("best"):
        lines.append(f"best adapter   {r['best']['adapter_dir']} (step {r['best']['step']}, reward accuracy "
                     f"{100 * r['best']['eval_reward_accuracy']:.1f}%)")
    for key, label in (("reward_plot", "reward curve"), ("loss_plot", "loss curve")):
        if r.get(key):
            lines.append(f"{label:<14} {r[key]}")
    print("\n".join(lines), flush=True)


__all__ = ["ConfigError", "already_finished", "load_for_training", "non_finite_stop", "report_already_finished", "run"]

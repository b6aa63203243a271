"""Seed 000's two-stage self-refinement: K-fold x S-seed QLoRA SFT on a yes/no task, twice.

    python -m qlora_jax.pipelines.self_refine --config configs/self_refine.py[:demo] [--config.key=value]

Stage 1: for every (fold f, seed s), train adapters on every fold but f (``qlora_jax.train.trainer``
with a per-job workdir and a per-job train.jsonl), then score fold f with the yes/no objective.
The K held-out folds of seed s together give one out-of-fold prediction per sample: the Stage-1
pseudo-labels of seed s.

Stage 2: the prompts are refined with each sample's own out-of-fold Stage-1 prediction
(``pipeline.stage2_template``). Job (f, s) starts from the Stage-1 adapters of (f, s)
(``model.init_from``), trains on the other folds' refined prompts and scores fold f's. No
sample's pseudo-label comes from a model that trained on that sample: the label of a sample of
fold g is produced by job (g, s), which never saw fold g. (One step removed, fold f's labels do
reach Stage-2 job (f, s): the Stage-1 jobs (g != f, s) that label its training prompts trained on
fold f. Removing that needs nested cross-validation, K x (K - 1) Stage-1 models per seed, which
the seed does not describe.)

Training is ordinary SFT on a chat whose assistant turn is the answer word: the loss covers the
answer token and the template's end-of-turn token (as the trainer does for every assistant turn;
it keeps the model answering "yes<end>" in two tokens, the seed's max-2-token generation). The
end-of-turn token is the same after both answers and is learned in a few steps, after which only
the answer token carries gradient. Scoring masks the softmax to the two answer tokens
(``qlora_jax.objectives.yesno``).

Resumption is per (stage, fold, seed): a job is finished when its ``done.json`` exists and is
never run again; an interrupted job resumes inside the trainer from its own newest checkpoint.
``pipeline.shard="i/n"`` runs only the jobs with (seed * K + fold) % n == i, so n hosts sharing
the workdir split the work; Stage 2 of seed s waits (``pipeline.wait_minutes``) until every
Stage-1 fold of seed s is done, whichever host ran it. Every invocation ends by writing the
reports from the finished jobs (marked partial or complete); once all shards are done,
``--config.pipeline.report_only=True`` rebuilds them. See ``plan.py`` for the file layout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from qlora_jax.checkpoints.load import load_tokenizer
from qlora_jax.data import Conversation, encode_conversation
from qlora_jax.data.tokenize import encode
from qlora_jax.objectives.yesno import AnswerTokens, resolve_answer_tokens
from qlora_jax.pipelines import plan as plan_lib
from qlora_jax.pipelines import report as report_lib
from qlora_jax.pipelines.plan import Job, PlanError, Sample
from qlora_jax.pipelines.scoring import Scorer, prompt_text
from qlora_jax.train.config import lora_config_from, lora_record, model_section
from qlora_jax.train.trainer import run as train_run

log = logging.getLogger("qlora_jax.pipelines")

# Config keys that may change between the runs (or hosts) of one pipeline workdir; every other
# key fixes the results and must stay as recorded in plan.json.
VOLATILE_KEYS = ("workdir", "pipeline.shard", "pipeline.wait_minutes", "pipeline.report_only",
                 "pipeline.score_batch_size", "pipeline.trainer_eval", "train.log_every",
                 "train.checkpoint_every", "train.keep_checkpoints", "train.export_peft", "train.eval_every",
                 "train.generate_eval", "train.max_new_tokens", "data.max_eval_examples", "mesh.data",
                 "mesh.fsdp", "mesh.tensor", "optim.offload", "model.remat")
POLL_SECONDS = 30.0


class PipelineStopped(RuntimeError):
    """A trainer run stopped before its last step (SIGTERM): rerun the same command to resume."""


class WaitingForShards(RuntimeError):
    """Stage-1 folds run by other shards did not finish within pipeline.wait_minutes."""


# -- setup -------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _setup_logging(workdir: Path) -> None:
    if any(getattr(h, "_pipeline", None) == str(workdir) for h in log.handlers):
        return
    for h in list(log.handlers):
        if getattr(h, "_pipeline", None):
            log.removeHandler(h)
            h.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(workdir / "pipeline.log"), logging.StreamHandler(sys.stderr)):
        h.setFormatter(fmt)
        h._pipeline = str(workdir)  # type: ignore[attr-defined]
        log.addHandler(h)


def check_plan(workdir: Path, record: dict[str, Any]) -> None:
    """Write plan.json on the first start; on later starts require the same result-fixing settings.

    A key recorded in both with different values is an error. A key present on one side only (a
    config field added to or removed from the trainer since) is logged, not an error."""
    path = workdir / "plan.json"
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = [f"{k}: {saved[k]!r} -> {record[k]!r}" for k in sorted(set(saved) & set(record))
                 if saved[k] != record[k]]
        one_side = sorted(set(saved) ^ set(record))
        if one_side:
            log.info("config keys new or gone since %s was written (not checked): %s", path, ", ".join(one_side))
        if diffs:
            raise PlanError(f"{workdir} was started with other settings ({path}); use a new workdir or "
                            "restore them:\n  " + "\n  ".join(diffs))
    else:
        plan_lib.write_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


class Pipeline:
    """The state of one pipeline invocation: config, samples, folds, answers, the scorer."""

    def __init__(self, cfg: ConfigDict, train_fn: Callable[[ConfigDict], dict] | None = None):
        self.cfg = cfg
        p = cfg.pipeline
        self.workdir = Path(cfg.workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        _setup_logging(self.workdir)
        if p.seeds < 1:
            raise PlanError(f"pipeline.seeds={p.seeds}: need at least 1")
        plan_lib.parse_shard(p.shard)
        plan_lib.check_template(p.stage2_template)
        self.train_fn = train_fn
        self.K, self.S = int(p.folds), int(p.seeds)

        self.samples: list[Sample] = plan_lib.load_samples(
            p.data, id_field=p.id_field, prompt_field=p.prompt_field, label_field=p.label_field)
        self.folds = plan_lib.assign_folds([s.label for s in self.samples], self.K, p.fold_seed)
        self.fold_of = {s.id: int(f) for s, f in zip(self.samples, self.folds)}
        self.tokenizer = load_tokenizer(cfg.model.source)
        self.answers = self._resolve_answers()
        self.lora = lora_config_from(cfg)
        self.lora_record = lora_record(self.lora, model_section(cfg))
        self._check_lengths()
        record = {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in VOLATILE_KEYS}
        record.update({"samples": len(self.samples), "data_fingerprint": plan_lib.data_fingerprint(self.samples),
                       "answers": [self.answers.yes_text, self.answers.no_text,
                                   self.answers.yes_id, self.answers.no_id]})
        check_plan(self.workdir, record)
        plan_lib.write_if_changed(self.workdir / "folds.csv", plan_lib.folds_csv(self.samples, self.folds))
        self._scorer = None

    # -- checks ------------------------------------------------------------------------------
    def _resolve_answers(self) -> AnswerTokens:
        words = [w.strip() for w in str(self.cfg.pipeline.answer_words).split(",")]
        text = prompt_text(self.tokenizer, self.samples[0].prompt, self.cfg.pipeline.system_prompt)
        name = getattr(self.tokenizer, "name_or_path", "") or f"{self.cfg.model.source}'s tokenizer"
        return resolve_answer_tokens(lambda t: encode(self.tokenizer, t), text, words,
                                     tokenizer_name=f"tokenizer of {name}")

    def _example_length(self, prompt: str) -> int:
        row = plan_lib.chat_row("", prompt, self.answers.no_text, self.cfg.pipeline.system_prompt)
        ids, _ = encode_conversation(self.tokenizer, Conversation(tuple(row["messages"]), (len(row["messages"]) - 1,)))
        return len(ids)

    def _check_lengths(self) -> None:
        """Fail before any training if a Stage-1 or (worst-case) Stage-2 example would be truncated."""
        longest = max(self.samples, key=lambda s: len(s.prompt))
        worst = {"pred": "yes" if len(self.answers.yes_text) >= len(self.answers.no_text) else "no",
                 "llr": -123.456789, "p_yes": 0.123456789}
        max_len = self.cfg.data.max_length
        for stage, prompt in ((1, longest.prompt),
                              (2, plan_lib.stage2_prompt(self.cfg.pipeline.stage2_template, longest.prompt,
                                                         worst, self.answers))):
            n = self._example_length(prompt)
            if n > max_len:
                raise PlanError(f"a Stage-{stage} example of sample {longest.id!r} has {n} tokens > "
                                f"data.max_length={max_len}: raise data.max_length or shorten the prompts")

    # -- jobs --------------------------------------------------------------------------------
    def job_done(self, job: Job) -> bool:
        d = job.dir(self.workdir)
        return (d / "done.json").exists() and (d / "predictions.csv").exists()

    def stage1_pseudo_labels(self, seed: int) -> dict[str, dict] | None:
        """Out-of-fold Stage-1 predictions of seed ``seed`` by sample id, or None if a fold is missing.

        Each sample's row must come from the job of its own fold (the model that did not train on it).
        """
        out: dict[str, dict] = {}
        for f in range(self.K):
            job = Job(1, seed, f)
            if not self.job_done(job):
                return None
            for r in plan_lib.read_predictions(job.dir(self.workdir) / "predictions.csv"):
                if self.fold_of[r["id"]] != f or r["fold"] != f:
                    raise PlanError(f"{job}: predictions.csv has sample {r['id']!r} of fold {self.fold_of[r['id']]}")
                out[r["id"]] = r
        missing = [s.id for s in self.samples if s.id not in out]
        if missing:
            raise PlanError(f"Stage-1 predictions of seed {seed} lack samples {missing[:5]}")
        return out

    def job_rows(self, job: Job) -> tuple[list[dict], list[dict]]:
        """(train rows, held-out rows) in the trainer's chat format, with the prompts of the job's stage."""
        p = self.cfg.pipeline
        pseudo = self.stage1_pseudo_labels(job.seed) if job.stage == 2 else None
        if job.stage == 2 and pseudo is None:
            raise PlanError(f"{job}: Stage-1 predictions of seed {job.seed} are incomplete")
        train, heldout = [], []
        for s in self.samples:
            extra: dict[str, Any] = {}
            prompt = s.prompt
            if pseudo is not None:
                r = pseudo[s.id]
                prompt = plan_lib.stage2_prompt(p.stage2_template, s.prompt, r, self.answers)
                extra = {"stage1_fold": r["fold"], "stage1_pred": r["pred"], "stage1_llr": r["llr"]}
            row = plan_lib.chat_row(s.id, prompt, self.answers.text(s.label), p.system_prompt, **extra)
            (heldout if self.fold_of[s.id] == job.fold else train).append(row)
        return train, heldout

    def trainer_config(self, job: Job) -> ConfigDict:
        c = ConfigDict(self.cfg.to_dict())
        del c["pipeline"]
        d = job.dir(self.workdir)
        c.workdir = str(d)
        c.seed = int(self.cfg.seed) + job.seed
        c.data.train = str(d / "train.jsonl")
        c.data.eval = str(d / "heldout.jsonl") if self.cfg.pipeline.trainer_eval else ""
        c.data.format = "chat"
        c.train.epochs = float(self.cfg.pipeline.stage1_epochs if job.stage == 1 else self.cfg.pipeline.stage2_epochs)
        c.model.init_from = str(Job(1, job.seed, job.fold).dir(self.workdir)) if job.stage == 2 else ""
        return c

    @property
    def scorer(self):
        if self._scorer is None:

            self._scorer = Scorer(self.cfg, self.lora, self.lora_record)
        return self._scorer

    def run_job(self, job: Job) -> None:
        d = job.dir(self.workdir)
        t0 = time.perf_counter()
        train, heldout = self.job_rows(job)
        plan_lib.write_if_changed(d / "train.jsonl", plan_lib.jsonl(train))
        plan_lib.write_if_changed(d / "heldout.jsonl", plan_lib.jsonl(heldout))
        summary = _read_json(d / "summary.json")
        if _training_finished(d, summary):
            log.info("%s: training already finished (%s), scoring only", job, d / "summary.json")
        else:
            log.info("%s: training on %d samples (folds != %d), %s", job, len(train), job.fold,
                     f"adapters from {self.trainer_config(job).model.init_from}" if job.stage == 2 else "fresh adapters")
            train_fn = self.train_fn or train_run
            summary = train_fn(self.trainer_config(job))
            if summary.get("final_step", 0) < summary.get("total_steps", 1):
                raise PipelineStopped(f"{job}: the trainer stopped at step {summary.get('final_step')} of "
                                      f"{summary.get('total_steps')}; rerun the same command to resume")
        where = self.scorer.use_adapters(d)
        p = self.cfg.pipeline
        scores = self.scorer.score([r["messages"][-2]["content"] for r in heldout], self.answers,
                                   system_prompt=p.system_prompt, batch_size=p.score_batch_size,
                                   temperature=p.temperature)
        rows = []
        for i, r in enumerate(heldout):
            rows.append({"stage": job.stage, "seed": job.seed, "fold": job.fold, "id": r["id"],
                         "label": "yes" if r["messages"][-1]["content"] == self.answers.yes_text else "no",
                         "pred": "yes" if scores["pred_yes"][i] else "no", "llr": repr(float(scores["llr"][i])),
                         "log_p_yes": repr(float(scores["log_p_yes"][i])),
                         "log_p_no": repr(float(scores["log_p_no"][i])), "p_yes": repr(float(scores["p_yes"][i])),
                         "stage1_pred": r.get("stage1_pred"), "stage1_llr": r.get("stage1_llr")})
        plan_lib.write_atomic(d / "predictions.csv", plan_lib.predictions_csv(rows))
        metrics = report_lib.metrics_of_rows(plan_lib.read_predictions(d / "predictions.csv"))
        done = {"stage": job.stage, "fold": job.fold, "seed": job.seed, "train_seed": int(self.cfg.seed) + job.seed,
                "train_samples": len(train), "heldout_samples": len(heldout), "adapters": where,
                "final_step": summary.get("final_step"), "train_seconds": summary.get("train_seconds"),
                "job_seconds": round(time.perf_counter() - t0, 1), "shard": self.cfg.pipeline.shard,
                "metrics": metrics}
        plan_lib.write_atomic(d / "done.json", json.dumps(done, indent=1) + "\n")
        log.info("%s: done in %.0f s: held-out accuracy %.3f, AUROC %.3f, F1 %.3f, ECE %.3f, Brier %.3f", job,
                 done["job_seconds"], metrics["accuracy"], metrics["auroc"], metrics["f1"], metrics["ece"],
                 metrics["brier"])

    # -- the two stages ---------------------------------------------------------------------------
    def run_stage1(self) -> None:
        for job in plan_lib.shard_jobs(self.K, self.S, self.cfg.pipeline.shard, 1):
            if self.job_done(job):
                log.info("%s: done earlier, skipped", job)
                continue
            self.run_job(job)

    def run_stage2(self) -> None:
        """This shard's Stage-2 jobs, each once every Stage-1 fold of its seed is done."""
        pending = [j for j in plan_lib.shard_jobs(self.K, self.S, self.cfg.pipeline.shard, 2)]
        for job in [j for j in pending if self.job_done(j)]:
            log.info("%s: done earlier, skipped", job)
        pending = [j for j in pending if not self.job_done(j)]
        deadline = time.monotonic() + 60.0 * float(self.cfg.pipeline.wait_minutes)
        announced = set()
        while pending:
            ready = [j for j in pending if self.stage1_pseudo_labels(j.seed) is not None]
            if ready:
                self.run_job(ready[0])
                pending.remove(ready[0])
                continue
            waiting = sorted({j.seed for j in pending})
            missing = [str(Job(1, s, f)) for s in waiting for f in range(self.K) if not self.job_done(Job(1, s, f))]
            if time.monotonic() >= deadline:
                raise WaitingForShards(
                    "Stage 2 needs Stage-1 jobs that other shards have not finished: " + ", ".join(missing)
                    + f" (waited {self.cfg.pipeline.wait_minutes} min); rerun this command later to continue")
            if tuple(missing) not in announced:
                log.info("waiting for other shards: %s", ", ".join(missing))
                announced.add(tuple(missing))
            time.sleep(POLL_SECONDS)

    # -- reports ------------------------------------------------------------------------------
    def write_reports(self) -> dict[str, Any]:
        """Combined predictions CSVs, metrics.json, the comparison table and roc.png from the done jobs."""
        stages: dict[int, dict[tuple[int, int], list[dict]]] = {1: {}, 2: {}}
        for stage in (1, 2):
            for s in range(self.S):
                for f in range(self.K):
                    job = Job(stage, s, f)
                    if self.job_done(job):
                        stages[stage][(s, f)] = plan_lib.read_predictions(job.dir(self.workdir) / "predictions.csv")
        all_rows = {st: [r for key in sorted(jobs) for r in jobs[key]] for st, jobs in stages.items()}
        for st, rows in all_rows.items():
            plan_lib.write_atomic(self.workdir / f"predictions_stage{st}.csv", plan_lib.predictions_csv(rows))
        n_jobs = self.K * self.S
        result: dict[str, Any] = {
            "complete": all(len(stages[st]) == n_jobs for st in (1, 2)),
            "jobs_done": {f"stage{st}": len(stages[st]) for st in (1, 2)}, "jobs_per_stage": n_jobs,
            "folds": self.K, "seeds": self.S, "samples": len(self.samples),
        }
        if not stages[1]:
            log.info("no finished Stage-1 job yet: no report")
            return result
        summary = {f"stage{st}": report_lib.summarize_stage(stages[st]) for st in (1, 2) if stages[st]}
        result.update(summary)
        table = report_lib.comparison_table(summary["stage1"], summary.get("stage2"))
        result["table"] = table
        result["roc_png"] = str(report_lib.plot_roc(self.workdir / "roc.png",
                                                    {f"stage {st}": all_rows[st] for st in (1, 2)}))
        plan_lib.write_atomic(self.workdir / "metrics.json", json.dumps(result, indent=1, default=float) + "\n")
        state = "complete" if result["complete"] else (
            f"partial: {len(stages[1])}/{n_jobs} Stage-1 and {len(stages[2])}/{n_jobs} Stage-2 jobs done")
        print(f"\nself-refinement, {self.K} folds x {self.S} seeds, held-out metrics, mean ± std over jobs "
              f"({state}):\n{table}\nreports: {self.workdir / 'metrics.json'}, {self.workdir / 'roc.png'}, "
              f"{self.workdir / 'predictions_stage1.csv'}, {self.workdir / 'predictions_stage2.csv'}", flush=True)
        return result


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _training_finished(job_dir: Path, summary: dict[str, Any]) -> bool:
    """The trainer's summary.json says the run reached its last step and that checkpoint exists."""
    step = summary.get("final_step")
    return (step is not None and step >= summary.get("total_steps", step + 1) and not summary.get("failure_step")
            and (job_dir / "checkpoints" / str(step)).is_dir())


def run_pipeline(cfg: ConfigDict, *, train_fn: Callable[[ConfigDict], dict] | None = None) -> dict[str, Any]:
    """Run (or resume) this shard's jobs of both stages, then write the reports.

    ``train_fn``: the trainer (default ``qlora_jax.train.trainer.run``); tests pass a wrapper.
    """
    t0 = time.perf_counter()
    pipe = Pipeline(cfg, train_fn)
    p = cfg.pipeline
    log.info("pipeline %s: %d samples, %d folds x %d seeds, shard %s, answers %r/%r (token ids %d/%d)",
             pipe.workdir, len(pipe.samples), pipe.K, pipe.S, p.shard, pipe.answers.yes_text,
             pipe.answers.no_text, pipe.answers.yes_id, pipe.answers.no_id)
    if not p.report_only:
        pipe.run_stage1()
        pipe.run_stage2()
    result = pipe.write_reports()
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    log.info("pipeline invocation finished in %.0f s", result["wall_seconds"])
    return result

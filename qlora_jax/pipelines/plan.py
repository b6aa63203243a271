"""What the self-refinement pipeline runs: samples, folds, (stage, fold, seed) jobs, prompts, files.

Everything here is a pure function of the config and the data, so every host of a sharded run
and every resumed run computes the same plan. The on-disk layout of a pipeline workdir:

    plan.json                       settings that fix the results (checked on every start)
    folds.csv                       id, fold, label of every sample
    stage{1,2}/seed{s}/fold{f}/     one job = one trainer workdir (checkpoints/, metrics.jsonl,
                                    train.log, summary.json) plus
        train.jsonl                 the training rows it was given (the other folds)
        heldout.jsonl               the rows it scores (its fold), in the same format
        predictions.csv             held-out scores, written after training
        done.json                   written last: the job is finished
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlora_jax.data import load_rows
from qlora_jax.errors import UserError
from qlora_jax.objectives.yesno import AnswerTokens, normalize_label

# Columns of predictions.csv (per job) and predictions_stage{1,2}.csv (all jobs of a stage).
PREDICTION_COLUMNS = ("stage", "seed", "fold", "id", "label", "pred", "llr", "log_p_yes", "log_p_no", "p_yes",
                      "stage1_pred", "stage1_llr")
TEMPLATE_FIELDS = ("prompt", "stage1_answer", "llr", "p_yes")


class PlanError(UserError):
    """The pipeline's config or data cannot make a valid plan (message names the key or row)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    label: bool  # True = yes


@dataclasses.dataclass(frozen=True, order=True)
class Job:
    """One adapter: trained on every fold but ``fold``, with training seed index ``seed``."""

    stage: int
    seed: int
    fold: int

    def dir(self, workdir: Path) -> Path:
        return Path(workdir) / f"stage{self.stage}" / f"seed{self.seed}" / f"fold{self.fold}"

    def index(self, folds: int) -> int:
        """Position in the shard order (the same for both stages of a (fold, seed))."""
        return self.seed * folds + self.fold

    def __str__(self) -> str:
        return f"stage {self.stage} fold {self.fold} seed {self.seed}"


# -- samples and folds -------------------------------------------------------------------------

def load_samples(source: str, *, id_field: str, prompt_field: str, label_field: str) -> list[Sample]:
    rows = load_rows(source)
    columns = set(rows.column_names)
    for key, field in (("prompt_field", prompt_field), ("label_field", label_field), ("id_field", id_field)):
        if field and field not in columns:
            raise PlanError(f"pipeline.{key}={field!r}: {source} has no such column (columns: {sorted(columns)})")
    samples, seen = [], set()
    for i, row in enumerate(rows):
        sid = str(row[id_field]) if id_field else str(i)
        if sid in seen:
            raise PlanError(f"{source}: row {i}: duplicate id {sid!r} (pipeline.id_field={id_field!r})")
        seen.add(sid)
        prompt = row[prompt_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PlanError(f"{source}: row {i} (id {sid!r}): empty or non-text {prompt_field!r}")
        try:
            label = normalize_label(row[label_field], where=f"{source}: row {i} (id {sid!r}) {label_field}")
        except ValueError as err:
            raise PlanError(str(err)) from None
        samples.append(Sample(sid, prompt, label))
    if len({s.label for s in samples}) < 2:
        raise PlanError(f"{source}: every label is the same; a yes/no task needs both")
    return samples


def assign_folds(labels: Sequence[bool], folds: int, seed: int) -> np.ndarray:
    """Stratified fold of every sample ``[n]`` int: each class is shuffled and dealt round-robin,
    continuing where the previous class stopped, so fold sizes differ by at most one."""
    labels = np.asarray(labels, bool)
    if folds < 2:
        raise PlanError(f"pipeline.folds={folds}: need at least 2 folds")
    if labels.size < folds:
        raise PlanError(f"pipeline.folds={folds}: only {labels.size} samples")
    rng = np.random.default_rng([0x464F4C44, seed])
    out = np.empty(labels.size, np.int64)
    start = 0
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        out[idx] = (start + np.arange(idx.size)) % folds
        start = (start + idx.size) % folds
    return out


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise PlanError(f"pipeline.shard={shard!r}: expected 'i/n', e.g. '0/1' or '2/4'") from None
    if not (n >= 1 and 0 <= i < n):
        raise PlanError(f"pipeline.shard={shard!r}: need n >= 1 and 0 <= i < n")
    return i, n


def shard_jobs(folds: int, seeds: int, shard: str, stage: int) -> list[Job]:
    """This shard's jobs of ``stage``: index = seed * folds + fold, kept when index % n == i."""
    i, n = parse_shard(shard)
    jobs = [Job(stage, s, f) for s in range(seeds) for f in range(folds)]
    return [j for j in jobs if j.index(folds) % n == i]


# -- prompts and rows ------------------------------------------------------------------------------

def check_template(template: str) -> None:
    """Every field of the Stage-2 template must be one we fill in."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise PlanError(f"pipeline.stage2_template: {err}") from None
    unknown = sorted(n for n in names if n.split(".")[0].split("[")[0] not in TEMPLATE_FIELDS)
    if unknown:
        raise PlanError(f"pipeline.stage2_template: unknown field(s) {unknown}; known: {list(TEMPLATE_FIELDS)}")
    if "prompt" not in names:
        raise PlanError("pipeline.stage2_template must contain {prompt} (the original question)")


def stage2_prompt(template: str, prompt: str, stage1: dict[str, Any], answers: AnswerTokens) -> str:
    """The refined prompt: the question plus the sample's out-of-fold Stage-1 prediction."""
    return template.format(prompt=prompt, stage1_answer=answers.text(stage1["pred"] == "yes").strip(),
                           llr=float(stage1["llr"]), p_yes=float(stage1["p_yes"]))


def messages(prompt: str, system_prompt: str = "") -> list[dict[str, str]]:
    """The prompt as chat messages (without the answer)."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "user", "content": prompt}]


def chat_row(sample_id: str, prompt: str, answer_text: str, system_prompt: str = "", **extra: Any) -> dict:
    """A training row in the trainer's chat format; ``id`` and ``extra`` are ignored by the trainer."""
    msgs = messages(prompt, system_prompt) + [{"role": "assistant", "content": answer_text}]
    return {"id": sample_id, **extra, "messages": msgs}


# -- files -------------------------------------------------------------------------------------

def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        write_atomic(path, text)


def jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def predictions_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PREDICTION_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in PREDICTION_COLUMNS})
    return buf.getvalue()


def read_predictions(path: Path) -> list[dict]:
    """Rows of a predictions CSV with numbers parsed back (floats round-trip exactly via repr)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            for k in ("stage", "seed", "fold"):
                row[k] = int(row[k])
            for k in ("llr", "log_p_yes", "log_p_no", "p_yes", "stage1_llr"):
                row[k] = float(row[k]) if row.get(k) not in (None, "") else None
            out.append(row)
    return out


def folds_csv(samples: Sequence[Sample], folds: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("id", "fold", "label"))
    for s, f in zip(samples, folds):
        w.writerow((s.id, int(f), "yes" if s.label else "no"))
    return buf.getvalue()


def data_fingerprint(samples: Sequence[Sample]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for s in samples:
        h.update(json.dumps([s.id, s.prompt, s.label]).encode())
    return h.hexdigest()

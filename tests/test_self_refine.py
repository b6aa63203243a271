"""The two-stage self-refinement pipeline end to end on the tiny random LLaMA (2 folds x 1 seed).

One scenario serves every test (module fixture):
  1. the CLI, with the trainer's fault hook, is SIGKILLed after step 5 of the first job (whose
     checkpoints are at steps 2 and 4; Orbax saves asynchronously, so the newest finalized one
     is 2 or 4);
  2. the pipeline is run again in-process with a counting wrapper around the real trainer
     (Stage 2 at learning rate 0, so its final adapters must equal its initial ones);
  3. it is run a third time: nothing left to do.
References: the files the pipeline wrote (folds, per-job train/held-out rows, predictions),
the Orbax checkpoints read back raw, and the wrapper's record of trainer calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _support import require

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
require("torch")
from configs import self_refine as self_refine_config  # noqa: E402
from qlora_jax.pipelines import plan as plan_lib  # noqa: E402
from qlora_jax.pipelines.report import metrics_of_rows  # noqa: E402
from tests.test_train import tiny_model_dir  # noqa: E402,F401  (fixture)

N_SAMPLES = 24
OVERRIDES = {  # on top of the demo preset: tiny and fast, the NF4 path kept
    "pipeline.folds": 2, "pipeline.seeds": 1, "train.max_steps": 6, "train.checkpoint_every": 2,
    "train.batch_size": 4, "train.grad_accum": 1, "lora.r": 4, "lora.alpha": 8.0, "pipeline.score_batch_size": 8,
    "data.pad_to_multiple_of": 64,  # one batch shape per stage: fewer compilations
}


def _config(model_dir: Path, data: Path, workdir: Path):
    c = self_refine_config.get_config("demo")
    c.workdir, c.model.source, c.pipeline.data = str(workdir), str(model_dir), str(data)
    for key, value in OVERRIDES.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def scenario(tiny_model_dir, tmp_path_factory):  # noqa: F811
    from qlora_jax.pipelines.refinement import run_pipeline
    from qlora_jax.train.trainer import run

    root = tmp_path_factory.mktemp("self_refine")
    data = root / "samples.jsonl"
    data.write_text("".join((REPO / "data/self_refine_demo/samples.jsonl").read_text().splitlines(True)[:N_SAMPLES]))
    workdir = root / "pipe"

    # 1. killed like a preempted VM after optimizer step 5 of the first job.
    args = [sys.executable, "-m", "qlora_jax.pipelines.self_refine", "--config", f"{REPO}/configs/self_refine.py:demo",
            f"--config.workdir={workdir}", f"--config.model.source={tiny_model_dir}", f"--config.pipeline.data={data}"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "QLORA_FAULT_KILL_AT_STEP": "5"}
    killed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    # 2. resumed in-process; every trainer call is recorded.
    calls: list = []

    def counting_trainer(cfg):
        calls.append(cfg)
        if cfg.model.init_from:  # Stage 2: learning rate 0, so the adapters stay as initialised
            cfg.optim.lr = 0.0
        return run(cfg)

    cfg = _config(tiny_model_dir, data, workdir)
    result = run_pipeline(cfg, train_fn=counting_trainer)
    files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name in ("done.json", "predictions.csv")}

    # 3. everything is done.
    calls_again: list = []

    def counting_again(cfg):
        calls_again.append(cfg)
        return run(cfg)

    result_again = run_pipeline(_config(tiny_model_dir, data, workdir), train_fn=counting_again)
    return {"workdir": workdir, "killed": killed, "calls": calls, "result": result, "files": files,
            "calls_again": calls_again, "result_again": result_again, "data": data}


def _ckpt_step_dirs(job_dir: Path) -> list[Path]:
    return sorted((p for p in (job_dir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_killed_job_resumes_and_finished_jobs_are_skipped(scenario):
    wd = scenario["workdir"]
    assert scenario["killed"].returncode == -9, scenario["killed"].stderr[-3000:]
    # The resumed run trained exactly the four (stage, fold) jobs once each, Stage 1 first.
    jobs = [(Path(c.workdir).relative_to(wd).as_posix()) for c in scenario["calls"]]
    assert jobs == ["stage1/seed0/fold0", "stage1/seed0/fold1", "stage2/seed0/fold0", "stage2/seed0/fold1"]
    first = wd / "stage1/seed0/fold0"
    log_text = (first / "train.log").read_text()
    assert "resumed from" in log_text
    assert f"{first}/checkpoints/2 at step 2" in log_text or f"{first}/checkpoints/4 at step 4" in log_text
    steps = [r["step"] for r in map(json.loads, (first / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's steps after the checkpoint were dropped and redone
    assert scenario["result"]["complete"]
    # Third run: no trainer call, and no job's result rewritten.
    assert scenario["calls_again"] == []
    after = {p: p.read_bytes() for p in scenario["files"]}
    assert after == scenario["files"] and len(after) == 8
    assert scenario["result_again"]["complete"]


def test_no_sample_is_scored_or_pseudo_labelled_by_a_model_that_trained_on_it(scenario):
    wd = scenario["workdir"]
    folds = {r["id"]: int(r["fold"]) for r in map(dict, _csv(wd / "folds.csv"))}
    source_ids = [json.loads(line)["id"] for line in scenario["data"].read_text().splitlines()]
    assert sorted(folds) == sorted(source_ids) and set(folds.values()) == {0, 1}
    train_ids = {}
    for stage in (1, 2):
        for fold in (0, 1):
            d = wd / f"stage{stage}/seed0/fold{fold}"
            train = plan_lib.read_jsonl(d / "train.jsonl")
            heldout = plan_lib.read_jsonl(d / "heldout.jsonl")
            train_ids[(stage, fold)] = {r["id"] for r in train}
            assert {r["id"] for r in heldout} == {i for i, f in folds.items() if f == fold}
            assert train_ids[(stage, fold)] == {i for i, f in folds.items() if f != fold}
            predicted = {r["id"] for r in plan_lib.read_predictions(d / "predictions.csv")}
            assert predicted == {r["id"] for r in heldout}
            assert not predicted & train_ids[(stage, fold)]
    # The trainer was handed exactly these files, and Stage 2 the Stage-1 adapters of its fold.
    for cfg in scenario["calls"]:
        d = Path(cfg.workdir)
        assert cfg.data.train == str(d / "train.jsonl")
        stage, fold = int(d.parts[-3][-1]), int(d.parts[-1][-1])
        assert cfg.model.init_from == ("" if stage == 1 else str(wd / f"stage1/seed0/fold{fold}"))
    # Every Stage-2 prompt (training and held-out) carries the sample's Stage-1 prediction, made by
    # the Stage-1 job of the sample's own fold, which did not train on the sample.
    stage1 = {r["id"]: r for f in (0, 1) for r in plan_lib.read_predictions(wd / f"stage1/seed0/fold{f}/predictions.csv")}
    for fold in (0, 1):
        d = wd / f"stage2/seed0/fold{fold}"
        for r in plan_lib.read_jsonl(d / "train.jsonl") + plan_lib.read_jsonl(d / "heldout.jsonl"):
            src = r["stage1_fold"]
            assert src == folds[r["id"]] == stage1[r["id"]]["fold"]
            assert r["id"] not in train_ids[(1, src)]
            assert r["stage1_pred"] == stage1[r["id"]]["pred"] and r["stage1_llr"] == stage1[r["id"]]["llr"]
            user = r["messages"][-2]["content"]
            assert f"answered {stage1[r['id']]['pred']} (" in user
            assert f"ratio {stage1[r['id']]['llr']:+.2f})" in user


def test_stage2_starts_from_the_stage1_adapters(scenario):
    """Stage 2 ran at learning rate 0: its final checkpoint holds its initial adapters, which must
    be the final Stage-1 adapters of the same (fold, seed), bit for bit (read back raw)."""
    import jax
    import orbax.checkpoint as ocp

    wd = scenario["workdir"]
    reader = ocp.PyTreeCheckpointer()
    for fold in (0, 1):
        s1 = _ckpt_step_dirs(wd / f"stage1/seed0/fold{fold}")[-1]
        s2 = _ckpt_step_dirs(wd / f"stage2/seed0/fold{fold}")[-1]
        assert s1.name == s2.name == "6"
        a = jax.tree.map(np.asarray, reader.restore(s1 / "lora"))
        b = jax.tree.map(np.asarray, reader.restore(s2 / "lora"))
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
        # Stage 1 did train: its B matrices left zero, so equality is not that of two fresh inits.
        lora_b = [x for path, x in jax.tree_util.tree_leaves_with_path(a) if "lora_b" in jax.tree_util.keystr(path)]
        assert max(float(np.abs(x).max()) for x in lora_b) > 0


def test_reports_match_the_predictions(scenario):
    wd = scenario["workdir"]
    metrics = json.loads((wd / "metrics.json").read_text())
    for stage in (1, 2):
        rows = plan_lib.read_predictions(wd / f"predictions_stage{stage}.csv")
        assert len(rows) == N_SAMPLES and {r["stage"] for r in rows} == {stage}
        per_job = metrics[f"stage{stage}"]["jobs"]
        for job in per_job:
            mine = [r for r in rows if r["fold"] == job["fold"]]
            acc = np.mean([r["pred"] == r["label"] for r in mine])
            assert job["accuracy"] == pytest.approx(acc)
            assert job == pytest.approx({"seed": 0, "fold": job["fold"], **metrics_of_rows(mine)}, nan_ok=True)
            for r in mine:  # the LLR is the difference of the two stored log-probabilities
                assert r["llr"] == pytest.approx(r["log_p_yes"] - r["log_p_no"], abs=1e-5)
                assert (r["pred"] == "yes") == (r["log_p_yes"] >= r["log_p_no"])
        accs = [j["accuracy"] for j in per_job]
        assert metrics[f"stage{stage}"]["mean"]["accuracy"] == pytest.approx(np.mean(accs))
        assert metrics[f"stage{stage}"]["std"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))
    assert (wd / "roc.png").stat().st_size > 5000
    assert "stage 1" in metrics["table"] and "auroc" in metrics["table"]


def test_shards_partition_the_jobs():
    for folds, seeds, n in ((5, 5, 4), (2, 1, 3), (3, 2, 1)):
        shards = [plan_lib.shard_jobs(folds, seeds, f"{i}/{n}", 1) for i in range(n)]
        every = [j for s in shards for j in s]
        assert sorted(every) == sorted(plan_lib.Job(1, s, f) for s in range(seeds) for f in range(folds))
        assert len(set(every)) == len(every)
        # Both stages of a (fold, seed) land on the same shard.
        for i in range(n):
            s2 = plan_lib.shard_jobs(folds, seeds, f"{i}/{n}", 2)
            assert [(j.seed, j.fold) for j in s2] == [(j.seed, j.fold) for j in shards[i]]
    with pytest.raises(plan_lib.PlanError, match="shard"):
        plan_lib.parse_shard("2/2")


def test_folds_are_stratified_and_fixed():
    rng = np.random.default_rng(0)
    labels = rng.random(103) < 0.3
    folds = plan_lib.assign_folds(labels, 5, seed=7)
    np.testing.assert_array_equal(folds, plan_lib.assign_folds(labels, 5, seed=7))
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    pos = np.bincount(folds[labels], minlength=5)
    assert pos.max() - pos.min() <= 1


def _csv(path: Path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_stage2_waits_for_other_shards(scenario, tiny_model_dir, tmp_path):  # noqa: F811
    """Shard 0/2 owns fold 0; its Stage-2 job needs Stage-1 fold 1, which shard 1/2 has not run."""
    import shutil

    from qlora_jax.pipelines.refinement import WaitingForShards, run_pipeline

    wd = tmp_path / "pipe"
    (wd / "stage1/seed0").mkdir(parents=True)
    for name in ("plan.json", "folds.csv"):
        shutil.copy(scenario["workdir"] / name, wd / name)
    shutil.copytree(scenario["workdir"] / "stage1/seed0/fold0", wd / "stage1/seed0/fold0")
    cfg = _config(tiny_model_dir, scenario["data"], wd)
    cfg.pipeline.shard, cfg.pipeline.wait_minutes = "0/2", 0.0
    calls: list = []
    with pytest.raises(WaitingForShards, match="stage 1 fold 1 seed 0"):
        run_pipeline(cfg, train_fn=calls.append)
    assert calls == []  # its own Stage-1 job was done; nothing was trained


def test_changed_settings_are_refused(tmp_path):
    from qlora_jax.pipelines.refinement import check_plan

    check_plan(tmp_path, {"lora.r": 8, "pipeline.folds": 5})
    with pytest.raises(plan_lib.PlanError, match="pipeline.folds: 5 -> 2"):
        check_plan(tmp_path, {"lora.r": 8, "pipeline.folds": 2})
    check_plan(tmp_path, {"lora.r": 8, "pipeline.folds": 5, "objective": "sft"})  # a new trainer field

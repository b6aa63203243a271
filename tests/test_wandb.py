"""Weights & Biases logging (``config.train.wandb_project``), in wandb's offline mode.

The reference is what wandb itself stored: its offline run file (``run-<id>.wandb``, a LevelDB-style
log of wandb's own protobuf records, read here with wandb's ``Record`` message) must hold every
metric row of ``metrics.jsonl`` under the same names and optimizer steps, and a resumed run must
continue the same wandb run. The trainer runs on a 2-layer random LLaMA (no torch).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from _support import REPO, require, write_tiny_llama

sys.path.insert(0, str(REPO))

from configs import sft as sft_config  # noqa: E402
from qlora_jax.checkpoints import run_dir  # noqa: E402
from qlora_jax.train import config as config_lib  # noqa: E402

wandb = require("wandb")


def _records(path: Path):
    """wandb's protobuf records of one ``.wandb`` file: a 7-byte header, then LevelDB log blocks
    of 32 KiB holding (crc32, length, type) chunks; type 1 = a whole record, 2/3/4 = first/middle/last."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _offline_runs(workdir: Path) -> dict[str, list]:
    """Each offline run directory of ``workdir`` -> its records (oldest attempt first)."""
    dirs = sorted((workdir / "wandb").glob("offline-run-*"))
    return {d.name: list(_records(next(d.glob("run-*.wandb")))) for d in dirs}


def _history(records) -> dict[int, dict[str, float]]:
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


def _jsonl_by_step(workdir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl merged per step (an eval row and a train row can share one step), numbers only."""
    merged: dict[int, dict[str, float]] = {}
    for row in run_dir.read_metrics(workdir / run_dir.METRICS_FILE):
        step = row.pop("step")
        merged.setdefault(step, {}).update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    return merged


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from qlora_jax.checkpoints import gguf_tokenizer, resolve_builtin

    d = write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_wandb"),
                         gguf_tokenizer(resolve_builtin("smollm2-135m-instruct")))
    lines = (REPO / "data/sft_demo/train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[8:12]) + "\n")
    return d


def _config(model_dir: Path, workdir: Path, steps: int):
    c = sft_config.get_config()
    c.workdir = str(workdir)
    c.model.source = str(model_dir)
    c.data.train, c.data.eval = str(model_dir / "train.jsonl"), str(model_dir / "eval.jsonl")
    c.data.max_length = 64
    c.train.batch_size, c.train.grad_accum, c.train.max_steps = 2, 1, steps
    c.train.checkpoint_every, c.train.generate_eval, c.train.export_peft = 1, 0, False
    c.lora.r, c.lora.alpha, c.lora.dropout = 4, 8.0, 0.0
    c.train.wandb_project, c.train.wandb_mode = "qlora-jax-tests", "offline"
    return c


@pytest.mark.slow  # two trainer starts (~25 s of CPU)
def test_wandb_offline_run_holds_every_metric_row_and_resumes_the_same_run(tiny_model_dir, tmp_path, monkeypatch):
    from qlora_jax.train.trainer import run

    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"

    run(_config(tiny_model_dir, workdir, steps=2))
    (first_name, first), = _offline_runs(workdir).items()
    run_id = (workdir / run_dir.WANDB_RUN_ID_FILE).read_text().strip()
    assert first_name.endswith(run_id)
    run_rec = next(r.run for r in first if r.WhichOneof("record_type") == "run")
    assert (run_rec.run_id, run_rec.project) == (run_id, "qlora-jax-tests")
    config = {u.key: json.loads(u.value_json) for u in run_rec.config.update}
    assert config["lora"]["r"] == 4 and config["optim"]["max_grad_norm"] == 0.3
    history = _history(first)
    expected = _jsonl_by_step(workdir)
    assert sorted(history) == sorted(expected) == [0, 1, 2]  # eval before, two steps (+ eval after at 2)
    for step, row in expected.items():
        assert history[step].keys() == row.keys(), step
        for key, value in row.items():
            assert history[step][key] == pytest.approx(value, rel=1e-12, abs=0), (step, key)
    assert {"loss", "grad_norm", "lr", "eval_loss"} <= expected[2].keys()

    # Asked for one more step, the finished run resumes from its step-2 checkpoint: same wandb run.
    run(_config(tiny_model_dir, workdir, steps=3))
    runs = _offline_runs(workdir)
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)
    second = runs[sorted(runs)[-1]]
    assert next(r.run for r in second if r.WhichOneof("record_type") == "run").run_id == run_id
    expected = _jsonl_by_step(workdir)
    assert sorted(_history(second)) == [3]
    for key, value in expected[3].items():
        assert _history(second)[3][key] == pytest.approx(value, rel=1e-12, abs=0), key


def test_wandb_config_errors_name_the_key(monkeypatch):
    c = sft_config.get_config()
    c.train.wandb_mode = "cloud"
    with pytest.raises(config_lib.ConfigError, match=r"config.train.wandb_mode='cloud': must be one of 'online', "
                                                     r"'offline'"):
        config_lib.validate_config(c)

    c = sft_config.get_config()
    c.train.wandb_project = "p"
    real_find_spec = config_lib.importlib.util.find_spec
    monkeypatch.setattr(config_lib.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(config_lib.ConfigError, match=r"config.train.wandb_project='p': Weights & Biases logging "
                                                     r"needs the wandb package: pip install 'qlora_jax\[wandb\]'"):
        config_lib.validate_config(c)

"""Metrics: ``workdir/metrics.jsonl`` (one JSON object per logged step), TensorBoard event files
(tensorboardX: no TensorFlow needed), optionally Weights & Biases, and ``loss.png`` at the end.
Only process 0 writes. Every sink gets the same metric names and optimizer steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from qlora_jax.checkpoints import run_dir
from qlora_jax.checkpoints.run_dir import METRICS_FILE, read_metrics


class MetricsWriter:
    """``wandb_project``: also log to Weights & Biases (``wandb_mode`` "online" or "offline"), as
    one wandb run per run directory: a resumed attempt continues the run its first attempt started
    (the id is kept in the run directory). wandb drops rows whose step is not above the last one it
    has, so rows an interrupted attempt logged after its last checkpoint stay as first logged there;
    ``metrics.jsonl`` is the exact record."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, wandb_project: str = "",
                 wandb_mode: str = "online", run_config: dict[str, Any] | None = None):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self.path = self.workdir / METRICS_FILE
        self._tb = None
        self._wandb = None
        if self.enabled and wandb_project:
            self._wandb = _start_wandb(self.workdir, wandb_project, wandb_mode, run_config or {})
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
                except ImportError:  # optional
                    self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                            step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(workdir: Path, project: str, mode: str, run_config: dict[str, Any]):
    import wandb  # optional: config validation has checked that it is installed

    run_id = run_dir.wandb_run_id(workdir)
    (workdir / run_dir.WANDB_DIR).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, id=run_id, resume="allow", mode=mode, dir=str(workdir),
                      name=workdir.name, config=run_config, settings=wandb.Settings(silent=True))


def _py(v: Any) -> Any:
    try:
        return float(v) if not isinstance(v, (int, str, bool)) else v
    except (TypeError, ValueError):
        return str(v)


def plot_series(out: Path, series: list[tuple[str, list[tuple[int, float]], str]], *, ylabel: str) -> Path | None:
    """One figure of ``(label, [(step, value)], matplotlib style)`` lines against the optimizer step;
    empty series are left out, and no file is written when all are empty."""
    series = [(label, pts, style) for label, pts, style in series if pts]
    if not series or jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts, style in series:
        ax.plot(*zip(*pts), style, label=label, lw=1.5 if "o" in style else 1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_loss(workdir: str | Path, out_name: str = "loss.png", ylabel: str | None = None) -> Path | None:
    """Train loss per step, and eval loss where measured, from metrics.jsonl."""
    workdir = Path(workdir)
    rows = read_metrics(workdir / METRICS_FILE)
    return plot_series(workdir / out_name, [("train loss", [(r["step"], r["loss"]) for r in rows if "loss" in r], "-"),
                                            ("eval loss", [(r["step"], r["eval_loss"]) for r in rows
                                                           if "eval_loss" in r], "o-")],
                       ylabel=ylabel or "NLL per completion token")

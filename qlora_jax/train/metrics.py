"""Metrics: ``workdir/metrics.jsonl`` (one JSON object per logged step), TensorBoard event files
(tensorboardX: no TensorFlow needed) and ``loss.png`` at the end. Only process 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from qlora_jax.checkpoints.run_dir import METRICS_FILE, read_metrics


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self.path = self.workdir / METRICS_FILE
        self._tb = None
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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


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

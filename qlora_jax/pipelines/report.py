"""Metrics of yes/no predictions (numpy only), their aggregation, the comparison table and plot.

Positive class = "yes". Per (fold, seed) job: accuracy, AUROC (of the LLR), F1 (of "yes"),
ECE and Brier score (of p(yes)). Aggregates are the mean and sample standard deviation (ddof=1)
over jobs; "pooled" metrics treat all out-of-fold predictions of one seed as one set, then average
over seeds.

ECE here is the calibration error of p(yes) itself: samples are put in ``bins`` equal-width bins
of p(yes) on [0, 1] and ECE = sum_b (n_b / n) |mean(y in b) - mean(p(yes) in b)|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("accuracy", "auroc", "f1", "ece", "brier")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half
    (Mann-Whitney U with mid-ranks). NaN when one class is absent."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, np.float64)
    # mid-ranks of tied groups
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(mid, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def f1_score(pred: np.ndarray, labels: np.ndarray) -> float:
    pred, labels = np.asarray(pred, bool), np.asarray(labels, bool)
    tp = int((pred & labels).sum())
    denom = 2 * tp + int((pred & ~labels).sum()) + int((~pred & labels).sum())
    return float(2 * tp / denom) if denom else float("nan")


def expected_calibration_error(p_yes: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    p_yes, y = np.asarray(p_yes, np.float64), np.asarray(labels, np.float64)
    which = np.minimum((p_yes * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() / p_yes.size * abs(y[m].mean() - p_yes[m].mean())
    return float(total)


def brier_score(p_yes: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((np.asarray(p_yes, np.float64) - np.asarray(labels, np.float64)) ** 2))


def classification_metrics(labels, pred, llr, p_yes) -> dict[str, float]:
    labels, pred = np.asarray(labels, bool), np.asarray(pred, bool)
    return {"accuracy": float((pred == labels).mean()), "auroc": auroc(llr, labels), "f1": f1_score(pred, labels),
            "ece": expected_calibration_error(p_yes, labels), "brier": brier_score(p_yes, labels),
            "n": int(labels.size)}


def metrics_of_rows(rows: Sequence[dict]) -> dict[str, float]:
    """Metrics of prediction rows (as in predictions.csv)."""
    return classification_metrics([r["label"] == "yes" for r in rows], [r["pred"] == "yes" for r in rows],
                                  [r["llr"] for r in rows], [r["p_yes"] for r in rows])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize_stage(job_rows: dict[tuple[int, int], list[dict]]) -> dict[str, Any]:
    """``{(seed, fold): prediction rows}`` -> per-job metrics, mean/std over jobs, pooled per seed."""
    jobs = [{"seed": s, "fold": f, **metrics_of_rows(rows)} for (s, f), rows in sorted(job_rows.items())]
    out: dict[str, Any] = {"jobs": jobs, "mean": {}, "std": {}, "pooled_mean": {}, "pooled_std": {}}
    for m in METRICS:
        out["mean"][m], out["std"][m] = mean_std([j[m] for j in jobs])
    seeds = sorted({s for s, _ in job_rows})
    pooled = [metrics_of_rows([r for (s, _), rows in job_rows.items() if s == seed for r in rows])
              for seed in seeds]
    for m in METRICS:
        out["pooled_mean"][m], out["pooled_std"][m] = mean_std([p[m] for p in pooled])
    return out


def comparison_table(stage1: dict[str, Any], stage2: dict[str, Any] | None) -> str:
    """Mean +- std over (fold, seed) jobs, Stage 1 vs Stage 2 (lower is better for ECE and Brier)."""
    n1 = len(stage1["jobs"])
    n2 = len(stage2["jobs"]) if stage2 else 0
    lines = [f"{'metric':<9} {'stage 1 (' + str(n1) + ' jobs)':>20} {'stage 2 (' + str(n2) + ' jobs)':>20} {'change':>8}"]
    for m in METRICS:
        a = f"{stage1['mean'][m]:.3f} ± {stage1['std'][m]:.3f}"
        if stage2 and stage2["jobs"]:
            b = f"{stage2['mean'][m]:.3f} ± {stage2['std'][m]:.3f}"
            d = f"{stage2['mean'][m] - stage1['mean'][m]:+.3f}"
        else:
            b, d = "-", "-"
        lines.append(f"{m:<9} {a:>20} {b:>20} {d:>8}")
    return "\n".join(lines)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tpr = np.r_[0.0, tp[last_of_group] / max(y.sum(), 1)]
    fpr = np.r_[0.0, fp[last_of_group] / max((~y).sum(), 1)]
    return fpr, tpr


def plot_roc(path: Path, stages: dict[str, list[dict]]) -> Path:
    """ROC curves of every stage (all out-of-fold predictions of all seeds pooled) and the LLR
    histogram of each stage split by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = {k: v for k, v in stages.items() if v}
    fig, axes = plt.subplots(1, 1 + len(stages), figsize=(4.6 * (1 + len(stages)), 4.2))
    ax = axes[0]
    for name, rows in stages.items():
        y = np.array([r["label"] == "yes" for r in rows])
        llr = np.array([r["llr"] for r in rows])
        fpr, tpr = roc_curve(llr, y)
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUROC {auroc(llr, y):.3f}, n={len(rows)})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, out-of-fold predictions")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    for ax, (name, rows) in zip(axes[1:], stages.items()):
        llr = np.array([r["llr"] for r in rows])
        y = np.array([r["label"] == "yes" for r in rows])
        edges = np.histogram_bin_edges(llr, bins=30)
        ax.hist(llr[y], bins=edges, alpha=0.6, label="label yes")
        ax.hist(llr[~y], bins=edges, alpha=0.6, label="label no")
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_xlabel("log p(yes) - log p(no)")
        ax.set_ylabel("samples")
        ax.set_title(f"{name}: LLR by label")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

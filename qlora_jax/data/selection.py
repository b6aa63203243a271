"""Training-data selection by embedding similarity to target sets (seed 001, appendix A.3).

    python -m qlora_jax.data.filter --config configs/filter.py \\
        [--config.data.train=pool.jsonl --config.targets=nlp=a.jsonl,mmlu=b.jsonl] \\
        [--config.select.mode=threshold --config.select.threshold=0.5 --config.select.on=mean]
        [--config.select.mode=top_k --config.select.top_k=300000 --config.select.on=nlp]

The procedure:

1. every training sample and every target-set sample becomes one text (the fields that hold
   its content, see :func:`sample_text`) and is embedded with all-MiniLM-L6-v2
   (:mod:`qlora_jax.embed`: mean pooling, L2-normalized, 384 dimensions), in batches, with a
   progress bar;
2. a training sample's score for a target set is its *maximum* cosine similarity to any sample
   of that set (a dot product of unit vectors, in blocks so memory stays bounded);
3. samples are kept by ``threshold`` (score >= t) or ``top_k`` (the k best, ties to the earlier
   row), on one target's score or on the *mean* over all targets ("mean similarity to
   NLP4Education and MMLU" in the seed).

Writes to ``output_dir``: ``filtered.jsonl`` (the kept rows in their original order; JSONL input
lines are copied byte for byte), ``scores.csv`` (every row's score per target, the mean, kept),
``histogram.png`` (score distributions with the cut marked), ``summary.json`` (counts, cut,
timings) and ``embeddings.npz`` (reused on a rerun over the same texts, so trying another
threshold costs no embedding).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlora_jax.data.sources import DataError, load_rows, validate_jsonl
from qlora_jax.embed import Embedder

MODES = ("threshold", "top_k")
# Fields tried in order when ``text_fields`` is empty: (required, also used when present); the
# first entry whose required fields a row has wins.
AUTO_FIELDS = (
    (("messages",), ()),  # chat
    (("question",), ("choices",)),  # multiple choice
    (("instruction",), ("input", "output")),  # alpaca
    (("prompt",), ("completion", "chosen")),  # prompt / completion; preference: prompt + preferred answer
    (("text",), ()),
    (("content",), ()),
)


def _flatten(value: Any) -> str:
    """A field's text: strings as they are, message lists as their contents, lists line by line."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return _flatten(value.get("content", ""))
    if isinstance(value, (list, tuple)):
        return "\n".join(t for t in (_flatten(v) for v in value) if t)
    return json.dumps(value, ensure_ascii=False)


def sample_text(row: Mapping[str, Any], fields: Sequence[str] = (), where: str = "row") -> str:
    """The text a sample is embedded as: ``fields`` joined by newlines, or, without ``fields``,
    the first of :data:`AUTO_FIELDS` whose lead field the row has (chat messages, question +
    choices, alpaca instruction + input + output, prompt + completion, text)."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fields:
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"{where}: field(s) {missing} missing (have {sorted(row)}); see text_fields")
        group = tuple(fields)
    else:
        group = next((required + tuple(f for f in optional if f in row) for required, optional in AUTO_FIELDS
                      if all(f in row for f in required)), None)
        if group is None:
            raise DataError(f"{where}: cannot tell which fields hold the text (have {sorted(row)}); "
                            f"set text_fields, e.g. --config.data.text_fields=question")
    return "\n".join(t for t in (_flatten(row.get(f)) for f in group) if t)


def read_samples(path: str | os.PathLike, fields: Sequence[str] = ()) -> tuple[list[Any], list[str]]:
    """``(records, texts)`` of a data file. JSONL records are the raw lines (written back
    verbatim); other formats (JSON, CSV, parquet) are row dicts."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        if validate_jsonl(path) == 0:  # names file:line of a bad line
            raise DataError(f"{path}: the file has no records")
        records, texts = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    records.append(line if line.endswith("\n") else line + "\n")
                    texts.append(sample_text(json.loads(line), fields, f"{path}:{n}"))
        return records, texts
    rows = [dict(r) for r in load_rows(str(path))]
    return rows, [sample_text(r, fields, f"{path} row {i}") for i, r in enumerate(rows)]


def parse_targets(spec: str) -> dict[str, str]:
    """``"nlp=a.jsonl,mmlu=b.jsonl"`` (or bare paths, named by their file stem) -> {name: path}."""
    targets: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, path = part.rpartition("=") if "=" in part else ("", "", part)
        name = name.strip() or Path(path).stem
        if name in targets or name == "mean":
            raise DataError(f"targets: name {name!r} used twice or reserved; write name=path")
        targets[name] = path.strip()
    if not targets:
        raise DataError("targets: no target set given (e.g. --config.targets=mmlu=data/mcqa_demo.jsonl)")
    return targets


def max_similarity(train: np.ndarray, target: np.ndarray, block: int = 4096) -> np.ndarray:
    """``[n_train]``: each training vector's maximum inner product with the target vectors
    (cosine similarity for unit vectors), computed ``block`` training rows at a time."""
    if target.shape[0] == 0:
        raise DataError("a target set has no samples")
    out = np.empty((train.shape[0],), np.float32)
    for lo in range(0, train.shape[0], block):
        out[lo:lo + block] = (train[lo:lo + block] @ target.T).max(axis=1)
    return out


def check_select(names: Sequence[str], *, on: str, mode: str, threshold: float, top_k: int) -> None:
    """Raise :class:`DataError` naming the ``select.*`` key that cannot work with targets ``names``."""
    if on != "mean" and on not in names:
        raise DataError(f"select.on={on!r}: expected 'mean' or one of the targets {sorted(names)}")
    if mode not in MODES:
        raise DataError(f"select.mode={mode!r}: expected one of {MODES}")
    if mode == "threshold" and not -1.0 <= threshold <= 1.0:
        raise DataError(f"select.threshold={threshold}: a cosine similarity lies in [-1, 1]")
    if mode == "top_k" and top_k < 1:
        raise DataError(f"select.top_k={top_k}: must be >= 1 with select.mode='top_k'")


def select(scores: Mapping[str, np.ndarray], *, on: str = "mean", mode: str = "threshold",
           threshold: float = 0.5, top_k: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """``(kept row indices in file order, the score used, the cut)``.

    ``on``: a target name or "mean" (the mean of every target's score). ``threshold``: keep
    score >= threshold. ``top_k``: keep the k highest (ties to the earlier row); the cut is the
    k-th score.
    """
    check_select(list(scores), on=on, mode=mode, threshold=threshold, top_k=top_k)
    used = np.mean(np.stack(list(scores.values())), axis=0) if on == "mean" else np.asarray(scores[on])
    if mode == "threshold":
        return np.flatnonzero(used >= threshold), used, float(threshold)
    order = np.lexsort((np.arange(len(used)), -used))[:top_k]  # best first, ties to the earlier row
    return np.sort(order), used, float(used[order[-1]])


def plot_histogram(scores: Mapping[str, np.ndarray], used_name: str, cut: float, kept: int, path: Path) -> None:
    """One histogram per target score (and the mean when there are several), the cut marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = dict(scores)
    if len(scores) > 1:
        series["mean"] = np.mean(np.stack(list(scores.values())), axis=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(float(s.min()) for s in series.values()), max(float(s.max()) for s in series.values()), 41)
    for name, s in series.items():
        ax.hist(s, bins=bins, alpha=0.45 if name != used_name else 0.75, label=f"{name} (median {np.median(s):.2f})",
                histtype="stepfilled")
    ax.axvline(cut, color="black", linestyle="--", label=f"cut {cut:.3f} on {used_name}")
    n = len(next(iter(scores.values())))
    ax.set(xlabel="max cosine similarity to the target set (all-MiniLM-L6-v2)", ylabel="training samples",
           title=f"kept {kept} of {n} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _embed_all(embedder, named_texts: Mapping[str, list[str]], cache: Path | None, batch_size: int) -> dict[str, np.ndarray]:
    """Embeddings per name, reusing ``cache`` entries whose texts are unchanged."""
    cached: dict[str, np.ndarray] = {}
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            cached = {k: z[k] for k in z.files}
    out = {}
    for name, texts in named_texts.items():
        key = f"{name}-{_fingerprint(texts)[:16]}"
        if key in cached and cached[key].shape == (len(texts), embedder.dim):
            out[key] = cached[key]
            print(f"{name}: {len(texts)} embeddings reused from {cache}")
        else:
            out[key] = embedder.encode(texts, batch_size=batch_size, progress=f"embedding {name}")
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, **out)
        os.replace(tmp, cache)
    return {name: out[f"{name}-{_fingerprint(texts)[:16]}"] for name, texts in named_texts.items()}


def run(cfg) -> dict[str, Any]:
    """Filter as ``cfg`` (``configs/filter.py``) says; returns the summary written to ``summary.json``."""
    t0 = time.perf_counter()
    split = lambda s: tuple(f.strip() for f in str(s).split(",") if f.strip())
    targets = parse_targets(cfg.targets)
    check_select(list(targets), on=cfg.select.on, mode=cfg.select.mode, threshold=cfg.select.threshold,
                 top_k=cfg.select.top_k)  # before the slow part
    records, train_texts = read_samples(cfg.data.train, split(cfg.data.text_fields))
    named = {"train": train_texts}
    for name, path in targets.items():
        named[name] = read_samples(path, split(cfg.target_text_fields))[1]
    t_read = time.perf_counter() - t0

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    embedder = Embedder(max_seq_length=cfg.embed.max_seq_length or None, batch_size=cfg.embed.batch_size)
    t1 = time.perf_counter()
    vectors = _embed_all(embedder, named, out / "embeddings.npz" if cfg.embed.cache else None, cfg.embed.batch_size)
    t_embed = time.perf_counter() - t1

    scores = {name: max_similarity(vectors["train"], vectors[name]) for name in targets}
    kept, used, cut = select(scores, on=cfg.select.on, mode=cfg.select.mode, threshold=cfg.select.threshold,
                             top_k=cfg.select.top_k)
    keep = np.zeros(len(records), bool)
    keep[kept] = True

    with open(out / "filtered.jsonl", "w", encoding="utf-8") as f:
        for i in kept:
            r = records[i]
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False, default=str) + "\n")
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", *targets, "mean", "kept"])
        mean = np.mean(np.stack(list(scores.values())), axis=0)
        for i in range(len(records)):
            w.writerow([i, *(f"{scores[n][i]:.6f}" for n in targets), f"{mean[i]:.6f}", int(keep[i])])
    plot_histogram(scores, cfg.select.on, cut, len(kept), out / "histogram.png")

    n_texts = sum(len(t) for t in named.values())
    summary = {
        "train": str(cfg.data.train), "targets": targets, "rows": len(records), "kept": int(len(kept)),
        "select": {"on": cfg.select.on, "mode": cfg.select.mode, "cut": cut},
        "score_stats": {n: {"min": float(s.min()), "median": float(np.median(s)), "max": float(s.max())}
                        for n, s in {**scores, "used": used}.items()},
        "target_sizes": {n: len(named[n]) for n in targets},
        "seconds": {"read": round(t_read, 2), "embed": round(t_embed, 2), "total": round(time.perf_counter() - t0, 2)},
        "texts_embedded_per_second": round(n_texts / t_embed, 1) if t_embed > 0 else None,
        "outputs": {k: str(out / k) for k in ("filtered.jsonl", "scores.csv", "histogram.png")},
        "config": json.loads(cfg.to_json()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"kept {len(kept)} of {len(records)} rows of {cfg.data.train} ({cfg.select.mode} on {cfg.select.on}, "
          f"cut {cut:.3f}); embedding {n_texts} texts took {t_embed:.1f} s")
    print(f"wrote {out / 'filtered.jsonl'}, scores.csv, histogram.png, summary.json")
    return summary

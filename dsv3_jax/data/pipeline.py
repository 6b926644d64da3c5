"""Training and evaluation batches: tokenize, FIM, pack, batch (grain).

Training stream, per host::

    token docs -> shuffle (new order each epoch, from `seed`) -> repeat forever
               -> this host's documents: global positions shard_index, shard_index + shard_count, ...
               -> per document (RNG from `seed` and the document's global position):
                    split merged punctuation+line-break tokens at `split_rate`,
                    FIM (PSM) at `fim_rate`, append eos
               -> concatenate -> cut into rows of seq_len + 1 -> batches of `batch_size` rows

The documents are shuffled and FIM-ed over the whole corpus before sharding, so the global data
order does not depend on the number of hosts. Packing has no cross-document masking: a row may hold
the end of one document, eos, and the start of the next. Consecutive rows do not overlap, so every
token of every document appears exactly once per epoch. The trainer uses `tokens[:, :-1]` as inputs
and `tokens[:, 1:]` as targets.

FIM (DeepSeek-V3, Prefix-Suffix-Middle): `<|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <|eos|>`.
The two split points are drawn uniformly on the *token* level (cached token arrays are rearranged,
never re-tokenized), so the multiset of a document's tokens is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

from dsv3_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> list[np.ndarray]:
    """int32 token arrays [len_i] of `documents` (no special tokens); empty results are dropped."""
    out = []
    for start in range(0, len(documents), 1024):
        for ids in tokenizer.encode_batch(documents[start : start + 1024]):
            if ids:
                out.append(np.asarray(ids, dtype=np.int32))
    return out


def _token_docs(tokenizer: Tokenizer, documents: Sequence[str] | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Accept either texts or already tokenized documents (from `tokenize_documents`)."""
    if all(isinstance(d, str) for d in documents):
        docs = tokenize_documents(tokenizer, documents)
    else:
        docs = [np.asarray(d, dtype=np.int32) for d in documents if len(d)]
    if not docs:
        raise ValueError("no non-empty documents to read")
    return docs


def fim_permute(
    tokens: np.ndarray, rng: np.random.Generator, *, fim_begin: int, fim_hole: int, fim_end: int
) -> np.ndarray:
    """PSM rearrangement of `tokens` [n] at two uniform token-level split points -> int32 [n + 3]:
    fim_begin, prefix, fim_hole, suffix, fim_end, middle (eos is appended by the caller)."""
    i, j = np.sort(rng.integers(0, len(tokens) + 1, size=2))
    prefix, middle, suffix = tokens[:i], tokens[i:j], tokens[j:]
    return np.concatenate([[fim_begin], prefix, [fim_hole], suffix, [fim_end], middle]).astype(np.int32)


class _DocumentTransform:
    """Per-document randomness of the training stream: merged-token splitting, FIM, then eos."""

    def __init__(self, tokenizer: Tokenizer, fim_rate: float, split_rate: float):
        self.tokenizer, self.fim_rate, self.split_rate = tokenizer, fim_rate, split_rate
        self.eos = tokenizer.eos_id
        if fim_rate > 0:
            self.fim = {"fim_begin": tokenizer.fim_begin_id, "fim_hole": tokenizer.fim_hole_id,
                        "fim_end": tokenizer.fim_end_id}

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.split_rate > 0:
            tokens = self.tokenizer.split_merged_tokens(tokens, self.split_rate, rng)
        if self.fim_rate > 0 and rng.random() < self.fim_rate:
            tokens = fim_permute(tokens, rng, **self.fim)
        return np.append(tokens, np.int32(self.eos)).astype(np.int32)


class _PackedBatchIterator(grain.DatasetIterator):
    """Concatenates the documents of an (infinite) `grain.MapDataset` and cuts batches from the stream.

    State: the index of the document being read and the offset in it, plus `stream` (what defines the
    document order) to refuse a state saved for another corpus, seed or sharding. Documents are a
    pure function of their index (grain's shuffle and random_map are index-seeded), so restoring
    reads them again. The state does not depend on the batch shape: an iterator with another
    batch_size or seq_len continues the same token stream from it.
    """

    def __init__(self, docs: grain.MapDataset, batch_size: int, row_len: int, stream: dict[str, int]):
        super().__init__()
        self._docs, self._shape, self._stream = docs, (batch_size, row_len), stream
        self._index, self._offset = 0, 0
        self._doc: np.ndarray | None = None

    def __next__(self) -> Batch:
        out = np.empty(math.prod(self._shape), np.int32)
        filled = 0
        while filled < out.size:
            if self._doc is None:
                self._doc = self._docs[self._index]
            take = min(out.size - filled, len(self._doc) - self._offset)
            out[filled : filled + take] = self._doc[self._offset : self._offset + take]
            filled, self._offset = filled + take, self._offset + take
            if self._offset == len(self._doc):
                self._index, self._offset, self._doc = self._index + 1, 0, None
        return {"tokens": out.reshape(self._shape)}

    def get_state(self) -> dict[str, Any]:
        return {"doc_index": self._index, "offset": self._offset, "stream": dict(self._stream)}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("stream", self._stream)
        if saved != self._stream:
            raise ValueError(f"data iterator state was saved for stream {saved}, this iterator reads {self._stream}")
        self._index, self._offset, self._doc = int(state["doc_index"]), int(state["offset"]), None


class PackedBatchDataset(grain.IterDataset):
    """A `grain.IterDataset` of packed batches `{"tokens": int32 [batch_size, row_len]}` (see module doc)."""

    def __init__(self, docs: grain.MapDataset, batch_size: int, row_len: int, stream: dict[str, int]):
        super().__init__()
        self._args = (docs, batch_size, row_len, stream)

    def __iter__(self) -> _PackedBatchIterator:
        return _PackedBatchIterator(*self._args)


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
    return shard_index, shard_count


def make_train_dataset(
    tokenizer: Tokenizer,
    documents: Sequence[str] | Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    fim_rate: float = 0.1,
    split_rate: float = 0.0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> PackedBatchDataset:
    """The endless training stream of this host as a grain `IterDataset` (see `make_train_iterator`)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len=} {batch_size=}")
    for name, rate in (("fim_rate", fim_rate), ("split_rate", split_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    docs = _token_docs(tokenizer, documents)
    if len(docs) < shard_count:
        raise ValueError(f"{len(docs)} non-empty documents cannot feed {shard_count} shards")
    stream = (
        grain.MapDataset.source(docs)
        .shuffle(seed=seed)
        .random_map(_DocumentTransform(tokenizer, fim_rate, split_rate), seed=seed)
        .repeat(None)
    )
    info = {"num_documents": len(docs), "seed": seed, "shard_index": shard_index, "shard_count": shard_count}
    return PackedBatchDataset(stream[shard_index::shard_count], batch_size, seq_len + 1, info)


def make_train_iterator(
    tokenizer: Tokenizer,
    documents: Sequence[str] | Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    fim_rate: float = 0.1,
    split_rate: float = 0.0,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DatasetIterator:
    """Endless iterator of this host's training batches `{"tokens": int32 [batch_size, seq_len + 1]}`.

    Args:
      documents: texts, or token arrays from `tokenize_documents` (tokenized once, up front).
      batch_size: rows per batch *on this host*; the global batch is batch_size * shard_count.
      seed: fixes the shuffle of every epoch and every FIM / split decision.
      fim_rate: share of documents rearranged by FIM (PSM).
      split_rate: probability of splitting each merged punctuation+line-break token (0: off).
      shard_index, shard_count: this host and the number of hosts (default: jax.process_index() and
        jax.process_count()); hosts read disjoint documents of each epoch.

    The iterator's `get_state()` is a small JSON-serialisable dict; `set_state(state)` on a new
    iterator built with the same arguments resumes with exactly the batches that would have followed
    (with another batch_size or seq_len it continues the same token stream, e.g. for a batch-size
    ramp). A state saved for other documents, seed or sharding is refused with a ValueError.
    """
    return iter(make_train_dataset(
        tokenizer, documents, seq_len=seq_len, batch_size=batch_size, seed=seed, fim_rate=fim_rate,
        split_rate=split_rate, shard_index=shard_index, shard_count=shard_count,
    ))


def eval_batches(
    tokenizer: Tokenizer,
    documents: Sequence[str] | Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> tuple[list[Batch], int, int]:
    """Fixed held-out batches: documents in order, eos after each, no FIM, no shuffling, packed.

    Returns (batches, n_tokens, n_bytes). Each batch is `{"tokens": int32 [batch_size, seq_len + 1]}`
    holding this host's rows of a global batch of batch_size * shard_count rows; the tail of the
    stream that does not fill a global batch is dropped. n_tokens counts the *target* tokens
    (`tokens[:, 1:]`) of all global batches, n_bytes their UTF-8 bytes (special tokens such as eos
    count 0 bytes), so bits per byte = (summed target cross-entropy in nats) / (ln 2 * n_bytes).
    """
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    docs = _token_docs(tokenizer, documents)
    eos = np.array([tokenizer.eos_id], np.int32)
    stream = np.concatenate([x for d in docs for x in (d, eos)])
    row_len, rows_per_batch = seq_len + 1, batch_size * shard_count
    n_batches = len(stream) // (row_len * rows_per_batch)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches == 0:
        raise ValueError(
            f"held-out data has {len(stream)} tokens, fewer than one global eval batch of "
            f"{rows_per_batch} x {row_len}; lower batch_size or seq_len"
        )
    rows = stream[: n_batches * rows_per_batch * row_len].reshape(n_batches, rows_per_batch, row_len)
    targets = rows[:, :, 1:]
    n_bytes = int(tokenizer.token_byte_lengths[targets].sum())
    local = rows[:, shard_index * batch_size : (shard_index + 1) * batch_size]
    return [{"tokens": b} for b in local], int(targets.size), n_bytes


def unigram_loss(train_ids: Iterable[np.ndarray], heldout_ids: Iterable[np.ndarray], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `heldout_ids` under the unigram distribution of `train_ids`, add-one
    smoothed over `vocab_size` ids: the loss a model with no context would reach.

    Both arguments are collections of int arrays of any shape, e.g.
    `unigram_loss(train_docs, [b["tokens"][:, 1:] for b in batches], tokenizer.vocab_size)`.
    """
    train = np.concatenate([np.ravel(x) for x in train_ids])
    held = np.concatenate([np.ravel(x) for x in heldout_ids])
    if held.size == 0:
        raise ValueError("unigram_loss: no held-out tokens")
    if max(train.max(initial=0), held.max()) >= vocab_size:
        raise ValueError(f"unigram_loss: token ids reach {max(train.max(initial=0), held.max())} >= {vocab_size=}")
    counts = np.bincount(train, minlength=vocab_size) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[held].mean())

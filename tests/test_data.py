"""Data sources and the grain pipeline: splits, readers, FIM, packing, sharding, resume, eval, unigram."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsv3_jax.data import (
    DataError,
    builtin_corpus,
    eval_batches,
    fim_permute,
    load_documents,
    make_train_iterator,
    tokenize_documents,
    train_tokenizer,
    unigram_loss,
)
from dsv3_jax.data.sources import BUILTIN_MAX_BYTES


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(builtin_corpus("train")[:30], vocab_size=512)


@pytest.fixture(scope="module")
def texts():
    """60 short documents cut from stdlib sources (some non-ASCII)."""
    source = "".join(builtin_corpus("train")[:20])
    return [source[i * 997 : i * 997 + 50 + 37 * (i % 11)] + f" ünïcode {i}" for i in range(60)]


def _documents(stream: np.ndarray, eos: int) -> list[np.ndarray]:
    """Cut a packed token stream at eos; the (unfinished) tail is dropped."""
    ends = np.flatnonzero(stream == eos)
    return np.split(stream[: ends[-1] + 1], ends[:-1] + 1)


def _unfim(doc: np.ndarray, tok) -> np.ndarray:
    """Undo `fim_permute` (PSM): fim_begin prefix fim_hole suffix fim_end middle -> prefix middle suffix."""
    if len(doc) == 0 or doc[0] != tok.fim_begin_id:
        return doc
    hole, end = int(np.flatnonzero(doc == tok.fim_hole_id)[0]), int(np.flatnonzero(doc == tok.fim_end_id)[0])
    return np.concatenate([doc[1:hole], doc[end + 1 :], doc[hole + 1 : end]])


def _stream(it, n_batches: int) -> np.ndarray:
    return np.concatenate([next(it)["tokens"].ravel() for _ in range(n_batches)])


# --- sources ---


def test_builtin_corpus():
    train, heldout = builtin_corpus("train"), builtin_corpus("heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert 0.005 < len(heldout) / (len(train) + len(heldout)) < 0.1
    assert sum(len(t.encode()) for t in train + heldout) <= BUILTIN_MAX_BYTES
    assert builtin_corpus("train") == train and load_documents("builtin", "heldout") == heldout
    with pytest.raises(ValueError, match="split"):
        builtin_corpus("validation")


def test_readers_and_splits(tmp_path):
    rows = [f"document {i}\nwith two lines" for i in range(200)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(rows)) + "\n")
    pq.write_table(pa.table({"body": rows, "n": list(range(200))}), tmp_path / "docs.parquet")
    (tmp_path / "docs.txt").write_text("\n\n".join(rows) + "\n \n\n")
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / ".hidden").write_text("not read")
    for i, r in enumerate(rows[:50]):
        (tmp_path / "dir" / "sub" / f"{i:03d}.py").write_text(r + "\n\nsame document\n")
    cases = [
        (tmp_path / "docs.jsonl", {}, rows),
        (tmp_path / "docs.parquet", {"field": "body"}, rows),
        (tmp_path / "docs.txt", {}, rows[:-1] + [rows[-1]]),
        (tmp_path / "dir", {}, [r + "\n\nsame document\n" for r in rows[:50]]),
    ]
    for path, kwargs, expected in cases:
        train, heldout = (load_documents(str(path), s, **kwargs) for s in ("train", "heldout"))
        assert heldout and train and not set(train) & set(heldout), path
        assert sorted(train + heldout) == sorted(expected), path
        assert load_documents(str(path), "heldout", **kwargs) == heldout  # deterministic
        assert len(heldout) <= 0.1 * len(expected) + 1


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_documents(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"content": "y"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: no field 'text'"):
        load_documents(str(tmp_path / "a.jsonl"), "train")
    (tmp_path / "b.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="not a string"):
        load_documents(str(tmp_path / "b.jsonl"), "train")
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet: no column 'text' \(columns: body\)"):
        load_documents(str(tmp_path / "c.parquet"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no non-empty documents"):
        load_documents(str(tmp_path / "empty"), "train")
    (tmp_path / "one.txt").write_text("a single paragraph\n")
    with pytest.raises(DataError, match="at least 2"):
        load_documents(str(tmp_path / "one.txt"), "train")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="bin.txt: not UTF-8"):
        load_documents(str(tmp_path / "bin.txt"), "train")


# --- pipeline ---


def test_fim_permute_round_trip(tok):
    rng = np.random.default_rng(0)
    ids = {"fim_begin": tok.fim_begin_id, "fim_hole": tok.fim_hole_id, "fim_end": tok.fim_end_id}
    for n in (0, 1, 2, 50):
        doc = rng.integers(6, tok.vocab_size, n).astype(np.int32)
        for _ in range(20):
            out = fim_permute(doc, rng, **ids)
            assert out.dtype == np.int32 and len(out) == n + 3 and out[0] == tok.fim_begin_id
            assert sorted(out[~np.isin(out, list(ids.values()))]) == sorted(doc)
            np.testing.assert_array_equal(_unfim(out, tok), doc)


@pytest.mark.parametrize("split_rate", [0.0, 0.5])
def test_packing_keeps_every_token_once(tok, texts, split_rate):
    docs = tokenize_documents(tok, texts)
    it = make_train_iterator(tok, docs, seq_len=31, batch_size=4, seed=1, fim_rate=0.5, split_rate=split_rate,
                             shard_index=0, shard_count=1)
    first = next(it)["tokens"]
    assert first.shape == (4, 32) and first.dtype == np.int32
    n_batches = math.ceil(2 * sum(len(d) + 4 for d in docs) / first.size)  # two epochs at least
    out = _documents(np.concatenate([first.ravel(), _stream(it, n_batches)]), tok.eos_id)
    epoch1, epoch2 = out[: len(docs)], out[len(docs) : 2 * len(docs)]
    assert sum(d[0] == tok.fim_begin_id for d in epoch1) > 10  # FIM at rate 0.5 happened
    for epoch in (epoch1, epoch2):
        restored = [_unfim(d[:-1], tok) for d in epoch]  # drop eos, undo FIM
        assert sorted(tok.decode(d) for d in restored) == sorted(texts)
        if split_rate == 0.0:
            assert sorted(map(tuple, restored)) == sorted(map(tuple, docs))
    assert [tok.decode(_unfim(d[:-1], tok)) for d in epoch1] != [tok.decode(_unfim(d[:-1], tok)) for d in epoch2]


def test_determinism_and_shards(tok):
    # Document k is the token 6 + k repeated, so every token names its document.
    docs = [np.full(3 + (k * 7) % 23, 6 + k, np.int32) for k in range(40)]
    kwargs = {"seq_len": 15, "batch_size": 2, "fim_rate": 0.0}

    def doc_ids(seed, shard_index, shard_count, n):
        it = make_train_iterator(tok, docs, seed=seed, shard_index=shard_index, shard_count=shard_count, **kwargs)
        return [int(d[0]) - 6 for d in _documents(_stream(it, n), tok.eos_id)]

    a, b = doc_ids(0, 0, 1, 20), doc_ids(0, 0, 1, 20)
    assert a == b and doc_ids(1, 0, 1, 20) != a
    shard0, shard1 = doc_ids(0, 0, 2, 40)[:20], doc_ids(0, 1, 2, 40)[:20]
    assert not set(shard0) & set(shard1) and set(shard0) | set(shard1) == set(range(40))
    # Sharding takes alternate documents of the one global order.
    assert [x for pair in zip(shard0, shard1, strict=True) for x in pair] == doc_ids(0, 0, 1, 40)[:40]


@pytest.mark.parametrize("split_rate", [0.0, 0.3])
def test_resume(tok, texts, split_rate):
    def make():
        return make_train_iterator(tok, texts, seq_len=63, batch_size=2, seed=3, fim_rate=0.3,
                                   split_rate=split_rate, shard_index=1, shard_count=2)

    it = make()
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["tokens"] for _ in range(25)]  # crosses an epoch boundary of this shard
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)
    it.set_state(state)  # rewinding the same iterator also works
    np.testing.assert_array_equal(next(it)["tokens"], expected[0])
    # The state is independent of the batch shape: twice the rows continue the same stream.
    wide = make_train_iterator(tok, texts, seq_len=63, batch_size=4, seed=3, fim_rate=0.3,
                               split_rate=split_rate, shard_index=1, shard_count=2)
    wide.set_state(state)
    np.testing.assert_array_equal(next(wide)["tokens"], np.concatenate(expected[:2]))
    other = make_train_iterator(tok, texts, seq_len=63, batch_size=2, seed=4, shard_index=1, shard_count=2)
    with pytest.raises(ValueError, match="state was saved for stream"):
        other.set_state(state)


def test_eval_batches(tok, texts):
    ascii_texts = [t.encode("ascii", "ignore").decode() for t in texts]
    batches, n_tokens, n_bytes = eval_batches(tok, ascii_texts, seq_len=31, batch_size=4, shard_index=0, shard_count=1)
    assert len(batches) >= 2 and all(b["tokens"].shape == (4, 32) for b in batches)
    assert n_tokens == len(batches) * 4 * 31
    targets = np.concatenate([b["tokens"][:, 1:].ravel() for b in batches])
    assert n_bytes == len(tok.decode(targets[targets != tok.eos_id]).encode())
    # No shuffling or FIM: the stream is the documents in order, each followed by eos.
    stream = np.concatenate([b["tokens"].ravel() for b in batches])
    expected = np.concatenate([x for d in tokenize_documents(tok, ascii_texts) for x in (d, [tok.eos_id])])
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    again = eval_batches(tok, ascii_texts, seq_len=31, batch_size=4, shard_index=0, shard_count=1)
    assert again[1:] == (n_tokens, n_bytes)
    # Two hosts with 2 rows each hold the rows of the same global batches of 4.
    halves = [eval_batches(tok, ascii_texts, seq_len=31, batch_size=2, shard_index=i, shard_count=2) for i in (0, 1)]
    for i, b in enumerate(batches):
        np.testing.assert_array_equal(np.concatenate([h[0][i]["tokens"] for h in halves]), b["tokens"])
    assert halves[0][1:] == halves[1][1:] == (n_tokens, n_bytes)
    assert len(eval_batches(tok, ascii_texts, seq_len=31, batch_size=4, max_batches=1, shard_index=0,
                            shard_count=1)[0]) == 1
    with pytest.raises(ValueError, match="fewer than one global eval batch"):
        eval_batches(tok, ascii_texts[:2], seq_len=1023, batch_size=8, shard_index=0, shard_count=1)


def test_unigram_loss(tok, texts):
    # Train counts [2, 1, 0] + 1 -> p = [3, 2, 1] / 6.
    expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert unigram_loss([np.array([0, 0, 1])], [np.array([0, 2])], 3) == pytest.approx(expected)
    docs = tokenize_documents(tok, texts)
    loss = unigram_loss(docs[:50], docs[50:], tok.vocab_size)
    assert 0 < loss < math.log(tok.vocab_size)
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_loss([np.array([0, 5])], [np.array([0])], 3)

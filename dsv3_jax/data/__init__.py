"""Data: tokenizer (byte-level BPE, DeepSeek-V3 pre-tokenization), sources, and the grain pipeline.

    tok = train_tokenizer(load_documents("builtin", "train"), vocab_size=2048)
    train_docs = tokenize_documents(tok, load_documents("builtin", "train"))
    it = make_train_iterator(tok, train_docs, seq_len=256, batch_size=8, seed=0)
    batch = next(it)                       # {"tokens": int32 [8, 257]}
    state = it.get_state()                  # JSON-serialisable; it.set_state(state) resumes
    batches, n_tokens, n_bytes = eval_batches(tok, load_documents("builtin", "heldout"), seq_len=256, batch_size=8)
"""

from dsv3_jax.data.pipeline import (
    PackedBatchDataset,
    eval_batches,
    fim_permute,
    make_train_dataset,
    make_train_iterator,
    tokenize_documents,
    unigram_loss,
)
from dsv3_jax.data.sources import DataError, builtin_corpus, load_documents, read_jsonl, read_parquet, read_text
from dsv3_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, load_tokenizer, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS", "DataError", "PackedBatchDataset", "Tokenizer", "TokenizerError", "builtin_corpus",
    "eval_batches", "fim_permute", "load_documents", "load_tokenizer", "make_train_dataset",
    "make_train_iterator", "read_jsonl", "read_parquet", "read_text", "tokenize_documents", "train_tokenizer",
    "unigram_loss",
]

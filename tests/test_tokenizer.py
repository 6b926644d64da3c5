"""Tokenizer: DeepSeek-V3 pre-tokenization, round trips, special tokens, HF files, merged-token splitting."""

import json
import unicodedata

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3_jax.data import (
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    builtin_corpus,
    load_tokenizer,
    train_tokenizer,
)

UNICODE_TEXT = (
    "naïve café — “quotes” ½ ² 中文字符测试 ひらがな カタカナ 한국어 😀👍🏽 e\u0301 \u200b\x00\x07\t\r\n"
    "x = 12345678 + ٣٤٥٦ # Ⅻ\r\n\r\n  trailing   \n"
)


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus("train")[:60]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer([*corpus, UNICODE_TEXT], vocab_size=1024)


def test_special_token_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id) == (3, 4, 5)
    assert tok.vocab_size == 1024
    assert tok.decode([tok.eos_id]) == "<|eos|>"
    # Special-token spellings inside a document are plain text, never control tokens.
    ids = tok.encode("a<|eos|>b<|fim_begin|>")
    assert not set(ids) & set(range(6))
    assert tok.decode(ids) == "a<|eos|>b<|fim_begin|>"


def test_round_trip(tok):
    texts = [UNICODE_TEXT, "", " ", "\n\n\n", *builtin_corpus("heldout")]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_token_bytes_cover_text(tok):
    for text in (UNICODE_TEXT, builtin_corpus("heldout")[0]):
        assert tok.token_byte_lengths[tok.encode(text)].sum() == len(text.encode())
    assert tok.token_byte_lengths[:6].tolist() == [0] * 6


def test_digits_split(tok):
    for i in range(6, tok.vocab_size):
        text = tok.token_bytes[i].decode("utf-8", errors="ignore")
        digits = sum(unicodedata.category(c)[0] == "N" for c in text)
        assert digits <= 3, text
        assert digits == 0 or digits == len(text), text  # digits never merge with other characters
    assert [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str("x1234567")] == ["x", "123", "456", "7"]
    assert all(len(tok.decode([i])) <= 3 for i in tok.encode("1234567 99999"))


def test_pre_tokenizer_merges_punctuation_with_line_breaks(tok):
    pieces = tok.hf.pre_tokenizer.pre_tokenize_str("def f(x):\n    return 1\n")
    assert "):Ċ" in [p for p, _ in pieces]  # ByteLevel spells "\n" as "Ċ"
    assert tok.merged_token_pieces, "training on Python source must create punctuation+newline tokens"
    colon = tok.encode(":\n")
    assert len(colon) == 1 and colon[0] in tok.merged_token_pieces
    for i, p in tok.merged_token_pieces.items():
        assert tok.decode(p) == tok.decode([i]) and len(p) >= 2
        assert not set(p) & set(tok.merged_token_pieces)


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_split_merged_tokens_keeps_text(tok, corpus, rate):
    rng = np.random.default_rng(0)
    ids = np.array(tok.encode(corpus[0]), np.int32)
    out = tok.split_merged_tokens(ids, rate, rng)
    assert out.dtype == np.int32 and tok.decode(out) == corpus[0]
    merged = np.isin(ids, list(tok.merged_token_pieces)).sum()
    assert merged > 0
    if rate == 0.0:
        np.testing.assert_array_equal(out, ids)
    if rate == 1.0:
        assert not np.isin(out, list(tok.merged_token_pieces)).any()
        assert len(out) > len(ids)
    if rate == 0.3:
        assert len(ids) < len(out) < len(ids) + merged * max(map(len, tok.merged_token_pieces.values()))


def test_save_load(tok, tmp_path, corpus):
    tok.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|bos|>" and config["eos_token"] == "<|eos|>"
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert loaded.encode(corpus[1]) == tok.encode(corpus[1])
        assert (loaded.bos_id, loaded.eos_id, loaded.fim_end_id, loaded.vocab_size) == (0, 1, 5, 1024)


def _hf_tokenizer(specials: list[str], extra_specials: list[str] = ()) -> tokenizers.Tokenizer:
    """A small byte-level BPE written by `tokenizers` itself (the HF tokenizer.json format)."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(["hello world, hello tokenizer\n"] * 10, trainer)
    hf.add_special_tokens(list(extra_specials))
    return hf


def test_load_deepseek_spellings(tmp_path):
    deepseek = {role: spellings[1] for role, spellings in SPECIAL_TOKENS.items()}
    assert deepseek["bos"] == "<｜begin▁of▁sentence｜>"
    hf = _hf_tokenizer([deepseek["bos"], deepseek["eos"], deepseek["pad"]],
                       [deepseek["fim_hole"], deepseek["fim_begin"], deepseek["fim_end"]])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True,
        "bos_token": {"__type": "AddedToken", "content": deepseek["bos"], "special": True},
        "eos_token": {"__type": "AddedToken", "content": deepseek["eos"], "special": True},
    }))
    tok = load_tokenizer(tmp_path)
    n = hf.get_vocab_size() - 3
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.fim_hole_id, tok.fim_begin_id, tok.fim_end_id) == (n, n + 1, n + 2)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.token_bytes[tok.eos_id] == b""


def test_tokenizer_config_names_bos_eos(tmp_path):
    _hf_tokenizer(["<s>", "</s>"]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)  # pad falls back to eos
    with pytest.raises(TokenizerError, match="fim_begin"):
        _ = tok.fim_begin_id


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    _hf_tokenizer(["<|bos|>"]).save(str(tmp_path / "noeos.json"))
    with pytest.raises(TokenizerError, match="no eos token"):
        load_tokenizer(tmp_path / "noeos.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
    assert isinstance(train_tokenizer(["abc abc"], vocab_size=300), Tokenizer)

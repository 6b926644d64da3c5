"""Byte-level BPE tokenizer with DeepSeek-V3's pre-tokenization, on Hugging Face `tokenizers`.

`train_tokenizer` builds a tokenizer with the same pre-tokenizer as DeepSeek-V3's tokenizer.json:
digits in runs of at most three, CJK runs, then a main regex in which a run of punctuation takes the
line breaks that follow it (`):\\n` is one pre-token), all then mapped to bytes (GPT-2 byte-level
alphabet, so every string round-trips). `load_tokenizer` reads any HF tokenizer.json, including
DeepSeek-V3's own, whose special tokens are spelled `<｜begin▁of▁sentence｜>` and so on.

Training-time splitting of merged punctuation+line-break tokens (REFERENCE.md: "a share of such
merged tokens is split at random during training") is `Tokenizer.split_merged_tokens`.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

# DeepSeek-V3 tokenizer.json: a Sequence of Split(behavior=isolated) regexes, then ByteLevel.
DIGITS_REGEX = r"\p{N}{1,3}"
CJK_REGEX = r"[一-龥぀-ゟ゠-ヿ]+"
MAIN_REGEX = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Special-token roles and the spellings accepted for each; the first is what `train_tokenizer` writes
# (ids 0..5 in this order: bos=0 and eos=1 as in the model configs), the others are DeepSeek's.
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "bos": ("<|bos|>", "<｜begin▁of▁sentence｜>", "<|begin_of_sentence|>"),
    "eos": ("<|eos|>", "<｜end▁of▁sentence｜>", "<|end_of_sentence|>"),
    "pad": ("<|pad|>", "<｜▁pad▁｜>"),
    "fim_begin": ("<|fim_begin|>", "<｜fim▁begin｜>"),
    "fim_hole": ("<|fim_hole|>", "<｜fim▁hole｜>"),
    "fim_end": ("<|fim_end|>", "<｜fim▁end｜>"),
}
_REQUIRED_ROLES = ("bos", "eos")  # checked on load; FIM tokens are checked when used, pad falls back to eos


class TokenizerError(ValueError):
    """A tokenizer file is malformed or lacks a special token this project needs."""


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: vocab character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _is_punct_or_symbol(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def _merged_token_parts(text: str) -> tuple[str, str] | None:
    """`' {\\n\\n'` -> (`' {'`, `'\\n\\n'`): a pre-token of the form ` ?[\\p{P}\\p{S}]+[\\r\\n]+`, else None."""
    head = text.rstrip("\r\n")
    breaks = text[len(head):]
    punct = head[1:] if head.startswith(" ") else head
    if not breaks or not punct or not all(_is_punct_or_symbol(c) for c in punct):
        return None
    return head, breaks


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids and byte tables the data pipeline needs.

    `encode` never adds special tokens and treats special-token spellings inside the text as plain
    text, so training documents cannot inject control tokens; `decode` keeps special tokens.
    """

    def __init__(self, hf: tokenizers.Tokenizer, special_names: dict[str, str] | None = None):
        self.hf = hf
        self.hf.encode_special_tokens = True
        vocab = hf.get_vocab(with_added_tokens=True)
        self._ids: dict[str, int] = {}
        for role, spellings in SPECIAL_TOKENS.items():
            names = [special_names[role]] if special_names and role in special_names else list(spellings)
            found = [vocab[n] for n in names if n in vocab]
            if found:
                self._ids[role] = found[0]
            elif role in _REQUIRED_ROLES:
                raise TokenizerError(f"tokenizer has no {role} token: looked for {' or '.join(names)}")
        self._vocab_size = max(vocab.values()) + 1

    # --- encoding ---
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (multithreaded in Rust)."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """1 + the largest token id (the model's embedding table must have at least this many rows)."""
        return self._vocab_size

    def _special(self, role: str) -> int:
        if role not in self._ids:
            raise TokenizerError(f"tokenizer has no {role} token: looked for {' or '.join(SPECIAL_TOKENS[role])}")
        return self._ids[role]

    @property
    def bos_id(self) -> int:
        return self._special("bos")

    @property
    def eos_id(self) -> int:
        return self._special("eos")

    @property
    def pad_id(self) -> int:
        """The pad token, or eos where the tokenizer has none."""
        return self._ids.get("pad", self.eos_id)

    @property
    def fim_begin_id(self) -> int:
        return self._special("fim_begin")

    @property
    def fim_hole_id(self) -> int:
        return self._special("fim_hole")

    @property
    def fim_end_id(self) -> int:
        return self._special("fim_end")

    # --- byte tables ---
    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """UTF-8 bytes each token id stands for; b"" for special tokens and unused ids."""
        added = self.hf.get_added_tokens_decoder()
        byte_level = isinstance(self.hf.decoder, decoders.ByteLevel)
        table = _byte_decoder()
        out = []
        for i in range(self._vocab_size):
            token = self.hf.id_to_token(i)
            if token is None or (i in added and added[i].special):
                out.append(b"")
            elif i in added:
                out.append(added[i].content.encode())
            elif byte_level and all(c in table for c in token):
                out.append(bytes(table[c] for c in token))
            else:
                out.append(self.decode([i]).encode())
        return out

    @functools.cached_property
    def token_byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: len(token_bytes[i]) (0 for special tokens)."""
        return np.array([len(b) for b in self.token_bytes], dtype=np.int32)

    # --- merged punctuation + line-break tokens ---
    @functools.cached_property
    def merged_token_pieces(self) -> dict[int, list[int]]:
        """For every token whose text is punctuation followed by line breaks (e.g. `):\\n`), the ids of
        its punctuation part and line-break part encoded separately (`):` + `\\n`)."""
        pieces = {}
        for i, raw in enumerate(self.token_bytes):
            try:
                parts = _merged_token_parts(raw.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            if parts is not None:
                pieces[i] = self.encode(parts[0]) + self.encode(parts[1])
        return pieces

    @functools.cached_property
    def _piece_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(count [vocab], ids [vocab, max_pieces]); count 0 marks tokens that are not merged."""
        width = max((len(p) for p in self.merged_token_pieces.values()), default=1)
        count = np.zeros(self._vocab_size, np.int32)
        table = np.zeros((self._vocab_size, width), np.int32)
        for i, p in self.merged_token_pieces.items():
            count[i] = len(p)
            table[i, : len(p)] = p
        return count, table

    def split_merged_tokens(self, ids: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
        """Replace each merged punctuation+line-break token of `ids` [n] by its pieces with probability
        `rate`; returns int32 [m >= n]. The decoded text is unchanged."""
        ids = np.asarray(ids, dtype=np.int32)
        count, table = self._piece_table
        split = (count[ids] > 0) & (rng.random(ids.shape) < rate)
        if not split.any():
            return ids
        reps = np.where(split, count[ids], 1)
        src = np.repeat(np.arange(len(ids)), reps)  # output position -> input position
        within = np.arange(len(src)) - np.repeat(np.cumsum(reps) - reps, reps)
        return np.where(split[src], table[ids[src], within], ids[src]).astype(np.int32)

    # --- files ---
    def save(self, directory: str | Path) -> Path:
        """Write `directory`/tokenizer.json and a tokenizer_config.json naming bos/eos/pad; returns the dir."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for role in ("bos", "eos", "pad"):
            if role in self._ids:
                config[f"{role}_token"] = self.hf.id_to_token(self._ids[role])
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with DeepSeek-V3's pre-tokenizer on `texts`.

    `vocab_size` counts everything: the 6 special tokens (ids 0..5: bos, eos, pad, fim_begin,
    fim_hole, fim_end), the 256 byte symbols, and the merges. A small corpus may stop early with
    fewer tokens.
    """
    n_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size <= n_fixed:
        raise ValueError(f"vocab_size must exceed {n_fixed} (6 special tokens + 256 bytes), got {vocab_size}")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in (DIGITS_REGEX, CJK_REGEX, MAIN_REGEX)]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[spellings[0] for spellings in SPECIAL_TOKENS.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)


def _config_token_name(value: object) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json file, or a directory holding one (an HF tokenizer directory, e.g. DeepSeek-V3's).

    bos/eos/pad names come from tokenizer_config.json beside it when present, else from the
    spellings in `SPECIAL_TOKENS`.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer file at {file}")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise TokenizerError(f"cannot read tokenizer {file}: {e}") from e
    names = {}
    config_file = file.parent / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for role in ("bos", "eos", "pad"):
            name = _config_token_name(config.get(f"{role}_token"))
            if name is not None:
                names[role] = name
    try:
        return Tokenizer(hf, names)
    except TokenizerError as e:
        raise TokenizerError(f"{file}: {e}") from None

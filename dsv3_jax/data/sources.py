"""Documents for training and evaluation: a built-in corpus and readers for text, JSONL and parquet.

`load_documents(spec, split)` is the one entry point: `spec` is "builtin" or a path. A document is a
string; the pipeline tokenizes it, appends eos and packs documents together.

- builtin: the Python standard library's own .py files (no download), one document per file.
- a directory: every non-hidden file under it, in sorted order, read by suffix as below, except that
  a plain text file is one document.
- a text file given directly: one document per blank-line-separated block (a single document could
  be neither shuffled nor split into train and heldout).
- `.jsonl`: one document per line, the string in `field` (default "text").
- `.parquet`: one document per row, the string in column `field` (default "text").

Empty documents are dropped. The heldout split is a deterministic ~2% of documents chosen by a hash
(of the relative path for the built-in corpus, of the text otherwise, so duplicates share a split),
never empty, and disjoint from the train split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.02
BUILTIN_MAX_BYTES = 3_000_000  # keeps tokenizer training and tiny-model epochs quick on 2 CPU cores
BUILTIN_MAX_FILE_BYTES = 100_000
# Test suites, installed packages, and generated or legacy code (codec tables, pydoc topics, 2to3, distutils).
_BUILTIN_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
    "encodings", "pydoc_data", "lib2to3", "distutils", "ensurepip",
})
_BLANK_LINES = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


class DataError(ValueError):
    """A data source is malformed, empty, or lacks the requested field."""


def _unit_hash(key: str, salt: str) -> float:
    """A stable pseudo-random number in [0, 1) from `key` (same on every machine and Python run)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _heldout_mask(keys: Sequence[str]) -> list[bool]:
    """~HELDOUT_FRACTION of `keys` by hash; at least one heldout and one train key when len(keys) >= 2."""
    scores = [_unit_hash(k, "heldout") for k in keys]
    mask = [s < HELDOUT_FRACTION for s in scores]
    if not any(mask) or all(mask):
        first = min(range(len(keys)), key=scores.__getitem__)
        mask = [i == first for i in range(len(keys))]
    return mask


def _select_split(docs: Sequence[str], keys: Sequence[str], split: str, source: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if len(docs) < 2:
        raise DataError(f"{source}: found {len(docs)} document(s); a train/heldout split needs at least 2")
    heldout = split == "heldout"
    return [d for d, h in zip(docs, _heldout_mask(keys), strict=True) if h == heldout]


@functools.cache
def _builtin_files() -> tuple[tuple[str, str], ...]:
    """(relative path, text) of the built-in corpus, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _BUILTIN_SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if 0 < size <= BUILTIN_MAX_FILE_BYTES:
            candidates.append((rel.as_posix(), path, size))
    # Cap the total with a hash-ordered (so spread over the whole library) but deterministic choice.
    candidates.sort(key=lambda c: _unit_hash(c[0], "builtin"))
    chosen, total = [], 0
    for rel, path, size in candidates:
        if total + size > BUILTIN_MAX_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            chosen.append((rel, text))
            total += size
    chosen.sort()
    seen, unique = set(), []
    for rel, text in chosen:  # identical files (e.g. one-line __init__.py) would straddle the split
        if text not in seen:
            seen.add(text)
            unique.append((rel, text))
    if not unique:
        raise DataError(f"built-in corpus: no Python source files found under {root}")
    return tuple(unique)


def builtin_corpus(split: str) -> list[str]:
    """The Python standard library's .py files (a few MB), one document per file, for `split` in SPLITS."""
    files = _builtin_files()
    return _select_split([t for _, t in files], [r for r, _ in files], split, "built-in corpus")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_text(path: str | Path) -> list[str]:
    """A text file's blank-line-separated blocks, each one document."""
    return [b for b in _BLANK_LINES.split(_read_utf8(Path(path))) if b.strip()]


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSONL file; a line that is not JSON is a DataError naming
    the file and line."""
    path = Path(path)
    for n, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None


def read_jsonl(path: str | Path, field: str = "text") -> list[str]:
    """The string `field` of every JSON object line of `path`."""
    path, docs = Path(path), []
    for n, row in json_lines(path):
        if not isinstance(row, dict) or field not in row:
            raise DataError(f"{path}:{n}: no field {field!r} in this line")
        if not isinstance(row[field], str):
            raise DataError(f"{path}:{n}: field {field!r} is {type(row[field]).__name__}, not a string")
        if row[field]:
            docs.append(row[field])
    return docs


def read_parquet(path: str | Path, column: str = "text") -> list[str]:
    """The non-empty strings of column `column` of a parquet file."""
    path = Path(path)
    names = pq.read_schema(path).names
    if column not in names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)})")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    if any(v is not None and not isinstance(v, str) for v in values):
        raise DataError(f"{path}: column {column!r} does not hold strings")
    return [v for v in values if v]


def _read_file(path: Path, field: str, whole_text: bool) -> list[str]:
    if path.suffix == ".jsonl":
        return read_jsonl(path, field)
    if path.suffix == ".parquet":
        return read_parquet(path, field)
    if whole_text:
        text = _read_utf8(path)
        return [text] if text.strip() else []
    return read_text(path)


def load_documents(spec: str, split: str, *, field: str = "text") -> list[str]:
    """Documents of `split` ("train" or "heldout") from `spec`: "builtin" or a file or directory path.

    `field` names the JSONL field or parquet column holding the text.
    """
    if spec == "builtin":
        return builtin_corpus(split)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(spec)
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist (give a file, a directory, or 'builtin')")
    if root.is_dir():
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        docs = [d for f in files for d in _read_file(f, field, whole_text=True)]
    else:
        docs = _read_file(root, field, whole_text=False)
    if not docs:
        raise DataError(f"{root}: no non-empty documents found")
    return _select_split(docs, docs, split, str(root))

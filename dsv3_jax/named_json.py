"""Shipped JSON files found by name or by path: model configs (`configs/`) and training recipes (`configs/recipes/`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def shipped_names(directory: Path) -> list[str]:
    """Names (file stems) of the JSON files shipped in `directory`."""
    return sorted(p.stem for p in directory.glob("*.json"))


def read_named_json(name_or_path: str | os.PathLike, directory: Path, kind: str,
                    error: type[Exception]) -> tuple[dict[str, Any], Path]:
    """(JSON object, its path) of a file path, else of `<directory>/<name>.json`; `error` names what is wrong.

    A directory path means its `config.json` (an HF model directory).
    """
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        shipped = directory / f"{name_or_path}.json"
        if not shipped.is_file():
            raise error(f"no {kind} named {str(name_or_path)!r}: not a file and not one of {shipped_names(directory)}")
        path = shipped
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw, path

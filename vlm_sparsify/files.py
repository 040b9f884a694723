"""Reading a run's files: one that is truncated, corrupt or not what it should be is one error
naming it (what the command-line tools print as their one line), never a loader's traceback."""

from __future__ import annotations

import json
import pickle
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor


class UnreadableFileError(ValueError):
    """A file that exists but cannot be read: truncated, corrupt, or not of its format."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unreadable(path: str | Path, what: str, err: BaseException) -> UnreadableFileError:
    """The error for `path`, which is not readable as `what`."""
    return UnreadableFileError(
        f"cannot read {path}: it is not a readable {what} (truncated or corrupt? "
        f"{_first_line(err)})"
    )


def read_json(path: str | Path, keys: Collection[str] | None = None) -> Any:
    """`path`'s JSON (UTF-8, with or without a byte-order mark, whatever the locale; UTF-16 and
    32 as JSON allows); malformed JSON is an error naming the file and the place. With `keys`,
    the document must be an object holding them (else an error naming the file: another
    tool's file, or one edited by hand)."""
    try:
        data = json.loads(Path(path).read_bytes())  # bytes: json detects the encoding
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UnreadableFileError(f"{path} is not valid JSON: {err}") from None
    if keys is not None:
        if not isinstance(data, dict):
            what = f"holds a JSON {type(data).__name__} where an object is expected"
        elif missing := [key for key in keys if key not in data]:
            what = f"lacks {', '.join(missing)}"
        else:
            return data
        raise UnreadableFileError(
            f"{path} {what}: not the file this tool wrote (damaged, or edited by hand)"
        )
    return data


def read_jsonl(path: str | Path) -> list[Any]:
    """The rows of a JSON-lines file (blank lines skipped); a malformed line is an error naming
    the file and the line. A byte-order mark before the first line (Windows editors write one)
    is skipped, as for a metadata.csv."""
    with Path(path).open(encoding="utf-8-sig") as f:
        return jsonl_rows(f, path)


def jsonl_rows(lines: Iterable[str], path: str | Path) -> list[Any]:
    """The rows of JSON-lines text read from `path` (named in the error for a malformed line)."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UnreadableFileError(f"{path}:{number}: not valid JSON ({err})") from None
    return rows


def load_torch(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)`: only tensors and plain data, never code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        if not Path(path).is_file():
            raise
        raise unreadable(path, "torch file", err) from None


def _not_a_folder(path: str | Path) -> None:
    """safetensors reads a folder as 'No such device (os error 19)', naming nothing."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a safetensors file")


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of a .safetensors file."""
    _not_a_folder(path)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise unreadable(path, "safetensors file", err) from None


@contextmanager
def open_safetensors(path: str | Path, device: str | torch.device = "cpu") -> Iterator[Any]:
    """`safe_open(path)`, its errors (on opening or reading a tensor) naming the file."""
    _not_a_folder(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            yield f
    except SafetensorError as err:
        raise unreadable(path, "safetensors file", err) from None

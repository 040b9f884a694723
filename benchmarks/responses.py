"""Reading benchmark record files: JSONL, or one JSON array (both official formats)."""

import json
import reprlib
from pathlib import Path
from typing import Any

from vlm_sparsify.files import UnreadableFileError, jsonl_rows


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-array file or a JSONL file (one object a line; blank lines skipped);
    a file without any record is an error."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UnreadableFileError(f"{path}: not a valid JSON array ({err})") from None
    else:
        records = jsonl_rows(text.splitlines(), path)
    if not records:
        raise ValueError(f"{path} holds no records")
    bad = next((r for r in records if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: every record must be a JSON object, got {reprlib.repr(bad)}")
    return records


def require_fields(record: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    """Raise a ValueError naming the missing fields of one record."""
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: record {reprlib.repr(record)} lacks {', '.join(missing)}")


def require_text(record: dict[str, Any], field: str, where: str) -> str:
    """A record's model output, which must be a string (null or a number is a broken file)."""
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {field} of record {reprlib.repr(record)} is not a string")
    return text


def require_id(record: dict[str, Any], field: str, where: str) -> int:
    """A record's integer id: an int, an integral float (1005.0) or a string of digits; a bool or
    a fraction (1005.7) is a broken file, not an id to round."""
    value = record[field]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{where}: {field} {reprlib.repr(record[field])} is not an integer "
            f"(record {reprlib.repr(record)})"
        )
    return value

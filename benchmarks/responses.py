"""Reading benchmark record files: JSONL, or one JSON array (both official formats)."""

import json
from pathlib import Path
from typing import Any

from vlm_sparsify.files import jsonl_rows


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-array file or a JSONL file (one object a line; blank lines skipped)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = jsonl_rows(text.splitlines(), path)
    bad = next((r for r in records if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: every record must be a JSON object, got {bad!r}")
    return records


def require_fields(record: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    """Raise a ValueError naming the missing fields of one record."""
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: record {record!r} lacks {', '.join(missing)}")

"""The files of one benchmark output folder (`--out DIR`) and how stages read them.

capture.json               capture's settings, data flags and counts
responses.jsonl            one line per generated sample: id, prompt, response, benchmark fields
responses_official.json[l] the same responses in the benchmark's official format
store/                     sparse feature store (benchmarks/store.py), when coders were given;
                           its attributions.safetensors: activation x gradient (`attribute`)
metrics.json               official metrics (`score --out DIR`)
classification.json        GOOD / BAD per sample (`classify`)
features.json              selected features and the held-out split (`analyze`)
feature_stats.npz          every statistic of every feature (`analyze`, for plots and steer)
neuron_map.json            the MLP neurons each selected feature maps to (`map`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlm_sparsify.files import read_json

CAPTURE = "capture.json"
RESPONSES = "responses.jsonl"
OFFICIAL_RESPONSES = ("responses_official.jsonl", "responses_official.json")
STORE = "store"
METRICS = "metrics.json"
CLASSIFICATION = "classification.json"
ATTRIBUTIONS = "attributions.safetensors"
"""Inside STORE."""
FEATURES = "features.json"
FEATURE_STATS = "feature_stats.npz"
NEURON_MAP = "neuron_map.json"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file (text as UTF-8) under a temporary name, fsync it, then rename it over
    `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        file.write(data.encode("utf-8") if isinstance(data, str) else data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def append_lines(path: Path, text: str) -> None:
    """Append whole lines to an append-only log and fsync them; a torn last line a crash left
    is dropped first, so the new lines do not continue it."""
    with open(path, "ab+") as file:
        file.seek(0, os.SEEK_END)
        if file.tell():
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.seek(0)
                kept = file.read().rpartition(b"\n")[0]
                file.truncate(0)
                file.write(kept + b"\n" if kept else b"")
        file.write(text.encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def read_append_log(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written append-only (responses.jsonl): none while it does not exist,
    and a torn last line (a crash mid-append) is ignored; vlm_sparsify.files.read_jsonl is strict."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON object") from None
    return records


def capture_info(out: str | Path, benchmark: str | None = None) -> dict[str, Any]:
    """capture.json of an output folder (`settings`, `data`, `counts`); with `benchmark`, a
    capture of another benchmark is refused (`check_benchmark`)."""
    path = Path(out) / CAPTURE
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: run `capture --out {out}` first")
    info = read_json(path, keys=("data",))
    if benchmark is not None:
        check_benchmark(path, info["data"], benchmark)
    return info


def check_benchmark(path: Path, data: dict[str, Any], benchmark: str) -> None:
    """`data` (capture.json's data flags, at `path`) are `benchmark`'s: an --out captured for
    another benchmark has other flags (easy-VQA's kinds, POPE's questions and images, ...)."""
    from dataclasses import fields

    from benchmarks import BENCHMARKS
    from benchmarks.adapters import get_adapter

    def flags(name: str) -> set[str]:
        return {f.name for f in fields(get_adapter(name).Data)}

    if set(data) <= flags(benchmark):
        return
    other = [name for name in BENCHMARKS if name != benchmark and set(data) <= flags(name)]
    whose = f"a capture of {other[0]}" if other else "a capture of another benchmark"
    raise ValueError(
        f"{path} is {whose} (data flags {sorted(data)}), not of {benchmark}: run "
        f"`python -m benchmarks {other[0] if other else 'BENCHMARK'} ...` on it, or capture "
        f"{benchmark} into another --out"
    )


def check_score_out(out: str | None, **response_flags: str | None) -> None:
    """`score --out DIR` scores DIR's own official responses and writes DIR/metrics.json: a
    response file given as well would be ignored, or its metrics filed under DIR's capture."""
    given = [f"--{name.replace('_', '-')}" for name, value in response_flags.items() if value]
    if out and given:
        flags = " and ".join(given)
        raise ValueError(
            f"{flags} with --out: --out scores the responses of the capture in {out} and writes "
            f"its metrics.json; leave out {flags}, or --out to score the file"
        )


def official_responses(out: str | Path) -> Path:
    """The official-format response file capture wrote into `out`."""
    for name in OFFICIAL_RESPONSES:
        path = Path(out) / name
        if path.is_file():
            return path
    if (Path(out) / RESPONSES).is_file():
        raise FileNotFoundError(
            f"no {' or '.join(OFFICIAL_RESPONSES)} in {out}: its capture did not finish; rerun "
            "the same capture command (it resumes where it stopped)"
        )
    raise FileNotFoundError(
        f"no {' or '.join(OFFICIAL_RESPONSES)} in {out}: run `capture --out {out}` first"
    )

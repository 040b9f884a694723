"""Sparse feature store: per token and source layer the coder's k active (index, value) pairs.

Layout of a store folder (see `docs/internals.md`, "Feature store"):

    meta.json                  hookpoints, k, num_latents, value_dtype, index_dtype, coders,
                               fingerprint
    shards/NNNNN.safetensors   `indices` and `values`, both [T, S, k] (T rows of the shard)
    index.jsonl                one line per sample: id, shard, start, stop, regions

Append-only and crash-safe: a shard is written under a temporary name, fsynced and renamed; its
index lines are appended (flush + fsync) only afterwards. A shard that no index line names (a
crash between the rename and the index append) is ignored and overwritten by the next append;
an unterminated last index line (a torn append) is ignored and truncated by the next append,
while any other unreadable index line, or a truncated shard, is an error naming the file.
One writer per store at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save

from benchmarks.outputs import append_lines, write_atomic
from vlm_sparsify.files import read_json

Regions = dict[str, list[tuple[int, int]]]
INDEX = "index.jsonl"
META = "meta.json"
VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class StoreMeta:
    hookpoints: list[str]
    """Source hookpoints, in the order of the S axis."""
    k: int
    """Active features per token and source layer (TopK)."""
    num_latents: int
    """Latents per source layer."""
    value_dtype: str = "bfloat16"
    """Stored activation dtype: bfloat16, float16 or float32."""
    coders: str | None = None
    """Where the coders came from (run folder or Hub id), for the record."""
    fingerprint: str | None = None
    """`coder_fingerprint` of the coders that wrote the store (None in stores older than it)."""
    index_dtype: str = field(init=False)
    """int16 (reinterpreted as uint16) when num_latents <= 65536, else int32."""

    def __post_init__(self) -> None:
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(
                f"unknown value_dtype '{self.value_dtype}'; known: {', '.join(VALUE_DTYPES)}"
            )
        self.index_dtype = "int16" if self.num_latents <= 65536 else "int32"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StoreMeta:
        data = {key: value for key, value in data.items() if key != "index_dtype"}
        return cls(**data)


def coder_fingerprint(coders: Any) -> str:
    """A short digest of a coder set: its hookpoints, encoder shapes and encoder biases (cheap
    at any size, and distinct for any two trainings)."""
    digest = hashlib.sha256()
    for hookpoint, source in coders.items():
        bias = source.encoder.bias.detach().float().cpu().contiguous()
        digest.update(f"{hookpoint}:{tuple(source.encoder.weight.shape)}".encode())
        digest.update(bias.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class SampleRecord:
    """One line of `index.jsonl`: where a sample's rows are and its token regions."""

    id: str
    shard: int
    start: int
    stop: int
    regions: Regions

    def rows(self, region: str = "all") -> np.ndarray:
        """Row offsets (relative to the sample's first row) of `region`, or of every row.

        `decision`: the rows whose next-token prediction is a response token, i.e. the last
        prompt row and every stored response row (the last generated token is never stored)."""
        if region == "all":
            return np.arange(self.stop - self.start)
        if region == "decision":
            response = self.rows("response")
            first = int(response[0]) if len(response) else self.stop - self.start
            return np.concatenate([np.arange(max(first - 1, 0), first), response])
        spans = self.regions.get(region, [])
        if not spans:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b) for a, b in spans])


class Sample(NamedTuple):
    """One sample's features; a plain (id, indices, values, regions) tuple works as input."""

    id: str
    indices: torch.Tensor
    """[T, S, k] latent indices (int64 when read back)."""
    values: torch.Tensor
    """[T, S, k] activations (the store's value dtype when read back)."""
    regions: Regions
    """Token ranges per region name, relative to the sample's first row."""


class Shard:
    """A shard opened as read-only memory maps, decoded row by row on demand."""

    def __init__(self, path: Path, meta: StoreMeta, records: list[SampleRecord]):
        self.path = path
        self.records = records
        self._meta = meta
        try:
            self._arrays = _read_shard(path)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"feature store shard {path} cannot be read ({err})") from err
        rows = self.num_rows
        for record in records:
            if record.stop > rows:
                raise ValueError(
                    f"feature store shard {path} holds {rows} rows, but index.jsonl puts "
                    f"sample '{record.id}' at rows {record.start}..{record.stop}"
                )

    @property
    def num_rows(self) -> int:
        return self._arrays["indices"].shape[0]

    def indices(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Latent indices of `rows` as uint16 (int16 on disk) or int32, shape [R, S, k]."""
        stored = self._arrays["indices"][rows]
        return stored.view(np.uint16) if stored.dtype == np.int16 else np.asarray(stored)

    def values(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Activations of `rows` widened to float32, shape [R, S, k]."""
        stored = np.asarray(self._arrays["values"][rows])
        if self._meta.value_dtype == "bfloat16":
            return (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32)

    def sample(self, record: SampleRecord) -> Sample:
        """One sample as torch tensors: int64 indices, values in the store dtype."""
        rows = slice(record.start, record.stop)
        indices = torch.from_numpy(self.indices(rows).astype(np.int64))
        stored = np.array(self._arrays["values"][rows])
        values = torch.from_numpy(stored)
        if self._meta.value_dtype == "bfloat16":
            values = values.view(torch.bfloat16)
        return Sample(record.id, indices, values, record.regions)


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    """`indices` and `values` of a shard file as memory maps; a truncated or corrupt file raises."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if len(raw) < 8:
        raise ValueError(f"{len(raw)} bytes, too short for a safetensors header")
    header_len = int.from_bytes(bytes(raw[:8]), "little")
    if 8 + header_len > len(raw):
        raise ValueError(f"its header claims {header_len} bytes, the file has {len(raw)}")
    header = json.loads(bytes(raw[8 : 8 + header_len]))
    body = 8 + header_len
    arrays: dict[str, np.ndarray] = {}
    for name in ("indices", "values"):
        info = header[name]
        a, b = info["data_offsets"]
        if body + b > len(raw):
            raise ValueError(
                f"truncated: '{name}' ends at byte {body + b}, the file has {len(raw)} bytes"
            )
        dtype = _NUMPY_STORAGE[info["dtype"]]
        arrays[name] = raw[body + a : body + b].view(dtype).reshape(info["shape"])
    return arrays


# safetensors dtype tag -> numpy dtype of the raw bytes (bf16 read as its int16 bit pattern)
_NUMPY_STORAGE = {
    "I16": np.int16,
    "I32": np.int32,
    "BF16": np.int16,
    "F16": np.float16,
    "F32": np.float32,
}


class FeatureStore:
    """Writer and reader of one store folder.

    `FeatureStore(path, meta)` creates the folder (or checks that `meta` matches an existing one);
    `FeatureStore(path)` opens an existing store.
    """

    def __init__(self, path: str | os.PathLike, meta: StoreMeta | None = None):
        self.path = Path(path)
        meta_path = self.path / META
        if meta_path.exists():
            stored = StoreMeta.from_json(
                read_json(meta_path, keys=("hookpoints", "k", "num_latents"))
            )
            old = meta is not None and stored.fingerprint is None  # older than fingerprints
            if meta is not None and old:
                stored.fingerprint = meta.fingerprint
            if meta is not None and meta != stored:
                raise ValueError(
                    f"feature store {self.path} was written with {stored}, not {meta}; "
                    "use a new folder or the same coders and settings"
                )
            if old:  # it resumes with the same settings: it gets their fingerprint
                write_atomic(meta_path, json.dumps(stored.to_json(), indent=2))
            self.meta = stored
        elif meta is None:
            raise FileNotFoundError(
                f"no feature store at {self.path} (missing meta.json): capture with --coders RUN"
            )
        else:
            (self.path / "shards").mkdir(parents=True, exist_ok=True)
            write_atomic(meta_path, json.dumps(meta.to_json(), indent=2))
            self.meta = meta
        self._records: list[SampleRecord] | None = None

    # ----------------------------------------------------------------- reading
    @property
    def index_path(self) -> Path:
        return self.path / INDEX

    def records(self) -> list[SampleRecord]:
        """Every stored sample's record, in the order written.

        A last line without its newline is a torn append (a crash): it is ignored, as the next
        append truncates it. Any other line that is not a record is an error naming the line.
        """
        if self._records is None:
            self._records = []
            if self.index_path.exists():
                text = self.index_path.read_text()
                lines = text.split("\n")
                lines.pop()  # after the last newline: "" or the torn line
                for number, line in enumerate(lines, start=1):
                    self._records.append(self._parse_record(line, number))
        return self._records

    def _parse_record(self, line: str, number: int) -> SampleRecord:
        try:
            data = json.loads(line)
            regions = {
                name: [tuple(span) for span in spans] for name, spans in data["regions"].items()
            }
            return SampleRecord(data["id"], data["shard"], data["start"], data["stop"], regions)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{self.index_path}:{number}: not a sample record ({type(err).__name__}: {err}); "
                "only a torn last line (no newline) is skipped"
            ) from None

    def ids(self) -> list[str]:
        """Ids already stored (a resumed capture skips these)."""
        return [record.id for record in self.records()]

    def shard_path(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:05d}.safetensors"

    def shards(self, ids: Iterable[str] | None = None) -> Iterator[Shard]:
        """Shards in order, each with the records of its samples (restricted to `ids`)."""
        wanted = None if ids is None else set(ids)
        by_shard: dict[int, list[SampleRecord]] = {}
        for record in self.records():
            if wanted is None or record.id in wanted:
                by_shard.setdefault(record.shard, []).append(record)
        for shard, records in sorted(by_shard.items()):
            yield Shard(self.shard_path(shard), self.meta, records)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def samples(self, ids: Iterable[str] | None = None) -> Iterator[Sample]:
        """Samples shard by shard: (id, indices int64 [T, S, k], values [T, S, k], regions)."""
        for shard in self.shards(ids):
            for record in shard.records:
                yield shard.sample(record)

    def load(self, sample_id: str) -> Sample:
        """One sample (reads only its rows of its shard)."""
        for record in self.records():
            if record.id == sample_id:
                return Shard(self.shard_path(record.shard), self.meta, [record]).sample(record)
        raise KeyError(f"sample '{sample_id}' is not in the feature store {self.path}")

    def bytes_per_active_feature(self) -> float:
        """Bytes on disk (shards, index, meta) per stored (index, value) pair."""
        records = self.records()
        pairs = sum(r.stop - r.start for r in records) * len(self.meta.hookpoints) * self.meta.k
        if pairs == 0:
            raise ValueError(f"feature store {self.path} holds no samples")
        shard_bytes = sum(self.shard_path(s).stat().st_size for s in {r.shard for r in records})
        other = self.index_path.stat().st_size + (self.path / META).stat().st_size
        return (shard_bytes + other) / pairs

    # ----------------------------------------------------------------- writing
    def append(self, samples: Iterable[Sample | tuple]) -> int:
        """Write the samples not stored yet as one new shard; returns how many were written."""
        stored = set(self.ids())
        batch: list[Sample] = []
        for sample in samples:
            sample = Sample(*sample)
            if sample.id in stored:
                continue
            self._check(sample)
            stored.add(sample.id)
            batch.append(sample)
        if not batch:
            return 0
        records = self.records()
        shard = max((r.shard for r in records), default=-1) + 1
        tensors = {
            "indices": self._encode_indices(torch.cat([s.indices for s in batch])),
            "values": torch.cat([s.values for s in batch]).to(VALUE_DTYPES[self.meta.value_dtype]),
        }
        write_atomic(self.shard_path(shard), save(tensors))
        lines, start = [], 0
        for sample in batch:
            stop = start + sample.indices.shape[0]
            # (start, stop) tuples, as `_parse_record` reads them back: the writer's records
            # stay in memory and must equal a reader's
            regions = {name: [(int(a), int(b)) for a, b in spans]
                       for name, spans in sample.regions.items()}  # fmt: skip
            record = SampleRecord(sample.id, shard, start, stop, regions)
            lines.append(json.dumps(asdict(record)) + "\n")
            records.append(record)
            start = stop
        append_lines(self.index_path, "".join(lines))
        return len(batch)

    def _check(self, sample: Sample) -> None:
        meta, shape = self.meta, tuple(sample.indices.shape)
        if shape != tuple(sample.values.shape) or len(shape) != 3:
            raise ValueError(f"sample '{sample.id}': indices {shape} and values must be [T, S, k]")
        if shape[1:] != (len(meta.hookpoints), meta.k):
            raise ValueError(
                f"sample '{sample.id}': shape {shape} does not match the store's "
                f"[T, {len(meta.hookpoints)} hookpoints, k={meta.k}]"
            )
        if shape[0] and (sample.indices.min() < 0 or sample.indices.max() >= meta.num_latents):
            raise ValueError(f"sample '{sample.id}': latent index outside [0, {meta.num_latents})")
        for name, spans in sample.regions.items():
            if any(not 0 <= a <= b <= shape[0] for a, b in spans):
                raise ValueError(f"sample '{sample.id}': region '{name}' {spans} outside its rows")

    def _encode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.to(torch.int32)
        if self.meta.index_dtype == "int32":
            return indices
        # uint16 bit pattern in an int16 tensor (torch's uint16 support is limited)
        return torch.where(indices >= 32768, indices - 65536, indices).to(torch.int16)

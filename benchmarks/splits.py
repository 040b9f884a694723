"""Deterministic train / held-out split of sample ids.

A sample is held out when the hash of `"{seed}:{id}"` falls below `held_out_fraction`, so the
split depends on neither the order of the ids nor on which other samples exist: adding samples
never moves one from train to held-out. `analyze` selects features on the train ids; `steer`
evaluates on the held-out ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    train: list[str]
    held_out: list[str]
    seed: int
    held_out_fraction: float

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "held_out_fraction": self.held_out_fraction,
            "n_train": len(self.train),
            "n_held_out": len(self.held_out),
            "held_out_ids": self.held_out,
        }


def is_held_out(sample_id: str, held_out_fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < held_out_fraction


def split_ids(ids: Iterable[str], held_out_fraction: float = 0.2, seed: int = 0) -> Split:
    """Split `ids` (kept in their order) into train and held-out."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    train, held_out = [], []
    for sample_id in ids:
        (held_out if is_held_out(str(sample_id), held_out_fraction, seed) else train).append(
            str(sample_id)
        )
    return Split(train, held_out, seed, held_out_fraction)

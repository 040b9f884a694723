"""Deterministic train / held-out split of sample ids, by group (the sample's image).

Samples of the same image must land on the same side: POPE asks the same yes-question about an
image in each of its three splits, AMBER and easy-VQA ask several questions per image, so a split
by sample id would hold out near-copies of train samples. Each sample has a group key (its image,
`sample_images`; the sample id itself when it has none), and a group is held out when the hash of
`"{seed}:{key}"` (key `image:<file name>`, `image_id:<n>` or the id) falls below
`held_out_fraction`. The split therefore depends on neither the order of the ids nor on which
other samples exist: adding samples never moves one from train to held-out. `analyze` selects features on the train ids; `steer` evaluates on the held-out ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Split:
    train: list[str]
    held_out: list[str]
    seed: int
    held_out_fraction: float
    group_by: str = "sample"
    """`image`: every sample was split with its image as group key; `sample`: none was (each its
    own group); `mixed`: some were."""
    n_held_out_groups: int = 0
    """Distinct group keys (images) on the held-out side."""

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "held_out_fraction": self.held_out_fraction,
            "group_by": self.group_by,
            "n_train": len(self.train),
            "n_held_out": len(self.held_out),
            "n_held_out_groups": self.n_held_out_groups,
            "held_out_ids": self.held_out,
        }


def is_held_out(key: str, held_out_fraction: float, seed: int = 0) -> bool:
    """Whether the group `key` (a sample's image, or its id) is on the held-out side."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < held_out_fraction


def sample_images(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The image of each responses.jsonl record that names one: POPE's and AMBER's `image` (file
    name), easy-VQA's `image_id`; records naming neither are left out."""
    images = {}
    for record in records:
        if record.get("image") is not None:
            images[str(record["id"])] = f"image:{record['image']}"
        elif record.get("image_id") is not None:
            images[str(record["id"])] = f"image_id:{record['image_id']}"
    return images


def split_ids(
    ids: Iterable[str],
    held_out_fraction: float = 0.2,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> Split:
    """Split `ids` (kept in their order) into train and held-out; `groups` maps a sample id to its
    group key (its image): a sample it does not name is a group of its own."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    groups = groups or {}
    train, held_out, held_out_keys, ungrouped = [], [], set(), 0
    for sample_id in map(str, ids):
        key = groups.get(sample_id)
        ungrouped += key is None
        key = sample_id if key is None else key
        if is_held_out(key, held_out_fraction, seed):
            held_out.append(sample_id)
            held_out_keys.add(key)
        else:
            train.append(sample_id)
    group_by = "sample" if ungrouped == len(train) + len(held_out) else "image"
    group_by = "mixed" if group_by == "image" and ungrouped else group_by
    return Split(train, held_out, seed, held_out_fraction, group_by, len(held_out_keys))

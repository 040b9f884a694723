"""AMBER items and data files (the official `data/` folder of junyangwang0410/AMBER).

`query/query_all.json` holds `{"id", "image", "query"}` for all 15,220 items; `annotations.json`
the ground truth at index id - 1: generative items (ids 1-1004, "Describe this image.") list the
objects present (`truth`) and absent but likely (`hallu`); discriminative items (1005-15220) have
`truth` "yes" / "no" and a `type` naming the dimension: attribute (1005-8632: state, number,
action), existence (8633-13556, type "discriminative-hallucination"), relation (13557-15220, types
"discriminative-relation" and "relation").
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_sparsify.files import read_json

GENERATIVE_IDS = range(1, 1005)
ATTRIBUTE_IDS = range(1005, 8633)
EXISTENCE_IDS = range(8633, 13557)
RELATION_IDS = range(13557, 15221)

ATTRIBUTE_TYPES = {
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
}


def dimension_of(annotation_type: str) -> str:
    """generative / existence / state / number / action / relation (the official branches)."""
    if annotation_type == "generative":
        return "generative"
    if annotation_type == "discriminative-hallucination":
        return "existence"
    # The official script sends every other type ("discriminative-relation", "relation") here.
    return ATTRIBUTE_TYPES.get(annotation_type, "relation")


@dataclass(frozen=True)
class AmberItem:
    id: int
    image: str
    """Image file name, e.g. AMBER_1.jpg."""
    query: str
    type: str
    """The annotation's type, e.g. "discriminative-attribute-state"."""
    truth: list[str] | str
    """Objects present (generative) or "yes" / "no" (discriminative)."""
    hallu: list[str] | None = None
    """Generative only: objects absent from the image."""

    @property
    def dimension(self) -> str:
        return dimension_of(self.type)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass --data-dir pointing at AMBER's data/ folder"
        )
    return read_json(path)


def load_annotations(data_dir: str | Path) -> list[dict[str, Any]]:
    annotations = _read_json(Path(data_dir) / "annotations.json")
    for index, annotation in enumerate(annotations):
        if annotation["id"] != index + 1:
            raise ValueError(
                f"annotations.json: entry {index} has id {annotation['id']}, not {index + 1}"
            )
    return annotations


def load_items(data_dir: str | Path) -> list[AmberItem]:
    """All items, queries joined with their annotations by id."""
    annotations = load_annotations(data_dir)
    queries = _read_json(Path(data_dir) / "query" / "query_all.json")
    items = []
    for query in queries:
        annotation = annotations[query["id"] - 1]
        items.append(
            AmberItem(
                id=query["id"],
                image=query["image"],
                query=query["query"],
                type=annotation["type"],
                truth=annotation["truth"],
                hallu=annotation.get("hallu"),
            )
        )
    return items


def load_association(data_dir: str | Path) -> dict[str, list[str]]:
    """relation.json: object -> words that also count as it, in file order."""
    return _read_json(Path(data_dir) / "relation.json")


def vocabulary_of(association: dict[str, list[str]]) -> frozenset[str]:
    """The words the generative metrics look at: relation.json's keys and values."""
    return frozenset(association) | {word for words in association.values() for word in words}


def load_safe_words(data_dir: str | Path) -> list[str]:
    """safe_words.txt: words never counted as hallucinations (lines as the official script reads them)."""
    text = (Path(data_dir) / "safe_words.txt").read_text(encoding="utf-8")
    return [line.split("\n")[0] for line in text.splitlines(keepends=True)]


def load_counter_init(data_dir: str | Path) -> dict[str, float]:
    """metrics.txt: the official counters' start values (denominators start at 0.001)."""
    counters = {}
    for line in (Path(data_dir) / "metrics.txt").read_text(encoding="utf-8").splitlines():
        parts = line.strip().split("=")
        if len(parts) == 2:
            counters[parts[0].strip()] = float(parts[1].strip())
    return counters

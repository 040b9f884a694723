"""Multimodal streaming: image+text examples -> processor -> padded batches with token masks.

Sources: easy-VQA from its PyPI package (`easyvqa`), a local folder of images with a
`metadata.jsonl` / `metadata.csv`, or any Hugging Face dataset (map-style or `--streaming`).
The processor and the recipe's prompt format build each example inside DataLoader workers; image
tokens are never truncated (text is); unreadable images are skipped and counted, or raise with
`strict`.
"""

from __future__ import annotations

import csv
import io
import json
import random
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm_sparsify.files import read_jsonl
from vlm_sparsify.recipe import Recipe

if TYPE_CHECKING:
    from vlm_sparsify.tiny.easyvqa_data import Split

TokenRegion = Literal["all", "image", "text"]
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
"""Processor outputs with one entry per token: padded and truncated along the sequence."""
EASYVQA = ("easyvqa", "easy-vqa", "easy_vqa")


@dataclass(frozen=True)
class Example:
    id: str
    image: Any
    """A PIL image, a file path, raw bytes, or a datasets `{"bytes", "path"}` dict."""
    question: str
    answer: str = ""


class BadImageError(ValueError):
    """An example's image is missing or unreadable."""


class ContextTooShortError(ValueError):
    """The context cannot hold an example's image tokens."""


def load_rgb(image: Any, upright: bool = True) -> Image.Image:
    """Open any image reference as RGB (grayscale, 16-bit grayscale, palette and RGBA
    included), turned upright by its EXIF orientation as Hugging Face datasets and transformers'
    `load_image` do (unless not `upright`: the benchmarks read images as the official evaluation
    code does, stored orientation); one too large to decode safely (PIL's decompression-bomb
    limit) is a bad image."""
    try:
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, Path)):
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise BadImageError(f"not an image: {type(image).__name__}")
        image.load()
        if upright and image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # stored sideways
            image = ImageOps.exif_transpose(image)  # a copy: never the caller's image
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(str(err)) from err
    if image.mode.startswith("I") or image.mode == "F":  # 16- or 32-bit grayscale
        image = _to_8_bits(image)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """Integer (`I;16`, `I`) or float (`F`) grayscale scaled to 8 bits: PIL's own conversion
    clips every value above 255, which turns a 16-bit image white, and rounds a float image's
    0..1 to black."""
    pixels = np.nan_to_num(np.asarray(image).astype(np.float64))
    # 16-bit PNGs (I;16) span 0..65535; mode I holds 16-bit data too, unless it is 8-bit; a
    # float TIFF (F) holding no value above 1 spans 0..1
    top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
    if image.mode == "F" and pixels.max() <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(np.round(pixels * 255.0 / top), 0, 255).astype(np.uint8), "L")


# -- sources ----------------------------------------------------------------------------------


def easyvqa_examples(split: Split = "train") -> list[Example]:
    """Every easy-VQA question of a split, as (image path, question, answer)."""
    from vlm_sparsify.tiny.easyvqa_data import image_paths, questions

    paths = image_paths(split)
    return [
        Example(id=f"{split}-{i}", image=paths[q.image_id], question=q.question, answer=q.answer)
        for i, q in enumerate(questions(split))
    ]


def folder_examples(folder: Path, question: str) -> list[Example]:
    """Images in `folder` described by `metadata.jsonl` or `metadata.csv` (`file_name` column,
    plus `text` or `question` / `answer` columns), as in Hugging Face's imagefolder."""
    if (folder / "metadata.jsonl").is_file():
        rows = read_jsonl(folder / "metadata.jsonl")
    elif (folder / "metadata.csv").is_file():
        # utf-8-sig: the byte-order mark that Excel puts before the first column name
        with (folder / "metadata.csv").open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = []
            for row in reader:
                _check_csv_row(folder, len(rows), reader.line_num, row)
                rows.append(row)
    else:
        raise FileNotFoundError(f"{folder} has no metadata.jsonl or metadata.csv")
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str)):
            raise ValueError(
                f"{folder}: metadata row {i} ({json.dumps(row)[:80]}) has no 'file_name' string; "
                'each row is an object such as {"file_name": "a.png", "text": "a red square"}'
            )
    if not rows:
        raise ValueError(f"{folder}: the metadata lists no images (one row per image file)")
    columns = sorted({key for row in rows for key in row})
    if not {"text", "answer"} & set(columns):
        # else every example would train on its question alone, silently
        raise ValueError(
            f"{folder}: the metadata has no 'text' or 'answer' column with the caption or answer "
            f"(columns: {', '.join(columns)}); rename that column to 'text' (or 'answer')"
        )
    for i, row in enumerate(rows):
        if not {"text", "answer"} & set(row):
            # another schema (a caption under another key): it would train on its question alone
            raise ValueError(
                f"{folder}: metadata row {i} ({json.dumps(row)[:80]}) has no 'text' or 'answer' "
                "(other rows have them); give every row its caption or answer under the same "
                'key ("" trains on the question alone)'
            )
    return [
        Example(
            id=str(row.get("id") or row["file_name"]),
            image=str(folder / row["file_name"]),
            question=_text_value(folder, i, row, "question") or question,
            answer=_text_value(folder, i, row, "answer") or _text_value(folder, i, row, "text"),
        )
        for i, row in enumerate(rows)
    ]


def _check_csv_row(folder: Path, i: int, line: int, row: dict[Any, Any]) -> None:
    """A metadata.csv row has as many fields as the header: csv.DictReader keeps the fields
    past it under the key None (an unquoted comma in a caption) and fills a short row with
    None."""
    if None in row:
        raise ValueError(
            f"{folder}: metadata.csv row {i} (line {line}) has more fields than the header "
            f"({json.dumps(row[None])[:60]} left over); quote a field that holds a comma"
        )
    if None in row.values():
        missing = [key for key, value in row.items() if value is None]
        raise ValueError(
            f"{folder}: metadata.csv row {i} (line {line}) has fewer fields than the header "
            f"(no {', '.join(missing)})"
        )


def _text_value(folder: Path, i: int, row: dict[str, Any], column: str) -> str:
    """A metadata row's `column` as text: a list (several captions) gives its first entry, as
    for a Hub dataset's text column; a missing or empty value gives ''."""
    value = row.get(column)
    if isinstance(value, list):
        value = value[0] if value else ""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"{folder}: metadata row {i} ({json.dumps(row)[:80]}) has a {column!r} that is not "
            "text (a string, or a list of strings: the first is used)"
        )
    return value


def hf_examples(
    path: str, split: str, recipe: Recipe, streaming: bool, shuffle_seed: int, **kwargs: Any
) -> Iterable[Example]:
    """A Hugging Face dataset (map-style or streaming); images decode lazily in workers."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    defaults = recipe.dataset
    try:
        ds = load_dataset(path, split=split, streaming=streaming, **kwargs)
    except OSError as err:  # offline, no such dataset: perhaps a mistyped folder
        local = "" if Path(path).exists() else " (no such local folder either)"
        reason = " ".join(str(err).split())
        raise OSError(f"could not load DATASET '{path}'{local}: {reason}") from None
    if defaults.image_column not in (ds.column_names or []):
        raise ValueError(
            f"dataset '{path}' has no image column '{defaults.image_column}' "
            f"(columns: {ds.column_names}); set [dataset] image_column in the recipe"
        )
    if isinstance(ds.features[defaults.image_column], ImageFeature):
        ds = ds.cast_column(defaults.image_column, ImageFeature(decode=False))
    ds = ds.shuffle(seed=shuffle_seed)
    # a streamed dataset may not know its columns before its first row: checked there
    columns_known = ds.column_names is not None
    if columns_known:
        check_text_columns(path, recipe, ds.column_names)

    def generate() -> Iterator[Example]:
        for i, row in enumerate(ds):
            if i == 0 and not columns_known:
                check_text_columns(path, recipe, list(row))
            example_id = str(row.get("id", i))
            answer = _hub_text(path, example_id, row, "text_column", defaults.text_column)
            question = _hub_text(path, example_id, row, "question_column", defaults.question_column)
            yield Example(
                example_id, row[defaults.image_column], question or defaults.question, answer
            )

    return _Reiterable(generate)


def _hub_text(path: str, example_id: str, row: dict[str, Any], key: str, column: str) -> str:
    """A Hub dataset row's text `column` (the recipe's [dataset] `key`; "" gives ""): a list
    gives its first entry, a missing or empty value ''; anything else (VQAv2's list of answer
    dicts, a number) is an error, not its Python repr trained on."""
    value = row.get(column) if column else None
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"dataset '{path}': example {example_id} has a '{column}' that is not text "
            f"({type(value).__name__} {str(value)[:60]}); set [dataset] {key} in a recipe file "
            "(--recipe PATH) to a column of strings (or of lists of strings: the first is used)"
        )
    return value


def check_text_columns(path: str, recipe: Recipe, columns: list[str]) -> None:
    """The recipe's [dataset] text and question columns exist in the dataset: a missing one
    would give every example an empty answer (or the default question), silently."""
    defaults = recipe.dataset
    for key, column in (("text_column", defaults.text_column),
                        ("question_column", defaults.question_column)):  # fmt: skip
        if column and column not in columns:
            raise ValueError(
                f"dataset '{path}' has no column '{column}' (columns: {', '.join(columns)}), "
                f"which recipe '{recipe.name}' names in [dataset] {key}; set [dataset] {key} in "
                "a recipe file (--recipe PATH) to the right column"
                + (
                    ', or to "" to train on images with the question only'
                    if key == "text_column"
                    else ""
                )
            )


class _Reiterable:
    """An iterable that restarts its generator on every `iter()` (one per worker)."""

    def __init__(self, make: Callable[[], Iterator[Example]]):
        self.make = make

    def __iter__(self) -> Iterator[Example]:
        return self.make()


def parse_data_args(text: str) -> dict[str, Any]:
    """`--data_args 'arg1=val1,arg2=val2'` as sparsify reads it, refusing a part without '=' and
    a token (the run's config.json keeps --data_args)."""
    from sparsify.utils import simple_parse_args_string

    if any(part.split("=", 1)[0].strip() == "token" for part in text.split(",") if "=" in part):
        raise ValueError(
            "--data_args token=... would be saved in the run's config.json (which --push_to_hub "
            "uploads): pass the token with HF_TOKEN or --hf_token, which are never written"
        )
    if bad := [part for part in text.split(",") if part.strip() and "=" not in part]:
        raise ValueError(f"--data_args '{text}': {bad[0]!r} is not arg=value (arg1=val1,arg2=val2)")
    return simple_parse_args_string(text)


def _names_a_folder(dataset: str) -> bool:
    """A path no Hugging Face id looks like (ids are `name` or `owner/name`)."""
    return (
        dataset.startswith(("/", ".", "~"))
        or dataset.endswith(("/", "\\"))
        or dataset.count("/") > 1
        or "\\" in dataset
    )


def is_local_dataset(dataset: str) -> bool:
    """`easyvqa` or a local folder (one that exists, or a path no Hub id looks like): it opens in
    a moment, unlike a Hub dataset, which may download."""
    return dataset.lower() in EASYVQA or _names_a_folder(dataset) or Path(dataset).is_dir()


def resolve_dataset(dataset: str) -> str:
    """DATASET as a run keeps it: a local folder as its absolute path (a resumed run, fidelity
    and export find it from any directory); `easyvqa`, Hub ids and "" as given."""
    if not dataset or dataset.lower() in EASYVQA or not Path(dataset).is_dir():
        return dataset
    return str(Path(dataset).resolve())


def open_examples(
    dataset: str,
    recipe: Recipe,
    split: str | None = None,
    streaming: bool = False,
    shuffle_seed: int = 42,
    token: str | None = None,
    **kwargs: Any,
) -> Iterable[Example]:
    """Examples of `dataset`: `easyvqa`, a local folder, or a Hugging Face dataset id (read
    with `token`, a gated or private one too; `kwargs` go to `datasets.load_dataset`)."""
    if _names_a_folder(dataset) and not Path(dataset).is_dir():
        raise FileNotFoundError(
            f"DATASET '{dataset}': no such folder (DATASET is easyvqa, a folder of images with "
            "metadata.jsonl or metadata.csv, or a Hugging Face dataset id such as owner/name)"
        )
    local = dataset.lower() in EASYVQA or Path(dataset).is_dir()
    hub_only = {"--data_args": bool(kwargs), "--streaming": streaming}
    if Path(dataset).is_dir():
        hub_only["--split"] = bool(split)  # a folder has one split
    if local and (unused := [flag for flag, given in hub_only.items() if given]):
        raise ValueError(
            f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to Hugging Face "
            f"datasets, not to '{dataset}'; leave {'it' if len(unused) == 1 else 'them'} out"
        )
    if not split:
        split = recipe.dataset.split if dataset == recipe.dataset.path else "train"
    if dataset.lower() in EASYVQA:
        examples = easyvqa_examples(cast("Split", split))  # image_paths rejects other splits
    elif Path(dataset).is_dir():
        examples = folder_examples(Path(dataset), recipe.dataset.question)
    else:
        if token is not None:  # a caller's token=... in kwargs wins (--data_args refuses one)
            kwargs = {"token": token, **kwargs}
        return hf_examples(dataset, split, recipe, streaming, shuffle_seed, **kwargs)
    random.Random(shuffle_seed).shuffle(examples)
    return examples


# -- encoding and batching --------------------------------------------------------------------


def image_token_id(processor: Any, recipe: Recipe) -> int:
    """Id of the token repeated once per image patch."""
    # the recipe's pad token first: Gemma3Processor's `image_token_id` is its placeholder's id
    if recipe.prompt.image_pad_token:
        return _known_token_id(processor, recipe, "image_pad_token", recipe.prompt.image_pad_token)
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        return _known_token_id(processor, recipe, "image_token", recipe.prompt.image_token)
    return int(token_id)


def _known_token_id(processor: Any, recipe: Recipe, key: str, token: str) -> int:
    """The id of a token the recipe names, refused when the tokenizer does not know it (it
    would be the unknown token's id, and the image region its occurrences)."""
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids(token)
    unknown = token_id is None or (
        token_id == tokenizer.unk_token_id and token != tokenizer.unk_token
    )
    if unknown:
        raise ValueError(
            f"recipe '{recipe.name}': [prompt] {key} = '{token}' is not a token of the "
            f"processor's tokenizer; it must name the token the processor repeats once per "
            f"image feature ({_processor_image_token(processor)})"
        )
    return int(token_id)


def check_image_token(config: Any, processor: Any, recipe: Recipe) -> None:
    """The image token the recipe (or processor) names is the one the model fills with image
    features (`config.image_token_id`): a wrong token that the tokenizer knows and every prompt
    holds (`<|vision_start|>` for `<|image_pad|>`) would train on the wrong positions. The
    recipe's `image_token` is the placeholder the processor expands (its `image_token`): under a
    chat template, which writes the placeholder itself, a wrong one would go unnoticed."""
    placeholder = getattr(processor, "image_token", None)
    if isinstance(placeholder, str) and placeholder != recipe.prompt.image_token:
        raise ValueError(
            f"recipe '{recipe.name}': [prompt] image_token = '{recipe.prompt.image_token}' is not "
            f"the placeholder this processor expands into image tokens ('{placeholder}', its "
            "image_token); name that token"
        )
    _known_token_id(processor, recipe, "image_token", recipe.prompt.image_token)
    expected = getattr(config, "image_token_id", None)
    if expected is None:
        return
    found = image_token_id(processor, recipe)
    if found == expected:
        return
    wanted = processor.tokenizer.convert_ids_to_tokens(int(expected))
    if recipe.prompt.image_pad_token:
        named = f"[prompt] image_pad_token = '{recipe.prompt.image_pad_token}'"
    elif getattr(processor, "image_token_id", None) is not None:
        named = "the processor's image_token_id"
    else:
        named = f"[prompt] image_token = '{recipe.prompt.image_token}'"
    raise ValueError(
        f"recipe '{recipe.name}': {named} is token {found}, but the model fills token "
        f"{expected} ('{wanted}', config.image_token_id) with image features; set [prompt] "
        f"image_pad_token = '{wanted}'"
    )


def _processor_image_token(processor: Any) -> str:
    """What the processor says its image token is, for error messages."""
    token = getattr(processor, "image_token", None)
    return f"this processor's image_token is '{token}'" if token else "see docs/recipes.md"


def check_image_region(
    inputs: dict[str, torch.Tensor],
    image_mask: torch.Tensor,
    ids: list[str],
    recipe: Recipe,
    processor: Any,
) -> None:
    """Every example (each has an image) has image tokens where the recipe says: a wrong
    `image_pad_token` / `image_token` would leave the image region empty, and `--tokens text`
    train on the image, silently."""
    if "pixel_values" not in inputs:
        return
    for example_id, count in zip(ids, image_mask.sum(1).tolist(), strict=True):
        if count == 0:
            key = "image_pad_token" if recipe.prompt.image_pad_token else "image_token"
            token = recipe.prompt.image_pad_token or recipe.prompt.image_token
            raise ValueError(
                f"recipe '{recipe.name}': example {example_id} has an image but none of its "
                f"tokens is [prompt] {key} '{token}' ({_processor_image_token(processor)}); "
                "set it to the token the processor repeats once per image feature"
            )


def truncate_keeping_image_tokens(
    encoded: dict[str, torch.Tensor],
    image_id: int,
    ctx_len: int,
    max_positions: int | None = None,
) -> dict[str, torch.Tensor]:
    """Keep every image token and at most `ctx_len` text tokens (cut from the end).

    `ctx_len` budgets text, as in sparsify; image tokens come on top of it and must fit the
    model's context (`max_positions`) together with at least one text token.
    """
    input_ids = encoded["input_ids"][0]
    is_image = input_ids == image_id
    n_image = int(is_image.sum())
    budget = ctx_len
    if max_positions is not None:
        if n_image >= max_positions:
            raise ContextTooShortError(
                f"the model's context of {max_positions} positions cannot hold the {n_image} "
                "image tokens of one example; use smaller images or a longer-context model"
            )
        budget = min(budget, max_positions - n_image)
    if len(input_ids) - n_image <= budget:
        return encoded
    text_positions = (~is_image).nonzero().squeeze(1)[:budget]
    keep = torch.cat([is_image.nonzero().squeeze(1), text_positions]).sort().values
    dropped = torch.ones_like(is_image)
    dropped[keep] = False
    beside_image = F.pad(is_image[1:], (0, 1)) | F.pad(is_image[:-1], (1, 0))
    if (dropped & beside_image).any():
        warnings.warn(
            f"--ctx_len {ctx_len} cuts text tokens next to an image's tokens (its delimiters, "
            "such as <|vision_end|> or <end_of_image>): the model sees the image without them; "
            "raise --ctx_len to keep them",
            stacklevel=2,
        )
    return {key: value[:, keep] if key in TOKEN_KEYS else value for key, value in encoded.items()}


def encode_example(
    example: Example,
    processor: Any,
    recipe: Recipe,
    ctx_len: int,
    max_positions: int | None = None,
) -> dict[str, torch.Tensor]:
    """One example through the processor: the prompt, then the answer (appended after the
    recipe's `answer_separator`, or as the processor's `suffix` with `answer_as_suffix`), with
    its text truncated to `ctx_len` tokens."""
    image = load_rgb(example.image)
    check_text_has_no_image_token(example, recipe)
    text = recipe.format_prompt(example.question, processor)
    extra: dict[str, Any] = {}
    if example.answer and recipe.prompt.answer_as_suffix:
        extra["suffix"] = [example.answer]  # PaliGemma: causal answer tokens (token type 1)
    elif example.answer:
        text = f"{text}{recipe.prompt.answer_separator}{example.answer}"
    try:
        encoded = dict(processor(images=[image], text=[text], return_tensors="pt", **extra))
    except ValueError as err:  # e.g. Qwen's image processor: an aspect ratio above 200
        size = f"{image.width}x{image.height}"
        raise ValueError(f"the processor cannot encode it (its image is {size}): {err}") from err
    # a suffix makes the processor add `labels`: training computes its own targets, and the
    # model would compute a loss of its own (of the untruncated length) from them
    encoded.pop("labels", None)
    image_id = image_token_id(processor, recipe)
    return truncate_keeping_image_tokens(encoded, image_id, ctx_len, max_positions)


def check_text_has_no_image_token(example: Example, recipe: Recipe) -> None:
    """An example's question and answer hold none of the recipe's image tokens: the processor
    would take one for a second image placeholder (and refuse the example with a message that
    names neither it nor the text)."""
    tokens = dict.fromkeys(
        t for t in (recipe.prompt.image_token, recipe.prompt.image_pad_token) if t
    )
    for name, text in (("question", example.question), ("answer", example.answer)):
        for token in tokens:
            if token in text:
                raise ValueError(
                    f"its {name} holds the recipe's image token '{token}', which the processor "
                    "would take for an image; remove it from the text"
                )


def _pad_to(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    pad: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape[1:]), strict=True):
        pad += [0, want - have]
    return F.pad(tensor, pad)


def collate(encoded: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token keys; concatenate image keys along dim 0 (zero-padding ragged dims)."""
    batch: dict[str, torch.Tensor] = {}
    length = max(e["input_ids"].shape[1] for e in encoded)
    for key in encoded[0]:
        values = [e[key] for e in encoded]
        if key in TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([F.pad(v, (0, length - v.shape[1]), value=fill) for v in values])
        else:
            shape = torch.Size(max(dims) for dims in zip(*(v.shape for v in values), strict=True))
            batch[key] = torch.cat([_pad_to(v, shape) for v in values])
    return batch


def token_mask(
    batch: dict[str, torch.Tensor],
    image_id: int,
    tokens: TokenRegion = "all",
    exclude_tokens: tuple[int, ...] = (),
) -> torch.Tensor:
    """Training positions: not padding AND in the region AND not an excluded token."""
    input_ids = batch["input_ids"]
    mask = batch["attention_mask"].bool()
    match tokens:
        case "all":
            pass
        case "image":
            mask &= input_ids == image_id
        case "text":
            mask &= input_ids != image_id
        case other:
            raise ValueError(f"unknown --tokens '{other}'; choose all, image or text")
    if exclude_tokens:
        mask &= ~torch.isin(input_ids, torch.tensor(exclude_tokens))
    return mask


def shared_prefix_length(input_ids: torch.Tensor, image_mask: torch.Tensor | None = None) -> int:
    """How many leading positions hold the same token in every example of a batch and no image
    token: the start of the prompt template, whose activations (causal attention) are the same
    in every example. 0 for a batch of one example, which cannot tell."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0)
    if image_mask is not None:
        same &= ~image_mask.any(0)
    return int(same.int().cumprod(0).sum())


@dataclass
class BatchStream(IterableDataset):
    """Batches of processed examples, deterministic in order for any number of workers.

    Batch b holds raw examples [b * batch_size, (b + 1) * batch_size); the workers take the
    batches in turn, and DataLoader's round robin restores the order, so resuming at
    `start_example` and running under torchrun (rank r takes its contiguous slice of every
    batch) see exactly the same examples as one uninterrupted process. A start inside a batch
    (a run whose --max_examples ended it short) yields the rest of that batch first.
    """

    examples: Iterable[Example]
    processor: Any
    recipe: Recipe
    batch_size: int
    ctx_len: int = 2048
    max_positions: int | None = None
    """The model's context length (image and text tokens together)."""
    tokens: TokenRegion = "all"
    exclude_tokens: tuple[int, ...] = ()
    strict: bool = False
    start_example: int = 0
    """Raw examples to skip: those a resumed run has trained on."""
    max_examples: int | None = None
    rank: int = 0
    world_size: int = 1
    _image_id: int = field(init=False)

    def __post_init__(self) -> None:
        super().__init__()
        if self.batch_size % self.world_size:
            raise ValueError(
                f"--batch_size {self.batch_size} must be divisible by the {self.world_size} ranks"
            )
        self._image_id = image_token_id(self.processor, self.recipe)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        examples = iter(self.examples)
        if self.max_examples is not None:
            examples = islice(examples, self.max_examples)
        first_batch = self.start_example // self.batch_size
        try:
            for index, chunk in enumerate(_chunks(examples, self.batch_size)):
                chunk = chunk[max(self.start_example - index * self.batch_size, 0) :]
                # DataLoader asks worker 0 first: it takes the first batch yielded
                if chunk and (index - first_batch) % num_workers == worker_id:
                    yield self.make_batch(index, chunk)
        except (ValueError, OSError) as err:
            if worker is None:
                raise
            # torch would re-raise it in a 30-line "Caught ... in DataLoader worker" message:
            # the training loop raises it as it was (Trainer.train_on_batch)
            yield {"error": err}

    def make_batch(self, index: int, chunk: list[Example]) -> dict[str, Any]:
        per_rank = self.batch_size // self.world_size
        n_examples = len(chunk)  # every rank's: the run's count of raw examples
        chunk = chunk[self.rank * per_rank : (self.rank + 1) * per_rank]
        encoded, skipped, kept = [], [], []
        for example in chunk:
            try:
                encoded.append(
                    encode_example(
                        example, self.processor, self.recipe, self.ctx_len, self.max_positions
                    )
                )
                kept.append(example.id)
            except BadImageError as err:
                if self.strict:
                    raise BadImageError(f"example {example.id}: {err}") from err
                skipped.append(example.id)
            except ValueError as err:  # the processor refused it, or the context is too short
                raise ValueError(f"example {example.id}: {err}") from err
        batch: dict[str, Any] = {"batch_index": index, "n_examples": n_examples, "skipped": skipped}
        if encoded:
            pad_id = self.processor.tokenizer.pad_token_id or 0
            inputs = collate(encoded, pad_id)
            batch["inputs"] = inputs
            batch["token_mask"] = token_mask(
                inputs, self._image_id, self.tokens, self.exclude_tokens
            )
            batch["image_mask"] = inputs["input_ids"] == self._image_id
            check_image_region(inputs, batch["image_mask"], kept, self.recipe, self.processor)
        return batch


def init_worker(_: int) -> None:
    """DataLoader `worker_init_fn`: preprocessing workers leave the cores to the model, and
    leave SIGTERM to the training process, which stops them itself (`cli.run_cli`; they end on
    their own too once it is gone); killed by it, they would make the DataLoader raise."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_loader(stream: BatchStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """The DataLoader that feeds training: `stream` makes whole batches in `num_workers`
    single-threaded worker processes (0: in the training process); `pin_memory` on a GPU."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=init_worker,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def _chunks(items: Iterator[Example], size: int) -> Iterator[list[Example]]:
    while chunk := list(islice(items, size)):
        yield chunk

"""Where chosen features fire most: their top samples in a feature store, with every row's
activation, the image tokens laid out on the image's patch grid, and the samples' tokens.

`top_examples` reads the store once (shard by shard) and keeps, per feature, the `top` samples
with the highest activation over a token region; `sample_tokens` rebuilds the token ids behind a
sample's store rows (prompt through the processor, then the generated tokens but the last) and the
layout of its image tokens as the processor reports it; `patch_grid` puts the image-token
activations on that rows x columns grid (LLaVA-1.5: 576 = 24 x 24; the tiny model: 8 x 8). An
image split into tiles or crops has no such grid: `view_grid` finds the tokens of one view of
the whole image (Idefics3 / SmolVLM's tiles stitched; LLaVA-NeXT / OneVision's high-resolution
crops stitched and unpadded, newline tokens skipped, else their base view; InternVL's thumbnail)
and their grid.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.store import FeatureStore, SampleRecord
from vlm_sparsify.capture import Regions


@dataclass(frozen=True, order=True)
class FeatureRef:
    """A feature: its source hookpoint's position in the store and its latent index."""

    source: int
    latent: int


@dataclass
class Example:
    """One sample where a feature fires: its peak over the region and the activation per row."""

    sample_id: str
    peak: float
    """Highest activation over the region's rows."""
    peak_row: int
    """Row of the peak (0 = the sample's first stored token)."""
    activations: np.ndarray
    """float32 [T]: the feature's activation at every row of the sample (0 where inactive)."""
    regions: Regions
    """The sample's token ranges per region, as the store records them."""


_REF = re.compile(r"^\s*L?(\d+)\s*/\s*F?(\d+)\s*$", re.IGNORECASE)


def parse_feature_refs(text: str, layers: Sequence[int], num_latents: int) -> list[FeatureRef]:
    """`L2/F17,L3/F5` (or `2/17,3/5`): decoder layer numbers as features.json and the plots
    name them (`layers[p]` is the layer of the store's source p)."""
    refs = []
    for word in (w for w in text.split(",") if w.strip()):
        match = _REF.match(word)
        if not match:
            raise ValueError(f"--features {word!r}: write LAYER/FEATURE, e.g. L2/F17")
        layer, latent = int(match[1]), int(match[2])
        if layer not in layers:
            raise ValueError(
                f"--features {word.strip()}: the store has no coder at layer {layer} "
                f"(its layers: {', '.join(map(str, layers))})"
            )
        if latent >= num_latents:
            raise ValueError(
                f"--features {word.strip()}: feature {latent} is out of range (the coders have "
                f"{num_latents} latents)"
            )
        refs.append(FeatureRef(layers.index(layer), latent))
    if not refs:
        raise ValueError("--features is empty: name features as LAYER/FEATURE, e.g. L2/F17")
    return list(dict.fromkeys(refs))


def top_examples(
    store: FeatureStore,
    features: Iterable[FeatureRef],
    top: int,
    region: str = "all",
    ids: Iterable[str] | None = None,
) -> dict[FeatureRef, list[Example]]:
    """Per feature, its `top` samples by peak activation over `region`'s rows, highest first
    (ties: store order). Samples where the feature never fires in the region are left out, so a
    list may be shorter than `top`, or empty."""
    if top < 1:
        raise ValueError(f"--top {top}: give at least 1 sample per feature")
    refs = sorted(set(features))
    heaps: dict[FeatureRef, list[tuple[float, int, Example]]] = {ref: [] for ref in refs}
    by_source = {
        source: np.array([r.latent for r in refs if r.source == source], dtype=np.int64)
        for source in dict.fromkeys(r.source for r in refs)
    }
    order = 0
    wanted = None if ids is None else set(ids)
    shards = len({r.shard for r in store.records() if wanted is None or r.id in wanted})
    for shard in tqdm(store.shards(wanted), total=shards, desc="reading the feature store"):
        for record in shard.records:
            rows = slice(record.start, record.stop)
            indices, values = shard.indices(rows), shard.values(rows)
            in_region = record.rows(region)
            for source, latents in by_source.items():
                # [T, k, n] hits of the wanted latents, summed over the k slots: [T, n]
                hits = indices[:, source, :, None] == latents
                acts = (values[:, source, :, None] * hits).sum(1)
                for column, latent in enumerate(latents):
                    _offer(heaps[FeatureRef(source, int(latent))], top, order, record,
                           acts[:, column], in_region)  # fmt: skip
            order += 1
    return {
        ref: [example for _, _, example in sorted(heap, key=lambda e: (-e[0], -e[1]))]
        for ref, heap in heaps.items()
    }


def _offer(
    heap: list[tuple[float, int, Example]],
    top: int,
    order: int,
    record: SampleRecord,
    activations: np.ndarray,
    in_region: np.ndarray,
) -> None:
    """Keep the sample in the feature's min-heap of its `top` best (earlier samples win ties)."""
    if len(in_region) == 0:
        return
    region_acts = activations[in_region]
    best = int(np.argmax(region_acts))
    peak = float(region_acts[best])
    if peak <= 0:
        return
    key = (peak, -order)
    if len(heap) == top and key <= heap[0][:2]:
        return
    example = Example(record.id, peak, int(in_region[best]), activations.astype(np.float32),
                      record.regions)  # fmt: skip
    item = (peak, -order, example)
    if len(heap) < top:
        heapq.heappush(heap, item)
    else:
        heapq.heapreplace(heap, item)


@dataclass(frozen=True)
class ViewGrid:
    """The tokens of one view of a tiled or cropped image that lie on a grid over a whole frame of
    the processor's pixels (`view_grid`), over several frames stitched (a tiled image's tiles), or
    over part of them (`box`: anyres crops stitched, their padding cut away)."""

    shape: tuple[int, int]
    """Rows, columns of the whole grid (row-major, as the towers emit them); with tiles, the
    stitched grid: each tile's rows x columns times `tiles`."""
    starts: tuple[int, ...]
    """Row (token position in the sample) of the grid's first token; with several, of each
    tile's, row-major (each tile's rows x columns tokens a run)."""
    frame: int
    """The pixel frame the grid lies on: `pixel_values[0, frame]` ([1, frames, 3, H, W]), or
    `pixel_values[frame]` ([frames, 3, H, W], InternVL); with tiles, the first tile's frame."""
    view: str
    """What is drawn and what not, for the card (e.g. `tiles drawn (2 x 3); global view not
    drawn`)."""
    tiles: tuple[int, int] = (1, 1)
    """Tile rows, columns: frames `frame` on, row-major, stitched into one picture."""
    stride: int = 0
    """Tokens from the first of one grid row to the next's; 0: the row's columns (no token
    between rows). LLaVA-NeXT / OneVision's crops: columns + 1 (a newline token ends each row)."""
    box: tuple[int, int, int, int] | None = None
    """The pixels of the (stitched) frames that the grid covers, top, left, bottom, right (the
    picture drawn); None: all of them."""
    seen: tuple[int, int] | None = None
    """Of each frame, the pixels the tower's patches cover (height, width from the top left), cut
    out before the frames are stitched: SigLIP's 27 patches of 14 pixels leave the last 6 rows and
    columns of its 384-pixel input unseen. None: the whole frame."""

    def runs(self) -> tuple[tuple[int, int], np.ndarray]:
        """How the grid's tokens lie: the runs' tile rows and columns ((1, 1) with one start: one
        run over the whole grid), and the [rows, columns] token offsets of a run's cells from its
        start (a grid row every `stride` tokens)."""
        tiles = self.tiles if len(self.starts) > 1 else (1, 1)
        rows, columns = self.shape[0] // tiles[0], self.shape[1] // tiles[1]
        return tiles, np.arange(rows)[:, None] * (self.stride or columns) + np.arange(columns)

    def token_rows(self) -> set[int]:
        """The token positions the grid draws (`patch_grid`'s), newlines between rows left out."""
        _, cells = self.runs()
        return {start + int(cell) for start in self.starts for cell in cells.flat}


def patch_grid(
    activations: np.ndarray, regions: Regions, shape: tuple[int, int] | ViewGrid | None
) -> np.ndarray | None:
    """The image tokens' activations on the image's token grid `shape` (rows, columns; row-major,
    as the towers emit them; from `sample_tokens`). None without a shape, or when the sample has
    no single block of image tokens of that size. A `ViewGrid` takes its tokens from its `starts`
    (one per tile, stitched; or one run over the whole grid), a grid row every `stride` tokens,
    each run within one block of image tokens."""
    spans = regions.get("image", [])
    if isinstance(shape, ViewGrid):
        (tile_rows, tile_columns), cells = shape.runs()
        rows, columns = cells.shape
        if len(shape.starts) != tile_rows * tile_columns or cells.size == 0:
            return None
        if 0 < shape.stride < columns:  # rows would overlap
            return None
        grid = np.zeros(shape.shape, activations.dtype)
        for tile, start in enumerate(shape.starts):
            stop = start + int(cells[-1, -1]) + 1
            if not any(a <= start and stop <= b for a, b in spans) or stop > len(activations):
                return None
            top, left = tile // tile_columns * rows, tile % tile_columns * columns
            grid[top : top + rows, left : left + columns] = activations[start + cells]
        return grid
    if shape is None or len(spans) != 1:
        return None
    start, stop = spans[0]
    if stop - start == 0 or shape[0] * shape[1] != stop - start:
        return None
    return activations[start:stop].reshape(shape)


def sample_tokens(
    processor: Any, record: dict, image: Any, rows: int, image_tokens: int
) -> tuple[list[int] | None, tuple[int, int] | ViewGrid | None]:
    """The token ids of a sample's `rows` store rows: its prompt through the processor (image
    tokens expanded, as capture fed it), then its generated tokens but the last (never fed to the
    model); None when they do not add up to `rows` (e.g. a processor that changed since). And the
    grid (rows, columns) of its `image_tokens` image tokens (`grid_shape`), else the grid of one
    view of a tiled image (`view_grid`), None when unknown."""
    inputs = processor(images=[image], text=[record["prompt"]], return_tensors="pt")
    prompt = inputs["input_ids"][0].tolist()
    tokens = prompt + list(record.get("response_token_ids", []))[:-1]
    if len(tokens) != rows:
        return None, None
    shape = grid_shape(processor, inputs, image_tokens)
    if shape is None:
        return tokens, view_grid(processor, inputs)
    return tokens, shape


def grid_shape(processor: Any, inputs: Any, image_tokens: int) -> tuple[int, int] | None:
    """How one image's `image_tokens` tokens lie on its patch grid, from the processor's output:
    `image_grid_thw` over `merge_size` (Qwen2-VL family), or a square when the pixels are one
    [1, 3, H, W] image and the count is a square (LLaVA-1.5, Gemma 3, PaliGemma, one InternVL
    tile). None for anything else: tiles and crops (LLaVA-NeXT / OneVision, Idefics3, InternVL),
    whose token count may be a square by chance."""
    thw = inputs.get("image_grid_thw")
    if thw is not None:
        if len(thw) != 1 or int(thw[0][0]) != 1:
            return None
        merge = int(getattr(processor.image_processor, "merge_size", 1) or 1)
        return int(thw[0][1]) // merge, int(thw[0][2]) // merge
    pixels = inputs.get("pixel_values")
    side = math.isqrt(image_tokens)
    one_image = pixels is not None and pixels.ndim == 4 and pixels.shape[:2] == (1, 3)
    if one_image and "image_sizes" not in inputs and side * side == image_tokens > 0:
        return side, side
    return None


def view_grid(processor: Any, inputs: Any) -> ViewGrid | None:
    """Where the tokens of one view of the whole image lie and on what grid, for processors that
    split an image into tiles or crops, as their token layout is written (transformers' processing
    and modeling code); None for any other processor, or any layout not exactly as expected (a
    wrong overlay is worse than none).

    Idefics3 / SmolVLM: the image processor resizes the image to a multiple of the tile side
    (`max_image_size`) and splits it into R x C square tiles, row-major in the pixel frames, then
    appends the global image (the whole image squashed to one tile) as the last frame; the
    processor writes `<fake_token_around_image><row_r_col_c>` + `image_seq_len` image tokens per
    tile in that order, then `<fake_token_around_image><global-img>` + `image_seq_len` tokens of
    the global image (without splitting, the only frame). Pixel shuffle leaves each frame's tokens
    row-major on a square grid. The tiles are drawn, stitched into one R x C picture of the
    resized image (a finer view than the global one); an image not split, its global image.

    LLaVA-NeXT / LLaVA-OneVision (anyres): one block of image tokens, the base view's first (the
    whole image resized to the vision tower's input, pixel frame 0; `pack_image_features` puts
    its features before the crops', with no newline tokens among them), row-major on the tower's
    patch grid; then the crops' (frames 1..) stitched into one grid, unpadded, with a newline
    token closing each row. The crops are drawn (`_crops_view`), stitched, on the pixels their
    kept patches see; where their layout is not exactly that, the base view.

    InternVL: `<img>` + `image_seq_length` tokens per tile + `</img>`, the tiles in the pixel
    frames' order ([tiles, 3, H, W]); with several tiles the image processor always appends a
    thumbnail (the whole image squashed to a tile), the last frame and the block's last tokens,
    row-major on a square grid (pixel shuffle)."""
    from transformers import (
        Idefics3Processor,
        InternVLProcessor,
        LlavaNextProcessor,
        LlavaOnevisionProcessor,
        SmolVLMProcessor,
    )

    if isinstance(processor, (Idefics3Processor, SmolVLMProcessor)):
        return _idefics3_view(processor, inputs)
    if isinstance(processor, (LlavaNextProcessor, LlavaOnevisionProcessor)):
        return _anyres_view(processor, inputs)
    if isinstance(processor, InternVLProcessor):
        return _thumbnail_view(processor, inputs)
    return None


_TILE_TAG = re.compile(r"^<row_(\d+)_col_(\d+)>$")


def _idefics3_view(processor: Any, inputs: Any) -> ViewGrid | None:
    """Idefics3 / SmolVLM: the tiles stitched (each `<row_R_col_C>` tag followed by its
    `image_seq_len` image tokens, row-major, one pixel frame each, before the global image's),
    or, for an image not split, the global image: the `image_seq_len` tokens after `<global-img>`."""
    ids = inputs["input_ids"]
    pixels = inputs.get("pixel_values")
    if len(ids) != 1 or pixels is None or pixels.ndim != 5 or pixels.shape[:1] != (1,):
        return None
    tag = getattr(processor, "global_image_tag", None) or processor.global_image_token
    tag_id, image_id = processor.tokenizer.convert_tokens_to_ids(tag), processor.image_token_id
    ids = ids[0].tolist()
    count, side = processor.image_seq_len, math.isqrt(processor.image_seq_len)
    frames, height, width = pixels.shape[1], pixels.shape[-2], pixels.shape[-1]
    tags = [i for i, t in enumerate(ids) if t == tag_id]
    if len(tags) != 1 or side * side != count or height != width:
        return None
    if ids.count(image_id) != frames * count:  # a frame per image_seq_len tokens, none padding
        return None
    mask = inputs.get("pixel_attention_mask")
    if mask is not None and not bool(mask[0].all()):
        return None
    tiles = []  # (row, column, first token) per <row_R_col_C> tag, in the prompt's order
    pieces = processor.tokenizer.convert_ids_to_tokens(ids)
    for position, piece in enumerate(pieces):
        match = _TILE_TAG.match(piece) if isinstance(piece, str) else None
        if match:
            tiles.append((int(match[1]), int(match[2]), position + 1))
    starts = [start for _, _, start in tiles] + [tags[0] + 1]
    for start in starts:  # exactly `image_seq_len` image tokens after each tag
        block = ids[start : start + count + 1]
        if block[:count] != [image_id] * count or block[count:] == [image_id]:
            return None
    if not tiles:
        return ViewGrid((side, side), (starts[0],), frames - 1, "") if frames == 1 else None
    rows, columns = max(r for r, _, _ in tiles), max(c for _, c, _ in tiles)
    row_major = [(r, c) for r in range(1, rows + 1) for c in range(1, columns + 1)]
    if [(r, c) for r, c, _ in tiles] != row_major or frames != rows * columns + 1:
        return None
    if starts[-2] >= starts[-1]:  # the tiles come before the global image
        return None
    view = f"tiles drawn ({rows} x {columns}); global view not drawn"
    shape = (rows * side, columns * side)
    return ViewGrid(shape, tuple(starts[:-1]), 0, view, (rows, columns))


def _anyres_view(processor: Any, inputs: Any) -> ViewGrid | None:
    """LLaVA-NeXT / OneVision: the high-resolution crops (`_crops_view`) where their layout is
    exactly as derived, else the base view, else None."""
    base = _base_view(processor, inputs)
    if base is None:
        return None
    crops = _crops_view(processor, inputs, base)
    if crops is not None:
        return crops
    view = "base view (whole image) drawn; high-resolution crops not drawn"
    return replace(base, view=view if inputs["pixel_values"].shape[1] > 1 else "")


def _base_view(processor: Any, inputs: Any) -> ViewGrid | None:
    """LLaVA-NeXT / OneVision's base view: the first tokens of the image's block, as many as the
    processor counts for it (`_get_number_of_features`' base features) when they are exactly the
    tower's patches (no CLS among them)."""
    ids = inputs["input_ids"]
    pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
    if len(ids) != 1 or pixels is None or pixels.ndim != 5 or pixels.shape[0] != 1:
        return None
    if sizes is None or len(sizes) != 1:
        return None
    height, width = pixels.shape[-2], pixels.shape[-1]
    cls_dropped = processor.vision_feature_select_strategy == "default"
    seen = None
    if hasattr(processor, "num_image_tokens"):  # OneVision: no CLS (SigLIP), a square grid
        side = math.isqrt(processor.num_image_tokens or 0)
        if cls_dropped or side * side != processor.num_image_tokens or height != width:
            return None
        shape = (side, side)
        if height % side:  # patches not filling the frame: of the one size that gives `side`
            patches = [patch for patch in range(1, height + 1) if height // patch == side]
            if len(patches) != 1:
                return None  # the patch size is not known from the processor
            seen = (patches[0] * side, patches[0] * side)
    else:  # LLaVA-NeXT: the base's patches + num_additional_image_tokens, less a dropped CLS
        patch = processor.patch_size
        extra = processor.num_additional_image_tokens - int(cls_dropped)
        if not patch or extra != 0 or height % patch or width % patch:
            return None
        shape = (height // patch, width // patch)
    rows = [i for i, t in enumerate(ids[0].tolist()) if t == processor.image_token_id]
    if not rows or rows != list(range(rows[0], rows[0] + len(rows))):
        return None  # not one block of image tokens
    if len(rows) <= shape[0] * shape[1]:  # the crops' (or a lone base's newline) follow the base
        return None
    return ViewGrid(shape, (rows[0],), 0, "", seen=seen)


def _crops_view(processor: Any, inputs: Any, base: ViewGrid) -> ViewGrid | None:
    """LLaVA-NeXT / OneVision's high-resolution crops, after the base view's tokens: the image
    processor picks the best of `image_grid_pinpoints` for the image (`select_best_resolution`),
    fits the image in it, pads it and cuts it into R x C crops of the tower's input (frames 1..,
    row-major); `pack_image_features` stitches their patch grids into one (R x side) x (C x side)
    grid, cuts off the rows or columns that the padding added (`unpad_image`, the model's own,
    run here on a grid of cell numbers), and appends a newline token to each row. Drawn when the
    block holds exactly the base's tokens and then rows x (columns + 1), as many as the processor
    wrote (OneVision's crops pooled past `anyres_max_N` are fewer: not drawn), on the stitched
    crops with the padding's cells cut away. None otherwise (an empty grid too)."""
    import torch
    from transformers.image_processing_utils import select_best_resolution

    try:
        if hasattr(processor, "num_image_tokens"):
            from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image
        else:
            from transformers.models.llava_next.modeling_llava_next import unpad_image
    except ImportError:
        return None
    pixels, ids = inputs["pixel_values"], inputs["input_ids"][0].tolist()
    frames, height, width = pixels.shape[1], pixels.shape[-2], pixels.shape[-1]
    side = base.shape[0]
    if base.shape != (side, side) or height != width:
        return None  # the model reshapes each crop to image_size // patch_size squared
    seen = base.seen or (height, width)
    pinpoints = getattr(processor.image_processor, "image_grid_pinpoints", None)
    original = tuple(int(v) for v in inputs["image_sizes"][0])  # height, width
    if not pinpoints or len(original) != 2:
        return None
    best_height, best_width = select_best_resolution(original, pinpoints)
    crop_rows, crop_columns = best_height // height, best_width // width
    if best_height % height or best_width % width or frames != 1 + crop_rows * crop_columns:
        return None
    full = (crop_rows * side, crop_columns * side)
    numbers = torch.arange(full[0] * full[1]).view(full)
    cells = unpad_image(numbers[None], original)[0]
    rows, columns = cells.shape
    if rows * columns == 0:
        return None
    top, left = divmod(int(cells[0, 0]), full[1])
    if not torch.equal(cells, numbers[top : top + rows, left : left + columns]):
        return None  # not one rectangle of the stitched grid
    count = sum(1 for t in ids if t == processor.image_token_id)
    if count != side * side + rows * (columns + 1):
        return None
    patch = seen[0] // side
    box = (top * patch, left * patch, (top + rows) * patch, (left + columns) * patch)
    unpadded = "unpadded to " if (rows, columns) != full else ""
    view = (
        f"high-resolution crops drawn ({crop_rows} x {crop_columns}, {unpadded}{rows} x "
        f"{columns} patches); base view not drawn"
    )
    start = base.starts[0] + side * side
    return ViewGrid((rows, columns), (start,), 1, view, (crop_rows, crop_columns),
                    columns + 1, box, base.seen)  # fmt: skip


def _thumbnail_view(processor: Any, inputs: Any) -> ViewGrid | None:
    """InternVL's thumbnail: the last `image_seq_length` tokens of the image's one block."""
    ids, pixels = inputs["input_ids"], inputs.get("pixel_values")
    if len(ids) != 1 or pixels is None or pixels.ndim != 4 or pixels.shape[1] != 3:
        return None
    frames, height, width = pixels.shape[0], pixels.shape[-2], pixels.shape[-1]
    count = processor.image_seq_length
    side = math.isqrt(count)
    if frames < 2 or side * side != count or height != width:
        return None  # one tile: no thumbnail (`grid_shape` draws it)
    rows = [i for i, t in enumerate(ids[0].tolist()) if t == processor.image_token_id]
    if len(rows) != frames * count or rows != list(range(rows[0], rows[0] + len(rows))):
        return None
    view = "thumbnail (whole image) drawn; tiles not drawn"
    return ViewGrid((side, side), (rows[-count],), frames - 1, view)


CONTEXT = 8
"""Tokens decoded before each token, so that it reads as in running text (its leading space, a
character whose bytes span several tokens)."""


def token_strings(tokenizer: Any, ids: Sequence[int], skip: Iterable[int] = ()) -> list[str]:
    """How each token reads in running text: what it adds to the decoded text of the tokens before
    it (at least `CONTEXT` of them; the tokenizer's own decoder, so SentencePiece's and byte-level
    BPE's space marks, byte fallback and multi-byte characters come out as text). A token holding
    part of a character reads as "", the token completing it as the whole character. Rows in
    `skip` (image tokens, drawn as one chip) get their vocabulary piece, undecoded; an id the
    vocabulary lacks (a model's embeddings padded past it) reads `<id N>`."""
    ids = [int(i) for i in ids]
    skipped = set(skip)
    strings = []
    start, done, pending = 0, 0, False  # decoded text of ids[start:row]: `done` chars shown
    for row, piece in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        if row in skipped or piece is None:  # None: an id past the vocabulary (padded embeddings)
            strings.append(f"<id {ids[row]}>" if piece is None else str(piece))
            continue
        if not pending and row - start > CONTEXT:
            start = row - CONTEXT
            done = len(tokenizer.decode(ids[start:row]))
        text = tokenizer.decode(ids[start : row + 1])
        pending = text.endswith("\ufffd") and row < len(ids) - 1
        if pending:  # an incomplete character: the token completing it shows it
            strings.append("")
            continue
        strings.append(text[done:])
        done = len(text)
    return strings

"""Pictures and a page of the samples where features fire most (`examples` stage).

`model_view` is the image as the model saw it (the processor's pixels, de-normalized; for a tiled
image, the frame of the view drawn, or its tiles stitched; for anyres crops, the crops stitched
with the padding's patches cut away);
`overlay` colours its patches by a feature's activation; `write_page` writes one self-contained
HTML page (images inline) with, per feature, its top samples: image, GOOD / BAD, peak, and the
sample's tokens shaded by the feature's activation (hover for the value); `plot_grid` draws the
first features' top images as one PNG.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.feature_examples import Example, ViewGrid, patch_grid

CMAP = "inferno"
"""Colour map of activations (dark: silent, bright: the feature's highest shown)."""
THUMB = 224
"""Side of a card's image, in pixels."""
JPEG_QUALITY = 90
"""Of the page's card images."""


@dataclass
class Card:
    """One top sample of a feature, ready to draw."""

    example: Example
    label: str | None
    """GOOD, BAD or None (not classified)."""
    picture: Image.Image | None
    """The image with the feature's patches coloured (None: image missing)."""
    tokens: list[str] | None
    """One string per store row (None: the ids could not be rebuilt)."""
    note: str = ""
    grid_shape: tuple[int, int] | ViewGrid | None = None
    """The image's token grid (rows, columns) when the processor reported one; for a tiled image,
    the grid of the view drawn."""


@dataclass
class FeatureSection:
    """A feature and its cards."""

    title: str
    """e.g. `L2/F17`."""
    subtitle: str
    """Hookpoint and the analysis' figures, when known."""
    cards: list[Card]
    scale: float
    """Activation that maps to the brightest colour (`colour_scale`)."""


def model_view(
    image_processor: Any,
    image: Image.Image,
    frame: int | None = None,
    tiles: tuple[int, int] = (1, 1),
    box: tuple[int, int, int, int] | None = None,
    seen: tuple[int, int] | None = None,
) -> Image.Image | None:
    """The image as the vision tower saw it: the processor's resized / cropped pixels, with its
    normalization undone. None when its output is not one [3, H, W] image (tiles, videos), unless
    `frame` picks one of its [1, frames, 3, H, W] or [frames, 3, H, W] (a tiled image's view,
    `ViewGrid.frame`); with `tiles` (rows, columns), that frame and the next, row-major, stitched
    into one picture (`ViewGrid.tiles`), each frame cut to its top-left `seen` (height, width)
    first (`ViewGrid.seen`); with `box` (top, left, bottom, right), those pixels of it only
    (`ViewGrid.box`). None when `seen` or `box` does not lie within."""
    pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    if frame is not None:
        frames = pixels[0] if pixels.ndim == 5 and pixels.shape[0] == 1 else pixels
        rows, columns = tiles
        stop = frame + rows * columns
        if frames.ndim != 4 or rows < 1 or columns < 1 or not 0 <= frame < stop <= len(frames):
            return None
        if seen is not None:
            if not (0 < seen[0] <= frames.shape[-2] and 0 < seen[1] <= frames.shape[-1]):
                return None
            frames = frames[..., : seen[0], : seen[1]]
        grid = frames[frame:stop].reshape(rows, columns, *frames.shape[1:])
        # [rows, columns, 3, h, w] -> [3, rows * h, columns * w]
        pixels = grid.permute(2, 0, 3, 1, 4).reshape(
            1, frames.shape[1], -1, columns * frames.shape[-1]
        )
    if box is not None:
        top, left, bottom, right = box
        if not (0 <= top < bottom <= pixels.shape[-2] and 0 <= left < right <= pixels.shape[-1]):
            return None
        pixels = pixels[..., top:bottom, left:right]
    if pixels.ndim != 4 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
        return None
    array = pixels[0].float().numpy().transpose(1, 2, 0)
    if getattr(image_processor, "do_normalize", True):
        array = array * np.asarray(image_processor.image_std) + np.asarray(
            image_processor.image_mean
        )
    if not getattr(image_processor, "do_rescale", True):
        array = array / 255.0
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))


def colour_scale(examples: Sequence[Example]) -> float:
    """The highest activation at any row of the examples, not only in the ranking region: tokens
    outside it (the prompt, ranked by `--region response`) would else saturate, as bright as the
    peak."""
    return max((float(e.activations.max()) for e in examples if len(e.activations)), default=0.0)


def colours(values: np.ndarray) -> np.ndarray:
    """RGB uint8 of `values` in [0, 1] through CMAP (256 levels)."""
    levels = np.round(np.clip(np.nan_to_num(values), 0, 1) * 255).astype(np.int64)
    return _colour_table()[levels]


@functools.cache
def _colour_table() -> np.ndarray:
    """CMAP as 256 RGB rows, built once (a colormap call costs ~1 ms: a page has 10^5 tokens)."""
    from matplotlib import colormaps

    rgba = np.asarray(colormaps[CMAP](np.linspace(0, 1, 256)))
    return (rgba[:, :3] * 255).round().astype(np.uint8)


def overlay(view: Image.Image, grid: np.ndarray | None, scale: float) -> Image.Image:
    """`view` with each patch tinted by its activation / `scale` (patches where the feature is
    silent are dimmed), THUMB wide and as high as the grid's aspect; without a grid, the image
    alone (square)."""
    rows, columns = grid.shape if grid is not None else (1, 1)
    size = (THUMB, max(1, round(THUMB * rows / columns)))
    picture = view.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    if grid is None:
        return picture
    level = np.clip(grid / scale, 0, 1) if scale > 0 else np.zeros_like(grid)
    tint = Image.fromarray(colours(level)).resize(size, Image.Resampling.NEAREST)
    # lit patches at most 65 % tinted, so what lies under the peak stays visible
    opacity = np.where(level > 0, 0.3 + 0.35 * level, 0.55)
    alpha = Image.fromarray((opacity * 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    dark = Image.new("RGB", picture.size, (0, 0, 0))
    silent = Image.composite(dark, picture, alpha)
    lit = Image.composite(tint, picture, alpha)
    mask = Image.fromarray(((level > 0) * 255).astype(np.uint8)).resize(
        size, Image.Resampling.NEAREST
    )
    return Image.composite(lit, silent, mask)


def card_picture(
    view: Image.Image | None,
    example: Example,
    scale: float,
    shape: tuple[int, int] | ViewGrid | None = None,
) -> Image.Image | None:
    if view is None:
        return None
    return overlay(view, patch_grid(example.activations, example.regions, shape), scale)


def _jpeg(picture: Image.Image) -> str:
    """Base64 JPEG: a 224-pixel photo is ~15 KB (~100 KB as PNG; a page has 64 x 6 of them)."""
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _token_html(card: Card, scale: float) -> str:
    """The sample's tokens shaded by the activation; the image tokens as one chip (their peak)."""
    example = card.example
    acts = example.activations
    image_rows = {r for a, b in example.regions.get("image", []) for r in range(a, b)}
    response = {r for a, b in example.regions.get("response", []) for r in range(a, b)}
    parts = []
    row = 0
    while row < len(acts):
        if row in image_rows:
            end = row
            while end in image_rows:
                end += 1
            peak = float(acts[row:end].max())
            text = f"[image x{end - row}]"
            title = f"image tokens {row}-{end - 1}: peak {peak:.3g}"
            value, peak_here, chip = peak, row <= example.peak_row < end, True
            row = end
        else:
            word = card.tokens[row] if card.tokens else f"#{row}"
            value, peak_here, chip = float(acts[row]), row == example.peak_row, False
            text, title = word, f"row {row}: {value:.3g}"
            row += 1
        shade = colours(np.array(value / scale if scale > 0 else 0.0))
        style = f"background: rgb({shade[0]},{shade[1]},{shade[2]});" if value > 0 else ""
        if value > 0 and value / scale > 0.5:
            style += " color: black;"
        classes = "tok" + (" peak" if peak_here else "") + (" resp" if row - 1 in response else "")
        classes += " img" if chip else ""
        parts.append(
            f'<span class="{classes}" style="{style}" title="{html.escape(title)}">'
            f"{html.escape(text)}</span>"
        )
    return "".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
section { margin-bottom: 2.5em; }
h2 { margin-bottom: 0.1em; } .sub { color: #555; margin-top: 0; font-size: 0.9em; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: 240px; border: 1px solid #ccc; border-radius: 6px; padding: 8px; }
.card.GOOD { border-top: 5px solid #2a9d8f; } .card.BAD { border-top: 5px solid #e76f51; }
.card img { width: 224px; height: auto; display: block; image-rendering: pixelated; }
.meta { font-size: 0.8em; margin: 4px 0; } .note { color: #a00; font-size: 0.8em; }
.tokens { font-family: ui-monospace, monospace; font-size: 0.72em; line-height: 1.6;
          background: #111; color: #ddd; padding: 4px; border-radius: 4px; word-break: break-all; }
.tok { white-space: pre-wrap; } .tok.resp { text-decoration: underline dotted #888; }
.tok.peak { outline: 2px solid #4cc9f0; } .tok.img { margin: 0 3px; }
"""


def write_page(path: Path, heading: str, intro: str, sections: Sequence[FeatureSection]) -> None:
    """One self-contained HTML page (images inline), written atomically."""
    from benchmarks.outputs import write_atomic

    body = [f"<h1>{html.escape(heading)}</h1>", f"<p>{html.escape(intro)}</p>"]
    if sections:
        links = " · ".join(
            f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections
        )
        body.append(f"<p>{links}</p>")
    for section in sections:
        body.append(f'<section id="{_anchor(section.title)}"><h2>{html.escape(section.title)}</h2>')
        body.append(f'<p class="sub">{html.escape(section.subtitle)}</p>')
        if not section.cards:
            body.append('<p class="note">fires in none of the samples (in this region)</p>')
        body.append('<div class="cards">')
        for card in section.cards:
            example = card.example
            label = card.label or "unclassified"
            peak_token = _peak_word(card)
            body.append(f'<div class="card {label}">')
            if card.picture is not None:
                body.append(f'<img src="data:image/jpeg;base64,{_jpeg(card.picture)}" alt="">')
            body.append(
                f'<div class="meta"><b>{html.escape(example.sample_id)}</b> · {label} · peak '
                f"{example.peak:.3g} at {html.escape(peak_token)}</div>"
            )
            if card.note:
                body.append(f'<div class="note">{html.escape(card.note)}</div>')
            body.append(f'<div class="tokens">{_token_html(card, section.scale)}</div></div>')
        body.append("</div></section>")
    page = (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(heading)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    write_atomic(path, page)


def _peak_word(card: Card) -> str:
    """Where the peak is: `'token'`, `image` (a patch) or `row N` (tokens unknown)."""
    example = card.example
    if _in_image(example):
        return "image"
    if card.tokens:
        return repr(card.tokens[example.peak_row].strip() or card.tokens[example.peak_row])
    return f"row {example.peak_row}"


def _anchor(title: str) -> str:
    return title.replace("/", "-")


def _in_image(example: Example) -> bool:
    return any(a <= example.peak_row < b for a, b in example.regions.get("image", []))


def plot_grid(path: Path, title: str, sections: Sequence[FeatureSection], dpi: int) -> Path:
    """The sections' card pictures, one row per feature, as one PNG."""
    from benchmarks.stages.plot import pyplot

    plt = pyplot()
    columns = max([len(s.cards) for s in sections] + [1])
    width = max(1.9 * columns + 0.6, 4.8)  # at least the title's width (one or two cards)
    fig, axes = plt.subplots(
        len(sections), columns, figsize=(width, 2.1 * len(sections) + 0.5), squeeze=False
    )
    for row, section in enumerate(sections):
        for column in range(columns):
            ax = axes[row][column]
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(section.title, fontsize=9)
                if not section.cards:
                    ax.text(0.5, 0.5, "fires in no sample", ha="center", va="center",
                            fontsize=8, color="#555", transform=ax.transAxes)  # fmt: skip
            if column >= len(section.cards):
                ax.axis("off") if column else ax.set_frame_on(False)
                continue
            card = section.cards[column]
            if card.picture is not None:
                ax.imshow(np.asarray(card.picture))
            colour = {"GOOD": "#2a9d8f", "BAD": "#e76f51"}.get(card.label or "", "#555")
            where = _peak_word(card)
            text = f"{card.example.sample_id} {card.example.peak:.2g} {where}"
            ax.set_title(text.replace("$", r"\$"), fontsize=7,  # $...$ is matplotlib's math
                         color=colour)  # fmt: skip
    fig.suptitle(f"{title}\n(each image: sample, peak, where; green GOOD, red BAD)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

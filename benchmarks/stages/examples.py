"""`python -m benchmarks BENCH examples --out DIR`: the samples where features fire most.

For the features `analyze` selected (DIR/features.json), or those named by `--features
L2/F17,...`, finds each feature's `--top` samples in the feature store by peak activation over
`--region` and writes:

- `DIR/examples/index.html`: one self-contained page (open it in a browser): per feature its
  samples' images as the model saw them with each image patch tinted by the feature's activation,
  GOOD / BAD, the peak, and every token shaded by the activation (hover for the value; the peak
  outlined, response tokens underlined);
- `DIR/examples/examples.json`: the same as data (per feature: sample ids, labels, peak, peak row
  and token, and the activation of every image patch as a grid when there is one);
- `DIR/plots/feature_examples.png`: the first `--plot-features` features' top images.

Needs only the processor (not the model): the images are the items' files, the tokens the
prompt through the processor plus the generated ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from tqdm import tqdm

from benchmarks import outputs
from benchmarks.adapters import get_adapter, open_image
from benchmarks.example_pages import (
    Card,
    FeatureSection,
    card_picture,
    colour_scale,
    model_view,
    plot_grid,
    write_page,
)
from benchmarks.feature_examples import (
    Example,
    FeatureRef,
    ViewGrid,
    parse_feature_refs,
    patch_grid,
    sample_tokens,
    token_strings,
    top_examples,
)
from benchmarks.runs import capture_recipe
from benchmarks.stages import parse_stage
from benchmarks.stages.analyze import layer_numbers
from benchmarks.store import FeatureStore, StoreMeta
from vlm_sparsify.files import read_json
from vlm_sparsify.loading import processor_class, resolve_model

ExampleRegion = Literal["all", "image", "prompt", "response", "decision"]


@dataclass
class ExamplesConfig:
    """Top-activating samples of features: an HTML page, a JSON file and a PNG."""

    out: str
    """Benchmark output folder (after `capture` with coders; `analyze` for the default features)."""
    features: str = ""
    """Features as LAYER/FEATURE, comma-separated (e.g. L2/F17,L3/F5; layer numbers as
    features.json names them). Default: every feature analyze selected."""
    top: int = 6
    """Samples shown per feature."""
    region: ExampleRegion = "all"
    """Tokens whose activation ranks the samples (`decision`: as analyze's)."""
    plot_features: int = 8
    """Features (rows) in plots/feature_examples.png."""
    dpi: int = 100
    """Resolution of the PNG."""


def main(argv: list[str], benchmark: str) -> None:
    config = parse_stage(argv, benchmark, "examples", ExamplesConfig)
    examples(Path(config.out), benchmark, config)


def examples(out: Path, benchmark: str, config: ExamplesConfig) -> Path:
    if config.top < 1 or config.plot_features < 0:
        raise ValueError(
            f"--top {config.top} / --plot-features {config.plot_features}: give --top >= 1 and "
            "--plot-features >= 0"
        )
    if config.dpi < 1:  # matplotlib's error would come after every example is found
        raise ValueError(f"--dpi {config.dpi}: give a positive resolution, e.g. 100")
    store = FeatureStore(out / outputs.STORE)  # a missing store: capture without --coders
    layers = layer_numbers(store.meta.hookpoints)
    described = _selected(out, store.meta) if not config.features else {}
    refs = (
        parse_feature_refs(config.features, layers, store.meta.num_latents)
        if config.features
        else list(described)
    )
    if not refs:
        raise ValueError(f"{out / outputs.FEATURES} selects no feature: name some with --features")
    found = top_examples(store, refs, config.top, config.region)
    records = {str(r["id"]): r for r in outputs.read_append_log(out / outputs.RESPONSES)}
    labels = _labels(out)
    images, processor = _images_and_processor(out, benchmark)
    views: dict[str, _SampleView] = {}
    sections = []
    for ref in tqdm(refs, desc=f"{benchmark} examples"):
        title = f"L{layers[ref.source]}/F{ref.latent}"
        cards = found[ref]
        scale = colour_scale(cards)
        drawn = [
            _card(e, labels, records, images, processor, views, scale) for e in cards
        ]  # fmt: skip
        subtitle = _subtitle(store.meta.hookpoints[ref.source], described.get(ref), config)
        sections.append(FeatureSection(title, subtitle, drawn, scale))
    folder = out / "examples"
    folder.mkdir(exist_ok=True)
    heading = f"{benchmark}: where {len(sections)} features fire most"
    intro = (
        f"Top {config.top} samples per feature by peak activation over the '{config.region}' "
        "tokens; images as the model saw them, each patch tinted by the feature's activation "
        "(dimmed: silent; colour scale per feature, brightest = its highest activation shown); tokens "
        "shaded the same way (hover for the value; outlined: the peak; underlined: response)."
    )
    page = folder / "index.html"
    write_page(page, heading, intro, sections)
    outputs.write_json(folder / "examples.json", _document(sections, refs, layers, store, config))
    written = [page, folder / "examples.json"]
    if config.plot_features and sections:
        plots = out / "plots"
        plots.mkdir(exist_ok=True)
        shown = sections[: config.plot_features]
        written.append(plot_grid(plots / "feature_examples.png", heading, shown, config.dpi))
    empty = sum(1 for s in sections if not s.cards)
    silent = f" ({empty} firing in no sample of region {config.region})" if empty else ""
    print(
        f"examples: {len(sections)} feature{'s' * (len(sections) != 1)}{silent} -> "
        f"{', '.join(map(str, written))}"
    )
    return page


def _selected(out: Path, meta: StoreMeta) -> dict[FeatureRef, dict]:
    """features.json's selected features by reference, in its order."""
    path = out / outputs.FEATURES
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: run `analyze` first, or name --features")
    selected = {}
    for feature in read_json(path)["features"]:
        hookpoint, latent = feature["hookpoint"], int(feature["feature_idx"])
        if hookpoint not in meta.hookpoints or not 0 <= latent < meta.num_latents:
            raise ValueError(
                f"{path} names feature {latent} of {hookpoint}, which the feature store (its "
                f"coders: {meta.num_latents} latents) does not hold: run analyze again on this store"
            )
        selected[FeatureRef(meta.hookpoints.index(hookpoint), latent)] = feature
    return selected


def _labels(out: Path) -> dict[str, str]:
    path = out / outputs.CLASSIFICATION
    if not path.is_file():
        return {}
    result = read_json(path)
    return {str(v["id"]): label for label in ("GOOD", "BAD") for v in result.get(label, [])}


def _images_and_processor(out: Path, benchmark: str) -> tuple[dict[str, Path], Any]:
    """Each item's image file and the processor, as capture.json recorded the run."""
    info = outputs.capture_info(out, benchmark)
    model = resolve_model(info["settings"]["model"])
    recipe = capture_recipe(info)
    adapter = get_adapter(benchmark)
    items = adapter.load_items(adapter.Data(**info["data"]), recipe)
    processor = processor_class(recipe).from_pretrained(model)
    return {item.id: Path(item.image) for item in items}, processor


class _SampleView(NamedTuple):
    """What every card of a sample shares (a sample often tops several features)."""

    view: Any
    """The image as the model saw it (None: missing)."""
    tokens: list[str] | None
    shape: tuple[int, int] | ViewGrid | None
    """Its image tokens' grid (rows, columns), or one view's of a tiled image, when known."""
    notes: list[str]


def _card(
    example: Example,
    labels: dict[str, str],
    records: dict[str, dict],
    images: dict[str, Path],
    processor: Any,
    views: dict[str, _SampleView],
    scale: float,
) -> Card:
    sample = example.sample_id
    if sample not in views:
        views[sample] = _sample_view(example, records.get(sample), images.get(sample), processor)
    view, tokens, shape, notes = views[sample]
    picture = card_picture(view, example, scale, shape)
    peak, spans = example.peak_row, example.regions.get("image", [])
    in_image = any(a <= peak < b for a, b in spans)
    if isinstance(shape, ViewGrid) and shape.view and in_image and peak not in shape.token_rows():
        notes = [*notes, "its peak is at an image token of the view not drawn"]
    return Card(example, labels.get(sample), picture, tokens, "; ".join(notes), shape)


def _sample_view(
    example: Example, record: dict | None, image_path: Path | None, processor: Any
) -> _SampleView:
    notes = []
    image = view = None
    if image_path is None or not image_path.is_file():
        notes.append(f"image missing: {image_path}" if image_path else "not an item of this run")
    else:
        try:
            image = open_image(image_path)
            view = model_view(processor.image_processor, image) or image
        except (OSError, ValueError) as err:
            notes.append(f"image unreadable: {err}")
    tokens, shape = None, None
    spans = example.regions.get("image", [])
    if record is None:
        notes.append(f"no line in {outputs.RESPONSES}: tokens not shown")
    elif image is not None:
        image_tokens = spans[0][1] - spans[0][0] if len(spans) == 1 else 0
        rows = len(example.activations)
        ids, shape = sample_tokens(processor, record, image, rows, image_tokens)
        if ids is None:
            notes.append("tokens could not be rebuilt (processor changed since capture?)")
        else:
            image_rows = [r for a, b in spans for r in range(a, b)]
            tokens = token_strings(processor.tokenizer, ids, skip=image_rows)
        if isinstance(shape, ViewGrid):  # drawn on that view's frame of pixels, or not at all
            frame = model_view(
                processor.image_processor, image, shape.frame, shape.tiles, shape.box, shape.seen
            )
            view, shape = (view, None) if frame is None else (frame, shape)
    if tokens is not None and spans:
        if patch_grid(example.activations, example.regions, shape) is None:
            notes.append("image tokens form no single patch grid (tiles, crops): patches not drawn")
        elif isinstance(shape, ViewGrid) and shape.view:
            notes.append(shape.view)
    return _SampleView(view, tokens, shape, notes)


def _subtitle(hookpoint: str, feature: dict | None, config: ExamplesConfig) -> str:
    text = hookpoint
    if feature:
        text += (
            f" · selected for {feature.get('direction', '?').upper()} · fires in "
            f"{feature['good_freq']:.1%} of GOOD and {feature['bad_freq']:.1%} of BAD samples"
        )
    return text


def _document(
    sections: list[FeatureSection],
    refs: list[FeatureRef],
    layers: list[int],
    store: FeatureStore,
    config: ExamplesConfig,
) -> dict:
    features = []
    for ref, section in zip(refs, sections, strict=True):
        samples = []
        for card in section.cards:
            example = card.example
            grid = patch_grid(example.activations, example.regions, card.grid_shape)
            samples.append(
                {
                    "id": example.sample_id,
                    "label": card.label,
                    "peak": example.peak,
                    "peak_row": example.peak_row,
                    "peak_token": card.tokens[example.peak_row] if card.tokens else None,
                    "image_grid": None if grid is None else grid.round(4).tolist(),
                    "note": card.note or None,
                }
            )
        features.append(
            {
                "layer": layers[ref.source],
                "feature_idx": ref.latent,
                "hookpoint": store.meta.hookpoints[ref.source],
                "samples": samples,
            }
        )
    return {"region": config.region, "top": config.top, "features": features}

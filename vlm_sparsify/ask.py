"""`python -m vlm_sparsify.ask RUN --image IMG --question Q [--edit L:F:OP[=V] ...]`: one answer,
the features behind it, and what editing some of them does to it.

Generates the answer to one question about one image through the replacement model of RUN's
coders (error mode by default: the original model's answer, exactly), lists the features that
fire most at the last prompt token (the position that predicts the answer's first token), and,
with `--edit`, generates again with those features edited before they are decoded (so every
target layer of a CLT follows), on the tokens of `--region`.

An edit is `LAYER:FEATURE:OP[=VALUE]`: LAYER is the source's position among the run's hookpoints
(0, 1, ...; -1 the last, written `--edit=-1:...` so that it is not read as a flag) or its
hookpoint name, FEATURE a latent index, OP `scale`, `add`, `set` or `zero`
(`vlm_sparsify.interventions.Intervention`), e.g. `3:140:set=40` (clamp feature 140 of source 3
to 40), `0:12:scale=0.5`, `2:7:zero`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from simple_parsing import field

from vlm_sparsify.capture import CapturedSample
from vlm_sparsify.cli import parse_config, run_cli
from vlm_sparsify.coder_io import run_hookpoints
from vlm_sparsify.data import BadImageError, load_rgb
from vlm_sparsify.fidelity import load_run_model
from vlm_sparsify.generation import generate_batch
from vlm_sparsify.interventions import EDIT_REGIONS, Intervention, Op, check_op
from vlm_sparsify.replacement import ReplacementModel


@dataclass
class AskConfig:
    """One answer of the model, the features that fire for it, and the answer with some edited."""

    run: str = field(positional=True, metavar="RUN")
    """Run folder holding <hookpoint>/cfg.json (and the run's config.json)."""
    image: str = ""
    """The image file (required)."""
    question: str = ""
    """The question about it (required), put in the recipe's prompt format."""
    edit: list[str] = field(default_factory=list, metavar="L:F:OP[=V]", action="extend")
    """Feature edits, each LAYER:FEATURE:OP[=VALUE] (e.g. 3:140:set=40 0:12:zero; a repeated
    --edit adds its own); none: only the answer and its features."""
    region: str = "decision"
    """Tokens the edits apply to: decision (the last prompt token and every response token),
    response, prompt, image or all."""
    top: int = 10
    """Features listed at the last prompt token, strongest first (0: none)."""
    mode: Literal["error", "open-loop"] = "error"
    """Replacement mode: error (the original model exactly, edits on top) or open-loop (the
    coders' predictions in place of the MLPs; the original model's answer is given as well)."""
    model: str = ""
    """Model id or folder, or `default` (default: the run's model, else the embedded default)."""
    recipe: str = ""
    """Recipe name or TOML path (default: the run's, else matched from the model)."""
    max_new_tokens: int = 32
    """Longest answer."""
    device: str = ""
    """Device (default: cuda if available, else cpu)."""
    dtype: str = "auto"
    """Model dtype: auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16 or float16."""
    json: bool = False
    """Print one JSON object instead of text."""


@dataclass(frozen=True)
class Edit:
    """One parsed `--edit`."""

    text: str
    layer: int | str
    feature: int
    op: Op
    value: float | None

    def intervention(self, region: str) -> Intervention:
        return Intervention(self.op, self.feature, self.layer, region, self.value)


def parse_edit(text: str, hookpoints: list[str]) -> Edit:
    """`LAYER:FEATURE:OP[=VALUE]` checked against the run's hookpoints (a name may hold dots, never
    a colon, so the last two colons split it)."""
    usage = "give LAYER:FEATURE:OP[=VALUE], e.g. 3:140:set=40 or 0:12:zero"
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise ValueError(f"--edit {text!r}: {usage}")
    layer_text, feature_text, op_value = parts
    op, has_value, value_text = op_value.partition("=")
    try:
        check_op(op)
    except ValueError as err:
        raise ValueError(f"--edit {text!r}: {err}") from None
    if layer_text.removeprefix("-").isdigit():  # -1: the last source, as Python counts
        position = int(layer_text)
        if not -len(hookpoints) <= position < len(hookpoints):
            raise ValueError(
                f"--edit {text!r}: the run has {len(hookpoints)} sources (layers 0 to "
                f"{len(hookpoints) - 1}, or -1 to -{len(hookpoints)} from the last)"
            )
        layer: int | str = position % len(hookpoints)
    elif layer_text in hookpoints:
        layer = layer_text
    else:
        raise ValueError(
            f"--edit {text!r}: {layer_text!r} is neither a source position nor one of the run's "
            f"hookpoints ({hookpoints[0]} ...)"
        )
    if not feature_text.isdigit():
        raise ValueError(f"--edit {text!r}: the feature must be a latent index; {usage}")
    if (op == "zero") == bool(has_value):
        need = "takes no value" if op == "zero" else "needs a value, e.g. =2"
        raise ValueError(f"--edit {text!r}: {op} {need}")
    value = None
    if has_value:
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"--edit {text!r}: {value_text!r} is not a number") from None
        if not math.isfinite(value):  # refused here, not after the model loads and answers
            raise ValueError(f"--edit {text!r}: {value_text!r} is not a finite number")
    return Edit(text, layer, int(feature_text), cast(Op, op), value)


def top_features(sample: CapturedSample, hookpoints: list[str], count: int) -> list[dict[str, Any]]:
    """The `count` strongest features at the last prompt token (the last row before the
    response), across sources: source position, hookpoint, latent, activation."""
    prompt_rows = [stop for name in ("image", "prompt") for _, stop in sample.regions[name]]
    row = max(prompt_rows) - 1
    values = sample.values[row].float()  # [S, k]
    indices = sample.indices[row].long()
    order = values.flatten().argsort(descending=True, stable=True)
    listed: list[dict[str, Any]] = []
    for flat in order.tolist():
        source, slot = divmod(flat, values.shape[1])
        activation = float(values[source, slot])
        if activation <= 0 or len(listed) == count:  # zero slots of a TopK never fired
            break
        listed.append(
            {
                "layer": source,
                "hookpoint": hookpoints[source],
                "feature_idx": int(indices[source, slot]),
                "activation": activation,
            }
        )
    return listed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m vlm_sparsify.ask RUN ...` (AskConfig): print the answers and features; returns
    them as the JSON object `--json` prints."""
    args = parse_config(AskConfig, argv, "python -m vlm_sparsify.ask")
    if not args.image or not args.question:
        raise ValueError("give --image FILE and --question TEXT")
    if args.top < 0 or args.max_new_tokens < 1:
        raise ValueError("--top must be at least 0 and --max_new_tokens at least 1")
    if args.region not in EDIT_REGIONS:
        raise ValueError(f"--region {args.region!r}: use {', '.join(EDIT_REGIONS)}")
    run = Path(args.run)
    hookpoints = run_hookpoints(run)  # edits are checked before the model loads
    edits = [parse_edit(text, hookpoints) for text in args.edit]
    try:
        image = load_rgb(args.image)
    except BadImageError as err:
        raise BadImageError(f"--image {args.image}: {err}") from None
    loaded = load_run_model(run, args.model, args.recipe, args.dtype, args.device)
    replacement = ReplacementModel(loaded.model, loaded.coders, mode=args.mode)
    interventions = [edit.intervention(args.region) for edit in edits]
    for edit, intervention in zip(edits, interventions, strict=True):
        try:  # before any answer is generated
            replacement.check_interventions([intervention])
        except ValueError as err:
            raise ValueError(f"--edit {edit.text!r}: {err}") from None
    prompt = loaded.recipe.format_prompt(args.question, loaded.processor)

    def answer(**kwargs: Any) -> Any:
        [generation] = generate_batch(
            loaded.model, loaded.processor, [image], [prompt],
            max_new_tokens=args.max_new_tokens, **kwargs,
        )  # fmt: skip
        return generation

    result: dict[str, Any] = {"question": args.question, "image": args.image, "mode": args.mode}
    if args.mode == "open-loop":
        result["original"] = answer().response
    unedited = answer(replacement=replacement, capture=True, value_dtype=torch.float32)
    result["answer"] = unedited.response
    result["top_features"] = top_features(unedited.sample, hookpoints, args.top)
    if edits:
        result["edits"] = [edit.text for edit in edits]
        result["region"] = args.region
        result["edited"] = answer(replacement=replacement, interventions=interventions).response
    if args.json:
        print(json.dumps(result))
    else:
        _print_text(result)
    return result


def _print_text(result: dict[str, Any]) -> None:
    print(f"question: {result['question']}")
    if "original" in result:
        print(f"original model:           {result['original']!r}")
    label = "answer (error mode):" if result["mode"] == "error" else "replacement (open-loop):"
    print(f"{label:<26}{result['answer']!r}")
    if result["top_features"]:
        print("strongest features at the last prompt token (it predicts the first answer token):")
        print(f"  {'layer':>5}  {'feature':>7}  {'activation':>10}  hookpoint")
        for f in result["top_features"]:
            print(
                f"  {f['layer']:>5}  {f['feature_idx']:>7}  {f['activation']:>10.3f}  {f['hookpoint']}"
            )
    if "edited" in result:
        print(f"edits at {result['region']} tokens: {', '.join(result['edits'])}")
        print(f"{'edited answer:':<26}{result['edited']!r}")


if __name__ == "__main__":
    run_cli(main)

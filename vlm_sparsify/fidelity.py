"""`python -m vlm_sparsify.fidelity RUN`: how faithful is the replacement model?

On held-out examples of the run's dataset: teacher-forced top-1 next-token agreement between the
replacement model and the original, the KL divergence of the replacement's next-token
distribution from the original's, and the FVU of each target layer's prediction in the
replacement's own stream, each overall and per token region (image: the positions of image
tokens; answer: the positions that predict an answer token, from the last prompt token on;
prompt: the other text positions); and the share of free (greedy) generations that match the
original's exactly.

How the layers' errors add up in the residual stream, which per-layer FVU does not show:
`fvu_cumulative` at layer T is the FVU of the sum of the MLP outputs of layers 0..T (the errors
e_t = y_t - y_hat_t summed before squaring), and `error_coherence` at T is
||sum_t e_t||^2 / sum_t ||e_t||^2 over t <= T: 1 when the layers' errors are uncorrelated, above 1
when they point the same way (as a CLT's can: one feature writes to many layers), below 1 when
they cancel. `logit_fvu` looks at the same sum over all coder layers through the unembedding
(the direct path to the logits, before the final norm): the FVU of W_U sum_t y_t, i.e. how much
of what the MLPs write that the logits read the errors carry.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from simple_parsing import field
from torch import Tensor, nn
from tqdm import tqdm

from vlm_sparsify.cli import parse_config, run_cli
from vlm_sparsify.coder_io import (
    RUN_CONFIG_FILE,
    Coders,
    check_run_dir,
    load_coders,
    run_hookpoints,
)
from vlm_sparsify.data import (
    EASYVQA,
    TOKEN_KEYS,
    BadImageError,
    Example,
    collate,
    encode_example,
    image_token_id,
    open_examples,
)
from vlm_sparsify.files import read_json
from vlm_sparsify.loading import DEFAULT_MODEL, load_model_and_processor, resolve_model
from vlm_sparsify.positions import generate_method
from vlm_sparsify.recipe import Recipe, find_recipe, run_recipe
from vlm_sparsify.replacement import Decoder, Mode, ReplacementModel, has_submodule

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REGIONS = ("image", "prompt", "answer")


@dataclass
class FidelityConfig:
    """How faithfully a run's coders replace the model's MLPs, on held-out examples."""

    run: str = field(positional=True, metavar="RUN")
    """Run folder holding <hookpoint>/cfg.json (and the run's config.json)."""
    model: str = ""
    """Model id or folder, or `default` (default: the run's model, else the embedded default)."""
    dataset: str = ""
    """Dataset (default: the run's, else the recipe's)."""
    split: str = ""
    """Held-out split (default: `test` for easy-VQA, none for a local folder (its one split,
    the images the run trained on), else the recipe's split)."""
    recipe: str = ""
    """Recipe name or TOML path (default: the run's, else matched from the model)."""
    mode: Literal["open-loop", "error"] = "open-loop"
    """Replacement mode."""
    decoder: Decoder = "auto"
    """How a CLT decodes (docs/replacement.md): auto (hybrid on a CUDA GPU with triton, else
    fused), fused (a wide copy of its decoders, one call per source), triton (the same into the
    pending sums; CUDA), hybrid (triton in the prefill, fused at decoding steps) or per-target
    (no extra memory)."""
    limit: int = 64
    """Number of held-out examples."""
    batch_size: int = 8
    """Examples per forward and generate call."""
    max_new_tokens: int = 16
    """Length of the free generations compared for exact match."""
    ctx_len: int = 2048
    """Text tokens kept per example (image tokens come on top, as in training)."""
    device: str = ""
    """Device (default: cuda if available, else cpu)."""
    dtype: str = "auto"
    """Model dtype: auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16 or float16."""
    json: bool = False
    """Print one JSON object instead of a table."""
    plot: str = ""
    """Also draw the report as a PNG at this path (per-layer FVU by region, errors in the
    stream, agreement and KL by region)."""


class _LayerRecorder:
    """MLP inputs at each hookpoint of the replacement stream, and the true MLP outputs there.

    In open-loop mode the replaced MLPs do not run, so the true output is computed here from
    the class's own forward on the same input.
    """

    def __init__(self, model: nn.Module, hookpoints: Sequence[str]):
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self._handles = [
            model.get_submodule(h).register_forward_hook(self._record) for h in hookpoints
        ]

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        true_output = type(module).forward(module, *args)
        self.inputs.append(args[0].detach().flatten(0, -2))
        self.outputs.append(true_output.detach().flatten(0, -2))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def layer_predictions(coders: Coders, inputs: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
    """Each target's prediction from the recorded rows of every source reaching it: the MLP
    inputs for transcoders, the MLP outputs for SAEs."""
    dtype = next(coders.parameters()).dtype
    skip = getattr(coders, "skip", None)
    reads = inputs if getattr(coders, "transcode", True) else outputs
    predictions: list[Tensor | None] = [None] * len(reads)
    for p, x in enumerate(reads):
        x = x.to(dtype)
        top_acts, top_indices, _ = coders.encode(p, x)
        parts = coders.decode(p, top_acts, top_indices)
        skips = skip(p, x) if skip is not None else []
        for i, part in enumerate(parts):
            part = part + skips[i] if skips else part
            prev = predictions[p + i]
            predictions[p + i] = part if prev is None else prev + part
    return [pred for pred in predictions if pred is not None]


def left_pad(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Move each row's right padding to the left (for batched generation), in every per-token
    key (`data.TOKEN_KEYS`: Gemma 3's token_type_ids, Qwen3-VL's mm_token_type_ids too)."""
    mask = inputs["attention_mask"]
    length = mask.shape[1]
    shift = length - mask.sum(1, keepdim=True)
    order = (torch.arange(length) - shift) % length
    return {
        key: value.gather(1, order) if key in TOKEN_KEYS else value for key, value in inputs.items()
    }


class SpreadSum:
    """Sum of squared deviations of all rows added so far about their common mean (Chan et
    al.'s pairwise update), so that an FVU's denominator does not depend on the batching."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.value = 0.0

    def add(self, rows: Tensor) -> None:
        """Rows [N, d], summed in float64."""
        n = len(rows)
        if n == 0:
            return
        mean = rows.sum(0, dtype=torch.float64) / n
        spread = (rows - mean.to(rows.dtype)).pow_(2).sum(dtype=torch.float64).item()
        if self.mean is None:
            self.count, self.mean, self.value = n, mean, spread
            return
        total = self.count + n
        delta = mean - self.mean
        self.value += spread + delta.pow(2).sum().item() * self.count * n / total
        self.mean = self.mean + delta * (n / total)
        self.count = total


class FidelityTotals:
    """Running sums over token positions and generations."""

    def __init__(self, num_layers: int):
        self.agree = dict.fromkeys(("all", *REGIONS), 0)
        self.count = dict.fromkeys(("all", *REGIONS), 0)
        self.kl = dict.fromkeys(self.agree, 0.0)
        self.residual = {name: torch.zeros(num_layers, dtype=torch.float64) for name in self.agree}
        self.cum_residual = {name: torch.zeros_like(v) for name, v in self.residual.items()}
        self.variance = {name: [SpreadSum() for _ in range(num_layers)] for name in self.agree}
        self.cum_variance = {name: [SpreadSum() for _ in range(num_layers)] for name in self.agree}
        self.logit_residual = dict.fromkeys(self.agree, 0.0)
        self.logit_variance = {name: SpreadSum() for name in self.agree}
        self.matches = 0
        self.generations = 0

    def add_positions(self, base: Tensor, replaced: Tensor, regions: dict[str, Tensor]) -> None:
        """`base` / `replaced` logits [M, V] at the scored positions; region masks [M]."""
        agree = base.argmax(-1) == replaced.argmax(-1)
        log_p, log_q = base.float().log_softmax(-1), replaced.float().log_softmax(-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        for name, mask in (("all", torch.ones_like(agree)), *regions.items()):
            self.agree[name] += int(agree[mask].sum())
            self.count[name] += int(mask.sum())
            self.kl[name] += float(kl[mask].sum())

    def add_layers(
        self,
        targets: list[Tensor],
        predictions: list[Tensor],
        masks: dict[str, Tensor],
        unembedding: Tensor | None = None,
    ) -> None:
        """True MLP outputs and predictions [N, d] per target; row masks [N] for "all" and regions
        (each region's variance is about its own mean over every batch added: `SpreadSum`);
        `unembedding` [V, d] for `logit_fvu`."""
        sums: dict[str, tuple[Tensor, Tensor]] = {}  # per region: sum of y_t, of e_t so far
        for t, (y, y_hat) in enumerate(zip(targets, predictions, strict=True)):
            for name, mask in masks.items():
                y_region, y_hat_region = y[mask].double(), y_hat[mask].double()
                if len(y_region) == 0:
                    continue
                error = y_region - y_hat_region
                self.residual[name][t] += error.pow(2).sum().item()
                self.variance[name][t].add(y_region)
                if name in sums:
                    y_sum, error_sum = sums[name]
                    y_region, error = y_sum + y_region, error_sum + error
                sums[name] = (y_region, error)
                self.cum_residual[name][t] += error.pow(2).sum().item()
                self.cum_variance[name][t].add(y_region)
        if unembedding is None:
            return
        W_U = unembedding.float()  # [N, V] products in float32, their squares summed in float64
        for name, (y_sum, error_sum) in sums.items():
            error_logits = error_sum.float() @ W_U.T
            self.logit_residual[name] += error_logits.pow(2).sum(dtype=torch.float64).item()
            self.logit_variance[name].add(y_sum.float() @ W_U.T)

    def result(self, hookpoints: Sequence[str]) -> dict[str, Any]:
        def share(name: str) -> float | None:
            return self.agree[name] / self.count[name] if self.count[name] else None

        def ratio(numerators: Tensor, denominators: list[float]) -> dict[str, float | None]:
            pairs = zip(numerators.tolist(), denominators, strict=True)
            values = [a / b if b else None for a, b in pairs]
            return dict(zip(hookpoints, values, strict=True))

        def fvu(name: str) -> dict[str, float | None]:
            return ratio(self.residual[name], [s.value for s in self.variance[name]])

        def fvu_cumulative(name: str) -> dict[str, float | None]:
            return ratio(self.cum_residual[name], [s.value for s in self.cum_variance[name]])

        def coherence(name: str) -> dict[str, float | None]:
            return ratio(self.cum_residual[name], self.residual[name].cumsum(0).tolist())

        def logit_fvu(name: str) -> float | None:
            variance = self.logit_variance[name].value
            return self.logit_residual[name] / variance if variance else None

        return {
            "top1_agreement": share("all"),
            "top1_agreement_by_region": {name: share(name) for name in REGIONS},
            "kl": self.kl["all"] / max(self.count["all"], 1),
            "kl_by_region": {
                name: self.kl[name] / self.count[name] if self.count[name] else None
                for name in REGIONS
            },
            "fvu": fvu("all"),
            "fvu_by_region": {name: fvu(name) for name in REGIONS},
            "fvu_cumulative": fvu_cumulative("all"),
            "fvu_cumulative_by_region": {name: fvu_cumulative(name) for name in REGIONS},
            "error_coherence": coherence("all"),
            "error_coherence_by_region": {name: coherence(name) for name in REGIONS},
            "logit_fvu": logit_fvu("all"),
            "logit_fvu_by_region": {name: logit_fvu(name) for name in REGIONS},
            "exact_match": self.matches / self.generations if self.generations else None,
            "positions": self.count["all"],
            "generations": self.generations,
        }


@torch.no_grad()
def measure_fidelity(
    model: PreTrainedModel,
    processor: Any,
    recipe: Recipe,
    coders: Coders,
    examples: Sequence[Example],
    mode: Mode = "open-loop",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    ctx_len: int = 2048,
    decoder: Decoder = "auto",
) -> dict[str, Any]:
    """Fidelity of `ReplacementModel(model, coders, mode)` on `examples` (see module doc)."""
    replacement = ReplacementModel(model, coders, mode=mode, decoder=decoder)
    image_id = image_token_id(processor, recipe)
    pad_id = processor.tokenizer.pad_token_id or 0
    device = next(model.parameters()).device
    totals = FidelityTotals(len(coders.hookpoints))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    unembedding = head.weight.detach() if head is not None else None
    skipped: list[str] = []  # missing or unreadable images: skipped and counted, as in training
    progress = tqdm(total=len(examples), desc="fidelity", unit="example")
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        chunk, full = [], []
        for example in batch:
            try:
                full.append(encode_example(example, processor, recipe, ctx_len))
                chunk.append(example)
            except BadImageError:
                skipped.append(str(example.id))
        if not chunk:
            progress.update(len(batch))
            continue
        prompts = [
            encode_example(Example(e.id, e.image, e.question), processor, recipe, ctx_len)
            for e in chunk
        ]
        # model inputs, spread into calls (typed Any: a tensor could not fill `interventions`)
        inputs: dict[str, Any] = {k: v.to(device) for k, v in collate(full, pad_id).items()}
        base = model(**inputs).logits
        recorder = _LayerRecorder(model, coders.hookpoints)
        try:
            replaced = replacement(**inputs).logits
        finally:
            recorder.remove()
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        answer_start = torch.tensor([p["input_ids"].shape[1] for p in prompts], device=device)
        scored, regions, row_masks = region_masks(ids, mask, answer_start, image_id)
        totals.add_positions(base[:, :-1][scored], replaced[:, :-1][scored], regions)
        totals.add_layers(
            recorder.outputs,
            layer_predictions(coders, recorder.inputs, recorder.outputs),
            {name: rows.reshape(-1) for name, rows in row_masks.items()},
            unembedding,
        )
        generation_inputs: dict[str, Any] = {
            k: v.to(device) for k, v in left_pad(collate(prompts, pad_id)).items()
        }
        settings: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )
        base_tokens = generate_method(model)(**generation_inputs, **settings)
        replaced_tokens = replacement.generate(**generation_inputs, **settings)
        prompt_length = generation_inputs["input_ids"].shape[1]
        for a, b in zip(base_tokens, replaced_tokens, strict=True):
            same = torch.equal(
                _response(a, prompt_length, pad_id), _response(b, prompt_length, pad_id)
            )
            totals.matches += int(same)
        totals.generations += len(chunk)
        progress.update(len(batch))
    progress.close()
    if len(skipped) == len(examples):
        raise ValueError(
            f"no readable image among the {len(examples)} examples (first: {skipped[0]})"
        )
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(examples)} examples with missing or unreadable "
            f"images (first: {skipped[0]}), as training skips them",
            stacklevel=2,
        )
    return {
        "mode": mode,
        "decoder": replacement.decoder_in_use,
        "examples": len(examples) - len(skipped),
        "skipped_images": len(skipped),
        **totals.result(coders.hookpoints),
    }


def region_masks(
    ids: Tensor, mask: Tensor, answer_start: Tensor, image_id: int | None
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Where a right-padded batch `ids` `[B, T]` (`mask`: real tokens) is scored, and its regions.

    Position i predicts token i + 1, so a position is scored where both are real tokens
    (`scored` `[B, T - 1]`); `regions` (image / prompt / answer) are masks over the scored
    positions, flattened. A position is in the answer from the one that predicts the answer's
    first token (`answer_start - 1`, each row's prompt length less one) on; else image if its
    token is the image token, else prompt. `row_masks` `[B, T]` put every real token's MLP row
    in its position's region the same way, with "all" the real tokens (padding nowhere).
    """
    scored = mask[:, :-1] & mask[:, 1:]
    rows_image = ids == image_id
    rows_answer = torch.arange(ids.shape[1], device=ids.device) >= answer_start[:, None] - 1
    row_masks = {
        "all": mask,
        "image": mask & rows_image & ~rows_answer,
        "prompt": mask & ~rows_image & ~rows_answer,
        "answer": mask & rows_answer,
    }
    regions = {name: rows[:, :-1][scored] for name, rows in row_masks.items() if name != "all"}
    return scored, regions, row_masks


def _response(tokens: Tensor, prompt_length: int, pad_id: int) -> Tensor:
    response = tokens[prompt_length:]
    return response[response != pad_id]


def held_out_split(dataset: str, recipe: Recipe) -> str:
    """easy-VQA's `test`; none for a local folder (it has one split: the examples are the
    training images); else the recipe's split."""
    if dataset.lower() in EASYVQA:
        return "test"
    return "" if Path(dataset).is_dir() else recipe.dataset.split


def check_hookpoints(
    model: nn.Module,
    hookpoints: Sequence[str],
    model_id: str,
    fix: str = "pass the run's model with --model, or leave --model out",
) -> None:
    """Every coder hookpoint is a module of the model: coders of a model with other module paths
    (or fewer layers) are refused before any data loads; `fix` says what to do instead."""
    missing = [h for h in hookpoints if not has_submodule(model, h)]
    if missing:
        raise ValueError(
            f"the coders' hookpoints {missing[:3]}{' ...' if len(missing) > 3 else ''} are not "
            f"modules of {model_id}: these coders were trained on another model ({fix})"
        )


def check_mlp_hookpoints(
    hookpoints: Sequence[str],
    recipe: Recipe,
    why: str = "the replacement model replaces MLPs only: measure coders trained on MLP hookpoints",
) -> None:
    """The replacement model replaces MLPs: coders trained on other modules (`--hookpoints` of
    `self_attn`, which training accepts) are refused before any data loads (`why`: the reason
    the error gives)."""
    other = [h for h in hookpoints if not h.endswith(f".{recipe.mlp}")]
    if other:
        raise ValueError(
            f"the coders' hookpoints {other[:3]}{' ...' if len(other) > 3 else ''} are not MLPs "
            f"(recipe '{recipe.name}': [layers] mlp = '{recipe.mlp}'); {why}"
        )


def run_config(run: Path) -> dict[str, Any]:
    """The run's config.json ({} without one), after the checks of its folder and its coders'
    cfg.json files that fail before the model loads (minutes for a 7B model)."""
    check_run_dir(run)
    path = run / RUN_CONFIG_FILE
    config = read_json(path, keys=()) if path.is_file() else {}
    run_hookpoints(run)  # the save_dir above a run, a cfg.json missing or damaged
    return config


@dataclass
class RunModel:
    """A run's coders on the model they replace MLPs of (`load_run_model`)."""

    model: PreTrainedModel
    processor: Any
    recipe: Recipe
    coders: Coders
    model_id: str
    trained: dict[str, Any]
    """The run's config.json ({} without one)."""


def load_run_model(
    run: Path, model: str = "", recipe: str = "", dtype: str = "auto", device: str = ""
) -> RunModel:
    """The model (`model`, else the run's, else the embedded default), its processor and recipe
    (`recipe`, else the run's, else matched from the model) and the run's coders in eval mode on
    its device, after the checks that the coders replace MLPs of this model."""
    trained = run_config(run)
    model_id = resolve_model(model or trained.get("model") or DEFAULT_MODEL)
    if recipe:
        chosen = find_recipe(recipe, model_id=model_id)
    else:
        chosen = run_recipe(run, trained.get("recipe"), model_id)
    vlm, processor, chosen = load_model_and_processor(
        model_id, chosen, dtype=dtype, device=device or None
    )
    d_model = vlm.config.get_text_config().hidden_size
    coders = load_coders(run, device=next(vlm.parameters()).device, d_in=d_model).eval()
    check_hookpoints(vlm, coders.hookpoints, model_id)  # before any data is opened
    check_mlp_hookpoints(coders.hookpoints, chosen)
    return RunModel(vlm, processor, chosen, coders, model_id, trained)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m vlm_sparsify.fidelity RUN ...` (FidelityConfig): measure, print the table (or
    one JSON object), draw `--plot`; returns the measurements."""
    args = parse_config(FidelityConfig, argv, "python -m vlm_sparsify.fidelity")
    for name in ("limit", "batch_size", "max_new_tokens", "ctx_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.plot and not Path(args.plot).parent.is_dir():
        raise FileNotFoundError(f"--plot {args.plot}: no folder {Path(args.plot).parent}")
    run = Path(args.run)
    loaded = load_run_model(run, args.model, args.recipe, args.dtype, args.device)
    model, processor, recipe, coders = loaded.model, loaded.processor, loaded.recipe, loaded.coders
    model_id, trained = loaded.model_id, loaded.trained
    dataset = args.dataset or trained.get("dataset") or recipe.dataset.path
    split = args.split or held_out_split(dataset, recipe)
    examples = list(islice(open_examples(dataset, recipe, split=split or None), args.limit))
    if not examples:
        raise ValueError(f"no examples in {dataset} ({split})")
    result = measure_fidelity(
        model,
        processor,
        recipe,
        coders,
        examples,
        args.mode,
        args.batch_size,
        args.max_new_tokens,
        args.ctx_len,
        args.decoder,
    )
    result.update(run=str(run), model=model_id, dataset=dataset, split=split or "all")
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    if args.plot:
        from vlm_sparsify.fidelity_plot import plot_fidelity

        plot_fidelity(result, Path(args.plot))
    return result


def _print_table(result: dict[str, Any]) -> None:
    def pct(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:5.1f}%"

    print(f"{result['mode']} replacement of {result['model']} by {result['run']}")
    print(f"  {result['examples']} examples of {result['dataset']} ({result['split']})")
    print(f"  top-1 agreement   {pct(result['top1_agreement'])}")
    for name, value in result["top1_agreement_by_region"].items():
        print(f"    {name:<15} {pct(value)}")
    print(f"  KL (nats/token)   {result['kl']:.4f}")
    for name, value in result["kl_by_region"].items():
        print(f"    {name:<15} " + ("   n/a" if value is None else f"{value:.4f}"))
    print(f"  exact match       {pct(result['exact_match'])}")
    if result["logit_fvu"] is not None:
        by_region = "  ".join(
            f"{name} {value:.4f}" if value is not None else f"{name} n/a"
            for name, value in result["logit_fvu_by_region"].items()
        )
        print(
            f"  logit FVU (summed MLP errors through W_U)  {result['logit_fvu']:.4f}  {by_region}"
        )

    def number(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:6.3f}"

    width = max(len(hookpoint) for hookpoint in result["fvu"])
    columns = "  ".join(f"{name:>6}" for name in ("all", *REGIONS))
    for title, key in (
        ("FVU per layer", "fvu"),
        ("FVU of layers 0..T summed", "fvu_cumulative"),
        ("error coherence 0..T", "error_coherence"),
    ):
        print(f"  {title:<{width + 2}}  {columns}")
        for hookpoint, value in result[key].items():
            per_region = [result[f"{key}_by_region"][name][hookpoint] for name in REGIONS]
            print(
                f"    {hookpoint:<{width}}  {number(value)}  " + "  ".join(map(number, per_region))
            )


if __name__ == "__main__":
    run_cli(main)

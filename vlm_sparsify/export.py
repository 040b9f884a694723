"""Export a transcoder run to circuit-tracer's cross-layer transcoder format.

    python -m vlm_sparsify.export circuit-tracer RUN OUT_DIR [--calibration ACTS.safetensors]

circuit-tracer reads per layer i `W_enc_{i}.safetensors` (`W_enc_{i}` [d_tc, d_model], `b_enc_{i}`,
`b_dec_{i}`, `threshold_{i}`) and `W_dec_{i}.safetensors` (`W_dec_{i}` [d_tc, n_layers - i,
d_model]), plus `config.yaml`. It runs JumpReLU, f = a * (a > threshold) with a = W_enc x + b_enc,
not TopK, so each TopK feature gets a threshold fitted on calibration inputs (see
docs/checkpoints.md) and the fidelity lost is measured on held-out calibration tokens.
"""

import argparse
import warnings
from pathlib import Path
from typing import Literal

import torch
import transformers
import yaml
from safetensors.torch import save_file
from torch import Tensor

from vlm_sparsify.cli import run_cli
from vlm_sparsify.coder_io import (
    RUN_CONFIG_FILE,
    Coders,
    atomic_dir,
    load_coders,
    source_weights,
)
from vlm_sparsify.coder_set import fraction_of_variance_unexplained
from vlm_sparsify.files import load_safetensors, read_json
from vlm_sparsify.loading import resolve_model
from vlm_sparsify.recipe import run_recipe

ThresholdMethod = Literal["feature", "layer"]


def _pre_acts(coders: Coders, p: int, x: Tensor) -> Tensor:
    W_enc, b_enc, _, _ = source_weights(coders, p)
    return x.to(W_enc.dtype) @ W_enc.T + b_enc


@torch.no_grad()
def fit_thresholds(
    coders: Coders, inputs: list[Tensor], method: ThresholdMethod = "feature"
) -> list[Tensor]:
    """A JumpReLU threshold per feature of each source, imitating the coder on `inputs`.

    "feature": per feature, the threshold that best separates the tokens where the coder selects
    it (its own encoder: TopK, or sparsify's groupmax) from those where it does not (fewest
    disagreements); a feature never selected gets the layer value. "layer": one value per
    source, the median over tokens of the midpoint between the k-th and (k+1)-th largest
    pre-activations.
    """
    k = coders.cfg.k
    thresholds = []
    for p, x in enumerate(inputs):
        pre = _pre_acts(coders, p, x).float().relu()
        top = pre.topk(min(k + 1, pre.shape[-1]), dim=-1).values
        kth = top[:, k - 1]
        layer_value = ((kth + top[:, -1]) / 2).median().clamp_min(0)
        threshold = torch.full_like(pre[0], float(layer_value))
        if method == "feature":
            encoded = coders.encode(p, x)
            selected = torch.zeros(pre.shape, dtype=torch.bool, device=pre.device)
            selected.scatter_(1, encoded.top_indices, encoded.top_acts > 0)
            fitted, ever = _best_separation(pre, selected)
            threshold = torch.where(ever, fitted, threshold)
        elif method != "layer":
            raise ValueError(f"Unknown threshold method '{method}'; use 'feature' or 'layer'")
        thresholds.append(threshold)
    return thresholds


def _best_separation(values: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Per column, a cut c minimising #(positive, value <= c) + #(negative, value > c)."""
    order = values.sort(dim=0)
    pos = positive.gather(0, order.indices).float()
    # Cutting just above row r: positives at or below r plus negatives above r
    pos_below = pos.cumsum(0)
    neg_above = (1 - pos).flip(0).cumsum(0).flip(0) - (1 - pos)
    errors = pos_below + neg_above
    best = errors.argmin(0)
    # Cut halfway between the best row and the next one up (the last row: at its value)
    above = (best + 1).clamp_max(values.shape[0] - 1)
    cut = (order.values.gather(0, best[None])[0] + order.values.gather(0, above[None])[0]) / 2
    no_cut_errors = (1 - pos).sum(0)  # threshold below every value: all fire
    lowest = order.values[0] - 1e-6
    cut = torch.where(no_cut_errors <= errors.min(0).values, lowest, cut)
    return cut.clamp_min(0), positive.any(0)


@torch.no_grad()
def jumprelu_predictions(
    coders: Coders, thresholds: list[Tensor], inputs: list[Tensor]
) -> tuple[list[Tensor], list[float]]:
    """What circuit-tracer's CLT predicts per target (dense), and mean L0 per source."""
    n = len(inputs)
    predictions = [torch.zeros_like(inputs[t], dtype=torch.float32) for t in range(n)]
    l0 = []
    for p, x in enumerate(inputs):
        pre = _pre_acts(coders, p, x).float()
        features = pre * (pre > thresholds[p])
        l0.append(float((features > 0).sum(-1).float().mean()))
        _, _, W_decs, b_decs = source_weights(coders, p)
        for i, (W_dec, b_dec) in enumerate(zip(W_decs, b_decs, strict=True)):
            predictions[p + i] += features @ W_dec.float() + b_dec.float()
    return predictions, l0


@torch.no_grad()
def export_fidelity(
    coders: Coders,
    thresholds: list[Tensor],
    inputs: list[Tensor],
    outputs: list[Tensor] | None = None,
) -> dict[str, list[float]]:
    """Per target: FVU of the JumpReLU export against the TopK coder's prediction (and, with
    `outputs`, both against the true MLP outputs); per source: L0 of the export. Skip
    connections are left out of both predictions (circuit-tracer's CLT files carry none)."""
    encoded = [coders.encode(p, x) for p, x in enumerate(inputs)]
    topk = [coders.predict(encoded, t).float() for t in range(len(inputs))]
    jump, l0 = jumprelu_predictions(coders, thresholds, inputs)
    result = {
        "fvu_export_vs_topk": [
            float(fraction_of_variance_unexplained(a, b)) for a, b in zip(topk, jump, strict=True)
        ],
        "l0_export": l0,
    }
    if outputs is not None:
        for name, preds in (("fvu_topk", topk), ("fvu_export", jump)):
            result[name] = [
                float(fraction_of_variance_unexplained(y.float(), y_hat))
                for y, y_hat in zip(outputs, preds, strict=True)
            ]
    return result


def model_layers(hookpoints: list[str], n_layers: int) -> list[int]:
    """The model layer of each hookpoint (the last number in its path). circuit-tracer attaches
    file i to the model's layer i and needs one for each of the model's `n_layers` layers: the
    hookpoints must be distinct layers below `n_layers`, in order."""
    layers = [
        next((int(part) for part in reversed(h.split(".")) if part.isdigit()), None)
        for h in hookpoints
    ]
    known = [layer for layer in layers if layer is not None]
    if len(known) < len(layers) or known != sorted(set(known)) or known[-1] >= n_layers:
        raise ValueError(
            f"the run's hookpoints are layers {layers}, but circuit-tracer's CLT files attach to "
            f"the model's layers 0..{n_layers - 1} (its W_enc_i reads layer i): export a run of "
            f"one hookpoint per decoder layer, in layer order, of a model with {n_layers} layers "
            "(--n_layers)"
        )
    return known


def check_run_mlps(run: Path, hookpoints: list[str]) -> None:
    """circuit-tracer's transcoders read and write MLPs: a run of `self_attn` hookpoints (which
    training accepts) is refused, by its recipe's MLP name (a run without config.json: unchecked)."""
    from vlm_sparsify.fidelity import check_mlp_hookpoints

    if (run / RUN_CONFIG_FILE).is_file():
        config = read_json(run / RUN_CONFIG_FILE, keys=("model",))
        model_id = resolve_model(config["model"])
        check_mlp_hookpoints(
            hookpoints,
            run_recipe(run, config.get("recipe"), model_id),
            "circuit-tracer's transcoders read and write MLPs: export coders trained on MLP "
            "hookpoints",
        )


def run_model_layers(run: Path) -> int:
    """The decoder layer count of the model the run's `config.json` names (its config only)."""
    if not (run / RUN_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{run} has no config.json naming its model, whose every decoder layer circuit-tracer's "
            "CLT must cover: pass --n_layers N (the model's decoder layers)"
        )
    config = read_json(run / RUN_CONFIG_FILE, keys=("model",))
    model_id = resolve_model(config["model"])
    try:
        model_config = transformers.AutoConfig.from_pretrained(
            model_id, revision=config.get("revision")
        )
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise OSError(
            f"could not read the config of the run's model '{model_id}' for its layer count "
            f"({reason}); pass --n_layers N (the model's decoder layers)"
        ) from None
    return int(model_config.get_text_config().num_hidden_layers)


def _check_out_dir(out_dir: Path) -> None:
    """The export replaces OUT_DIR whole: refuse a file, or a folder that holds anything but an
    earlier export (the run itself, the save_dir, a folder of other files), whose contents would
    go."""
    if not out_dir.exists() or out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    config = out_dir / "config.yaml"
    earlier = config.is_file() and "model_kind: cross_layer_transcoder" in config.read_text()
    if not earlier:
        raise ValueError(
            f"{out_dir} exists and is not a circuit-tracer export (no config.yaml of a "
            "cross_layer_transcoder); the export replaces OUT_DIR whole: pass a new or empty folder"
        )


@torch.no_grad()
def export_circuit_tracer(
    coders: Coders,
    out_dir: str | Path,
    thresholds: list[Tensor],
    *,
    n_layers: int | None = None,
    feature_input_hook: str = "mlp.hook_in",
    feature_output_hook: str = "hook_mlp_out",
    model_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write circuit-tracer's CLT files for every one of the model's `n_layers` decoder layers
    (default: one per hookpoint) into `out_dir`, new, empty or an earlier export
    (`_check_out_dir`), replaced whole. Decoders are zero beyond a source's reach; a layer the
    run holds no coder for gets zero weights (no feature ever fires), so circuit-tracer's error
    node there carries its whole MLP output."""
    out_dir = Path(out_dir)
    n_layers = len(coders.hookpoints) if n_layers is None else n_layers
    layers = model_layers(coders.hookpoints, n_layers)
    _check_out_dir(out_dir)
    W_enc, b_enc = source_weights(coders, 0)[:2]
    zero_encoder = {"W_enc": torch.zeros_like(W_enc), "b_enc": torch.zeros_like(b_enc)}
    empty = zero_encoder | {"threshold": torch.zeros_like(b_enc)}
    encoders = {layer: dict(empty) for layer in range(n_layers)}
    decoders = {layer: torch.zeros(*W_enc.shape[:1], n_layers - layer, W_enc.shape[1], dtype=dtype)
                for layer in range(n_layers)}  # fmt: skip
    b_dec = [torch.zeros(W_enc.shape[1], dtype=torch.float32) for _ in range(n_layers)]
    for p, source_layer in enumerate(layers):
        W_enc, b_enc, W_decs, b_decs = source_weights(coders, p)
        encoders[source_layer] = {"W_enc": W_enc, "b_enc": b_enc, "threshold": thresholds[p]}
        for i, (W, b) in enumerate(zip(W_decs, b_decs, strict=True)):
            target_layer = layers[p + i]
            decoders[source_layer][:, target_layer - source_layer] = W.detach().to("cpu", dtype)
            # circuit-tracer has one output bias per layer: the sum over sources reaching it
            b_dec[target_layer] += b.detach().to("cpu", torch.float32)
    with atomic_dir(out_dir) as tmp:
        for layer in range(n_layers):
            enc = {f"{name}_{layer}": v for name, v in encoders[layer].items()}
            enc[f"b_dec_{layer}"] = b_dec[layer]
            save_file(
                {k: v.detach().to("cpu", dtype).contiguous() for k, v in enc.items()},
                str(tmp / f"W_enc_{layer}.safetensors"),
            )
            save_file({f"W_dec_{layer}": decoders[layer]}, str(tmp / f"W_dec_{layer}.safetensors"))
        config = {
            "model_kind": "cross_layer_transcoder",
            "feature_input_hook": feature_input_hook,
            "feature_output_hook": feature_output_hook,
            "hookpoints": coders.hookpoints,
            "layers": layers,
            "activation_function": "jump_relu",
        }
        if model_name:
            config["model_name"] = model_name
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out_dir


def _load_calibration(
    path: Path, hookpoints: list[str], d_in: int
) -> tuple[list[Tensor], list[Tensor] | None]:
    """The calibration file's MLP inputs (and outputs) per hookpoint: [N, d_in] each, the same
    tokens (N >= 2, halved into fit and held-out) at every hookpoint."""
    tensors = load_safetensors(path)
    missing = [h for h in hookpoints if f"inputs.{h}" not in tensors]
    if missing:
        raise ValueError(
            f"{path} lacks inputs.<hookpoint> for {missing}; it needs one [N, d] tensor of MLP "
            "inputs per hookpoint (and optionally outputs.<hookpoint>)"
        )
    has_outputs = all(f"outputs.{h}" in tensors for h in hookpoints)
    kinds = ("inputs", "outputs") if has_outputs else ("inputs",)
    shapes = {
        f"{kind}.{h}": tuple(tensors[f"{kind}.{h}"].shape) for kind in kinds for h in hookpoints
    }
    first = shapes[f"inputs.{hookpoints[0]}"]
    n = first[0] if first else 0
    wrong = {name: list(shape) for name, shape in shapes.items() if shape != (n, d_in)}
    if n < 2 or wrong:
        raise ValueError(
            f"{path}: {wrong or {f'inputs.{hookpoints[0]}': list(first)}} is not [N, {d_in}]; "
            "every tensor must be the coders' width, with one N >= 2 (the same tokens at every "
            "hookpoint): activations of the model these coders were trained on"
        )
    inputs = [tensors[f"inputs.{h}"].float() for h in hookpoints]
    outputs = [tensors[f"outputs.{h}"].float() for h in hookpoints] if has_outputs else None
    return inputs, outputs


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_sparsify.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=["circuit-tracer"])
    parser.add_argument("run", type=Path, help="run folder with <hookpoint>/cfg.json")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="safetensors with inputs.<hookpoint> [N, d] (MLP inputs) and "
        "optionally outputs.<hookpoint>; the first half fits thresholds, the "
        "second half measures fidelity (default: activations of the run's own model on "
        "--calibration_examples examples of its dataset)",
    )
    parser.add_argument(
        "--calibration_examples",
        type=int,
        default=None,
        help="examples of the run's own dataset whose activations calibrate (default: 64; "
        "not with --calibration)",
    )
    parser.add_argument(
        "--threshold",
        choices=["feature", "layer"],
        default="feature",
        help="JumpReLU threshold per feature (default) or one per layer",
    )
    parser.add_argument(
        "--n_layers",
        type=int,
        default=None,
        help="the model's decoder layers, one circuit-tracer file each (default: read from the "
        "config of the model the run's config.json names); layers without a coder get "
        "features that never fire",
    )
    parser.add_argument("--feature_input_hook", default="mlp.hook_in")
    parser.add_argument("--feature_output_hook", default="hook_mlp_out")
    parser.add_argument("--model_name", default=None)
    args = parser.parse_args(argv)
    if args.calibration is not None and args.calibration_examples is not None:
        raise ValueError(
            "--calibration_examples counts examples of the run's own data, and --calibration "
            "FILE gives the activations instead: pass only one"
        )
    examples = 64 if args.calibration_examples is None else args.calibration_examples
    if examples < 1:
        raise ValueError(f"--calibration_examples must be at least 1, got {examples}")
    if args.n_layers is not None and args.n_layers < 1:
        raise ValueError(f"--n_layers must be at least 1, got {args.n_layers}")

    _check_out_dir(args.out_dir)  # before calibrating: that runs the model
    coders = load_coders(args.run)
    for p in range(len(coders.hookpoints)):
        source_weights(coders, p)  # refuses what circuit-tracer cannot hold, before calibrating
    check_run_mlps(args.run, coders.hookpoints)
    n_layers = args.n_layers if args.n_layers is not None else run_model_layers(args.run)
    model_layers(coders.hookpoints, n_layers)
    if coders.cfg.skip_connection:
        warnings.warn(
            "the run's skip connections (W_skip) are not exported: circuit-tracer's CLT files "
            "hold none; every figure printed below leaves them out, the TopK coder's "
            "(fvu_topk) as well as the export's",
            stacklevel=1,
        )
    outputs: list[Tensor] | None
    if args.calibration is None:
        from vlm_sparsify.run_activations import run_activations

        inputs, outputs = run_activations(args.run, coders.hookpoints, num_examples=examples)
    else:
        d_in = source_weights(coders, 0)[0].shape[1]
        inputs, outputs = _load_calibration(args.calibration, coders.hookpoints, d_in)
    half = inputs[0].shape[0] // 2
    thresholds = fit_thresholds(coders, [x[:half] for x in inputs], args.threshold)
    export_circuit_tracer(
        coders,
        args.out_dir,
        thresholds,
        n_layers=n_layers,
        feature_input_hook=args.feature_input_hook,
        feature_output_hook=args.feature_output_hook,
        model_name=args.model_name,
    )
    held_out = None if outputs is None else [y[half:] for y in outputs]
    fidelity = export_fidelity(coders, thresholds, [x[half:] for x in inputs], held_out)
    print(
        f"wrote {args.out_dir}: circuit-tracer CLT, {n_layers} layers ({len(coders.hookpoints)} "
        f"with features), JumpReLU thresholds per {args.threshold}; per hookpoint of the run, "
        f"on {inputs[0].shape[0] - half} held-out calibration tokens:"
    )
    for name, values in fidelity.items():
        print(f"{name}: " + " ".join(f"{v:.4f}" for v in values))
    return fidelity


if __name__ == "__main__":
    run_cli(main)

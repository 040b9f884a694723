"""`python -m vlm_sparsify.fidelity` on a tiny random LLaVA with random coders, on easy-VQA test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from sparsify import SparseCoderConfig

from vlm_sparsify.coder_io import save_coders
from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.fidelity import FidelityTotals, left_pad, main, region_masks
from vlm_sparsify.hookpoints import mlp_hookpoints
from vlm_sparsify.per_layer import PerLayerCoders


@pytest.fixture(scope="module")
def clt_run(tmp_path_factory, tiny_llava, tiny_llava_dir, llava_recipe) -> Path:
    model, _ = tiny_llava
    hookpoints = mlp_hookpoints(model, llava_recipe)
    d_in = model.config.get_text_config().hidden_size
    cfg = SparseCoderConfig(num_latents=4 * d_in, k=4, transcode=True)
    clt = CrossLayerTranscoder(hookpoints, d_in, cfg, cross_layer=len(hookpoints))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    run = tmp_path_factory.mktemp("runs") / "clt"
    save_coders(clt, run, config={"model": str(tiny_llava_dir), "dataset": "easyvqa"})
    return run


def run_fidelity(run: Path, mode: str, capsys, *extra: str) -> dict:
    main([str(run), "--mode", mode, "--limit", "3", "--batch_size", "2", "--max_new_tokens", "3",
          "--dtype", "float32", "--json", *extra])  # fmt: skip
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_error_mode_is_faithful(clt_run: Path, capsys, tmp_path: Path) -> None:
    result = run_fidelity(clt_run, "error", capsys, "--plot", str(tmp_path / "fidelity.png"))
    assert (tmp_path / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    assert result["top1_agreement"] == 1.0
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["exact_match"] == 1.0
    assert result["examples"] == 3 and result["generations"] == 3
    assert result["decoder"] == "fused"  # the default, auto, on a CPU
    assert set(result["top1_agreement_by_region"]) == {"image", "prompt", "answer"}
    assert all(value is not None for value in result["top1_agreement_by_region"].values())
    assert all(fvu > 0 for fvu in result["fvu"].values())
    assert all(kl == pytest.approx(0.0, abs=1e-6) for kl in result["kl_by_region"].values())
    assert set(result["fvu_by_region"]) == {"image", "prompt", "answer"}
    for by_layer in result["fvu_by_region"].values():
        assert list(by_layer) == list(result["fvu"]) and all(v > 0 for v in by_layer.values())
    assert list(result["fvu_cumulative"]) == list(result["fvu"])
    assert result["logit_fvu"] > 0
    assert all(v > 0 for v in result["error_coherence"].values())


def test_a_progress_bar_counts_the_examples(clt_run: Path, capsys) -> None:
    # fidelity ran silently (32 s for 1,024 examples on the tiny model, far longer at 7B size)
    main([str(clt_run), "--mode", "error", "--limit", "3", "--batch_size", "2",
          "--max_new_tokens", "2", "--dtype", "float32", "--json"])  # fmt: skip
    assert re.search(r"fidelity: 100%.* 3/3 ", capsys.readouterr().err)


def test_fvu_by_region_is_each_region_s_own_fraction() -> None:
    y = torch.tensor([[1.0], [3.0], [10.0], [14.0], [0.0]])
    y_hat = torch.tensor([[2.0], [3.0], [12.0], [14.0], [5.0]])
    every = torch.tensor([True, True, True, True, False])  # row 4 is padding
    masks = {
        "all": every,
        "image": torch.tensor([True, True, False, False, False]),
        "prompt": torch.tensor([False, False, True, True, False]),
        "answer": torch.zeros(5, dtype=torch.bool),
    }
    totals = FidelityTotals(num_layers=1)
    totals.add_layers([y], [y_hat], masks)
    result = totals.result(["mlp"])
    # all: residual 1 + 4 = 5 over variance about 7: 36 + 16 + 9 + 49 = 110
    assert result["fvu"]["mlp"] == pytest.approx(5 / 110)
    assert result["fvu_by_region"]["image"]["mlp"] == pytest.approx(1 / 2)  # about 2: 1 + 1
    assert result["fvu_by_region"]["prompt"]["mlp"] == pytest.approx(4 / 8)  # about 12: 4 + 4
    assert result["fvu_by_region"]["answer"]["mlp"] is None  # no rows


def test_cumulative_fvu_and_coherence_sum_the_layers_errors_before_squaring() -> None:
    # two rows of d=2, two layers; layer 1's error repeats layer 0's (coherent) on row 0 and
    # reverses it (cancelling) on row 1
    y0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y1 = torch.tensor([[3.0, 1.0], [1.0, 0.0]])
    e0 = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    e1 = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    rows = torch.ones(2, dtype=torch.bool)
    none = torch.zeros(2, dtype=torch.bool)
    masks = {"all": rows, "image": torch.tensor([True, False]), "prompt": none, "answer": none}
    totals = FidelityTotals(num_layers=2)
    totals.add_layers([y0, y1], [y0 - e0, y1 - e1], masks)
    result = totals.result(["l0", "l1"])

    def variance(y: torch.Tensor) -> float:
        return float((y - y.mean(0)).pow(2).sum())

    assert result["fvu_cumulative"]["l0"] == pytest.approx(result["fvu"]["l0"])
    assert result["fvu_cumulative"]["l1"] == pytest.approx(1.0 / variance(y0 + y1))
    assert result["error_coherence"]["l0"] == pytest.approx(1.0)
    # ||e0 + e1||^2 = ||[[1, 0], [0, 0]]||^2 = 1 against ||e0||^2 + ||e1||^2 = 1.25 + 1.25
    assert result["error_coherence"]["l1"] == pytest.approx(1.0 / 2.5)
    # the image row alone: errors aligned, 1 against 0.25 + 0.25
    assert result["error_coherence_by_region"]["image"]["l1"] == pytest.approx(2.0)
    assert result["fvu_cumulative_by_region"]["answer"]["l1"] is None


def test_logit_fvu_reads_the_summed_errors_through_the_unembedding() -> None:
    # d = 2, vocabulary of 3 that reads only the first coordinate (twice) and the sum
    unembedding = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    y0 = torch.tensor([[1.0, 5.0], [3.0, -5.0]])
    y1 = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    e0 = torch.tensor([[0.0, 3.0], [0.0, -3.0]])  # errors along the second coordinate only ...
    e1 = torch.tensor([[0.5, 0.0], [0.0, 0.0]])  # ... except this one
    rows = torch.ones(2, dtype=torch.bool)
    none = torch.zeros(2, dtype=torch.bool)
    masks = {"all": rows, "image": none, "prompt": none, "answer": none}
    totals = FidelityTotals(num_layers=2)
    totals.add_layers([y0, y1], [y0 - e0, y1 - e1], masks, unembedding)
    result = totals.result(["l0", "l1"])
    logits_error = (e0 + e1) @ unembedding.T
    y = y0 + y1
    logits_centred = (y - y.mean(0)) @ unembedding.T
    expected = float(logits_error.pow(2).sum() / logits_centred.pow(2).sum())
    assert result["logit_fvu"] == pytest.approx(expected)
    assert result["logit_fvu_by_region"]["answer"] is None
    # without an unembedding there is no logit figure
    plain = FidelityTotals(num_layers=2)
    plain.add_layers([y0, y1], [y0 - e0, y1 - e1], masks)
    assert plain.result(["l0", "l1"])["logit_fvu"] is None


def test_fvus_do_not_depend_on_how_the_rows_were_batched() -> None:
    # the variance is about the mean of every row measured, not of each batch: with a mean that
    # moves between batches (one image per example), per-batch centring shrank it
    generator = torch.Generator().manual_seed(0)
    ys = [torch.randn(12, 3, generator=generator) + torch.arange(12.0)[:, None] for _ in "ab"]
    y_hats = [y + 0.5 * torch.randn(12, 3, generator=generator) for y in ys]
    image = torch.arange(12) % 3 == 0
    unembedding = torch.randn(5, 3, generator=generator)

    def measure(batches: list[slice]) -> dict:
        totals = FidelityTotals(num_layers=2)
        for rows in batches:
            masks = {
                "all": torch.ones(12, dtype=torch.bool)[rows],
                "image": image[rows],
                "prompt": ~image[rows],
                "answer": torch.zeros(12, dtype=torch.bool)[rows],
            }
            totals.add_layers([y[rows] for y in ys], [y[rows] for y in y_hats], masks, unembedding)
        return totals.result(["l0", "l1"])

    whole = measure([slice(0, 12)])
    split = measure([slice(0, 1), slice(1, 5), slice(5, 12)])
    y = ys[0] + ys[1]
    e = y - y_hats[0] - y_hats[1]
    assert whole["fvu_cumulative"]["l1"] == pytest.approx(
        float(e.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    )
    for key in ("fvu", "fvu_cumulative", "error_coherence"):
        assert split[key] == pytest.approx(whole[key])
        for region in ("image", "prompt"):
            assert split[f"{key}_by_region"][region] == pytest.approx(
                whole[f"{key}_by_region"][region]
            )
    assert split["logit_fvu"] == pytest.approx(whole["logit_fvu"])
    assert split["logit_fvu_by_region"]["image"] == pytest.approx(
        whole["logit_fvu_by_region"]["image"]
    )


def test_kl_by_region_is_the_mean_over_each_region_s_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    base, replaced = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    image = torch.tensor([True, True, True, False, False, False])
    answer = torch.tensor([False, False, False, False, True, True])
    regions = {"image": image, "prompt": ~image & ~answer, "answer": answer}
    totals = FidelityTotals(num_layers=1)
    totals.add_positions(base, replaced, regions)
    result = totals.result(["mlp"])
    p, q = base.softmax(-1), replaced.softmax(-1)
    per_position = (p * (p.log() - q.log())).sum(-1)
    assert result["kl"] == pytest.approx(float(per_position.mean()), rel=1e-5)
    for name, mask in regions.items():
        expected = float(per_position[mask].mean())
        assert result["kl_by_region"][name] == pytest.approx(expected, rel=1e-5)


def test_open_loop_with_random_coders_is_not(clt_run: Path, capsys) -> None:
    result = run_fidelity(clt_run, "open-loop", capsys)
    # the fused decode equals decoding target by target (the biases summed in another order)
    per_target = run_fidelity(clt_run, "open-loop", capsys, "--decoder", "per-target")
    assert per_target["top1_agreement"] == result["top1_agreement"]
    assert per_target["kl"] == pytest.approx(result["kl"], rel=1e-5)
    assert result["kl"] > 1e-3
    assert 0.0 <= result["top1_agreement"] < 1.0
    # the replaced MLPs do not run in open loop: FVU still compares with their true outputs
    assert all(fvu > 1e-3 for fvu in result["fvu"].values())


def test_layer_fvu_is_against_the_true_mlp_on_the_replacement_stream(
    clt_run: Path, tiny_llava, llava_recipe
) -> None:
    from PIL import Image

    from vlm_sparsify.coder_io import load_coders
    from vlm_sparsify.fidelity import _LayerRecorder, layer_predictions
    from vlm_sparsify.replacement import ReplacementModel

    model, processor = tiny_llava
    coders = load_coders(clt_run)
    image = Image.new("RGB", (28, 28), (200, 30, 30))
    prompt = llava_recipe.format_prompt("is there a red circle?")
    inputs = dict(processor(images=[image], text=[prompt], return_tensors="pt"))
    recorder = _LayerRecorder(model, coders.hookpoints)
    try:
        ReplacementModel(model, coders, mode="open-loop")(**inputs)
    finally:
        recorder.remove()
    mlp = model.get_submodule(coders.hookpoints[1])
    torch.testing.assert_close(recorder.outputs[1], mlp(recorder.inputs[1]))
    predictions = layer_predictions(coders, recorder.inputs, recorder.outputs)
    assert not torch.allclose(predictions[1], recorder.outputs[1])


def test_an_sae_s_layer_prediction_reconstructs_the_mlp_output() -> None:
    from sparsify import SparseCoderConfig

    from vlm_sparsify.fidelity import layer_predictions
    from vlm_sparsify.per_layer import PerLayerCoders

    torch.manual_seed(0)
    cfg = SparseCoderConfig(num_latents=32, k=4, transcode=False)
    saes = PerLayerCoders(["a", "b"], 8, cfg)
    inputs, outputs = [torch.randn(5, 8) for _ in "ab"], [torch.randn(5, 8) for _ in "ab"]
    predictions = layer_predictions(saes, inputs, outputs)
    for coder, y, prediction in zip(saes.coders, outputs, predictions, strict=True):
        torch.testing.assert_close(prediction, coder(y).sae_out)


def test_left_pad_moves_padding_to_the_left() -> None:
    inputs = {
        "input_ids": torch.tensor([[7, 8, 0, 0], [1, 2, 3, 4]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        "pixel_values": torch.zeros(2, 3),
    }
    padded = left_pad(inputs)
    assert padded["input_ids"].tolist() == [[0, 0, 7, 8], [1, 2, 3, 4]]
    assert padded["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_bad_input_ends_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from vlm_sparsify.cli import run_cli

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{truncated")
    for args, message in (
        ([str(tmp_path), "--limit", "0"], "error: --limit must be at least 1, got 0"),
        # 0 measured the image positions alone (no prompt, no answer), as if that were the run
        ([str(tmp_path), "--ctx_len", "0"], "error: --ctx_len must be at least 1, got 0"),
        ([str(tmp_path), "--plot", str(tmp_path / "no" / "x.png")], "error: --plot"),
        ([str(tmp_path / "run")], f"error: {tmp_path / 'run' / 'config.json'} is not valid JSON"),
    ):
        with pytest.raises(SystemExit) as exit_:  # `python -m vlm_sparsify.fidelity ARGS`
            run_cli(lambda args=args: main(args))
        assert str(exit_.value.code).startswith(message)
    # the whole command: Python prints the line and exits with status 1
    command = [sys.executable, "-m", "vlm_sparsify.fidelity", str(tmp_path / "nothing")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: no checkpoint folder")


def test_a_run_on_an_image_folder_is_measured_on_that_folder(clt_run: Path, capsys, tmp_path):
    from tests.conftest import make_image

    rows = []
    for i in range(3):
        make_image(tmp_path / f"{i}.png", seed=i)
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a red circle"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    # a folder has one split: no --split is made up for it (the recipe's was, and refused)
    result = run_fidelity(clt_run, "error", capsys, "--dataset", str(tmp_path))
    assert result["examples"] == 3 and result["split"] == "all"
    assert result["top1_agreement"] == 1.0


def test_a_missing_image_is_skipped_and_counted_as_training_does(clt_run: Path, capsys, tmp_path):
    # training skips (and counts) a folder's missing or unreadable images; fidelity on that
    # run's folder stopped at the first one: "error: [Errno 2] No such file or directory"
    from tests.conftest import make_image

    rows = []
    for i in range(3):
        make_image(tmp_path / f"{i}.png", seed=i)
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a red circle"}))
    rows.insert(1, json.dumps({"file_name": "gone.png", "text": "a blue square"}))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.append(json.dumps({"file_name": "broken.png", "text": "a green circle"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 examples .*missing or unreadable.*gone"):
        result = run_fidelity(clt_run, "error", capsys, "--dataset", str(tmp_path), "--limit", "5")
    assert result["examples"] == 3 and result["skipped_images"] == 2
    assert result["top1_agreement"] == 1.0
    for name in ("0", "1", "2"):
        (tmp_path / f"{name}.png").unlink()
    with pytest.raises(ValueError, match="no readable image among the 5 examples"):
        run_fidelity(clt_run, "error", capsys, "--dataset", str(tmp_path), "--limit", "5")


def test_coders_of_another_model_are_refused_before_any_data_loads(clt_run: Path, tmp_path):
    from vlm_sparsify.coder_io import CheckpointError

    # `default` is the embedded model (128 wide); the run's coders read 32-wide activations
    with pytest.raises(CheckpointError, match="these coders were trained on another model"):
        main([str(clt_run), "--model", "default", "--dataset", str(tmp_path / "never-opened")])
    # same width, a layer the model does not have
    d_in = 32
    cfg = SparseCoderConfig(num_latents=4 * d_in, k=4, transcode=True)
    clt = CrossLayerTranscoder(["model.language_model.layers.7.mlp"], d_in, cfg, cross_layer=1)
    run = tmp_path / "other"
    model_id = json.loads((clt_run / "config.json").read_text())["model"]
    save_coders(clt, run, config={"model": model_id})
    message = r"\['model.language_model.layers.7.mlp'\] are not modules of .*: these coders were"
    with pytest.raises(ValueError, match=message):
        main([str(run), "--dataset", str(tmp_path / "never-opened")])


def test_coders_of_attention_modules_are_refused_before_any_data_loads(clt_run: Path, tmp_path):
    d_in = 32  # the tiny test model's width
    cfg = SparseCoderConfig(num_latents=4 * d_in, k=4, transcode=True)
    coders = PerLayerCoders(["model.language_model.layers.0.self_attn"], d_in, cfg)
    model_id = json.loads((clt_run / "config.json").read_text())["model"]
    save_coders(coders, tmp_path / "attn", config={"model": model_id})
    with pytest.raises(ValueError, match=r"self_attn'\] are not MLPs .*replaces MLPs only"):
        main([str(tmp_path / "attn"), "--dataset", str(tmp_path / "never-opened")])


def test_a_folder_without_coders_is_refused_before_the_model_loads(
    clt_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlm_sparsify.fidelity as fidelity
    from vlm_sparsify.coder_io import CheckpointError

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the run folder was checked")

    monkeypatch.setattr(fidelity, "load_model_and_processor", no_model)
    with pytest.raises(CheckpointError, match="holds no <hookpoint>/cfg.json"):
        main([str(clt_run.parent)])  # the save_dir, not the run


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl"])
def test_left_pad_moves_every_per_token_key(family: str, tmp_path: Path) -> None:
    """Gemma 3's token_type_ids (its image attention) and Qwen3-VL's mm_token_type_ids (its
    mrope positions) move with the tokens: a left-padded row reads as it does alone."""
    from tests.conftest import make_image
    from vlm_sparsify.data import Example, collate, encode_example
    from vlm_sparsify.random_models import build_tiny
    from vlm_sparsify.recipe import find_recipe

    recipe = find_recipe(family)
    model, processor = build_tiny(recipe)
    image = make_image(tmp_path / "image.png")
    questions = ("what color is the circle", "is there a red circle in the image of a cat")
    encoded = [encode_example(Example(q, image, q), processor, recipe, 64) for q in questions]
    batch = left_pad(collate(encoded, processor.tokenizer.pad_token_id or 0))
    assert batch["attention_mask"][0, 0] == 0  # the first question is the shorter one
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for row, alone in enumerate(encoded):
            torch.testing.assert_close(batched[row], model(**alone).logits[0, -1])


def test_layer_predictions_sum_every_source_reaching_a_target_by_hand() -> None:
    """A CLT target's prediction: the sum over the sources reaching it of their top-k decoder
    rows, decoder biases and skip connections, each source encoding its own recorded input."""
    from tests.test_cross_layer import normal_parameters
    from vlm_sparsify.fidelity import layer_predictions

    hooks = [f"layers.{i}.mlp" for i in range(3)]
    cfg = SparseCoderConfig(num_latents=16, k=3, transcode=True, skip_connection=True)
    clt = CrossLayerTranscoder(hooks, 6, cfg, 2)
    normal_parameters(clt)
    inputs = [torch.randn(5, 6) for _ in hooks]
    expected = [torch.zeros(5, 6) for _ in hooks]
    for p, x in enumerate(inputs):
        source = clt.sources[p]
        pre = torch.relu(x @ source.encoder.weight.T + source.encoder.bias)
        values, indices = pre.topk(3, dim=1)
        for i in range(len(source.W_decs)):  # targets p, p + 1 within reach
            dense = torch.zeros(5, 16).scatter(1, indices, values)
            skip = x @ source.W_skips[i].T
            expected[p + i] += dense @ source.W_decs[i] + source.b_decs[i] + skip
    with torch.no_grad():
        predictions = layer_predictions(clt, inputs, outputs=[])
    assert len(predictions) == 3
    for got, want in zip(predictions, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_region_masks_by_hand() -> None:
    """Two right-padded rows, image token 5: prompts of 4 and 3 tokens, answers after them."""
    ids = torch.tensor([[1, 5, 5, 7, 8, 9], [1, 5, 7, 8, 9, 0]])
    mask = ids != 0  # row 1 is padded by one
    scored, regions, rows = region_masks(ids, mask, torch.tensor([4, 3]), image_id=5)
    F, T = False, True
    assert scored.tolist() == [[T, T, T, T, T], [T, T, T, T, F]]
    assert rows["all"].tolist() == [[T] * 6, [T, T, T, T, T, F]]  # padding in no region
    assert rows["image"].tolist() == [[F, T, T, F, F, F], [F, T, F, F, F, F]]
    assert rows["prompt"].tolist() == [[T, F, F, F, F, F], [T, F, F, F, F, F]]
    # the answer starts at the position that predicts its first token (prompt length - 1)
    assert rows["answer"].tolist() == [[F, F, F, T, T, T], [F, F, T, T, T, F]]
    # scored positions, row 0 then row 1 (row 1's last real token predicts padding: not scored)
    assert regions["image"].tolist() == [F, T, T, F, F, F, T, F, F]
    assert regions["prompt"].tolist() == [T, F, F, F, F, T, F, F, F]
    assert regions["answer"].tolist() == [F, F, F, T, T, F, F, T, T]
    # an image token where the answer starts counts as answer: the regions partition the rows
    _, _, rows = region_masks(ids, mask, torch.tensor([3, 2]), image_id=5)
    assert (rows["image"] & rows["answer"]).sum() == 0
    parts = rows["image"].int() + rows["prompt"].int() + rows["answer"].int()
    assert torch.equal(parts.bool(), rows["all"]) and parts.max() == 1

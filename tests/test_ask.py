"""`python -m vlm_sparsify.ask`: one answer, its strongest features, and the answer edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import random_clt
from vlm_sparsify.ask import Edit, main, parse_edit
from vlm_sparsify.clt_free import FeatureSteerer, SteeredFeature
from vlm_sparsify.coder_io import save_coders
from vlm_sparsify.generation import generate_batch
from vlm_sparsify.loading import load_model_and_processor


@pytest.fixture(scope="module")
def clt_run(tmp_path_factory, tiny_llava, llava_recipe) -> tuple[Path, object]:
    """A CLT with random weights (encoders strong enough to fire) on the tiny model's MLPs."""
    coders = random_clt(tiny_llava[0], llava_recipe)
    return save_coders(coders, tmp_path_factory.mktemp("ask") / "clt"), coders


def test_ask_answers_as_the_model_lists_its_features_and_edits_them_as_the_steerer_does(
    tmp_path, tiny_llava_dir, clt_run, capsys
) -> None:
    run, coders = clt_run
    image_path = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image_path)
    question = "is a red circle present?"
    flags = ["--image", str(image_path), "--question", question, "--model", str(tiny_llava_dir),
             "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "4", "--top", "5"]  # fmt: skip
    edits = ["0:10:set=1", f"{coders.hookpoints[1]}:5:zero"]
    result = main([str(run), *flags, "--json", "--edit", *edits])
    assert json.loads(capsys.readouterr().out) == result

    model, processor, recipe = load_model_and_processor(
        str(tiny_llava_dir), None, dtype="float32", device="cpu"
    )
    image = Image.open(image_path).convert("RGB")
    prompt = recipe.format_prompt(question, processor)

    def generate() -> str:
        [generation] = generate_batch(model, processor, [image], [prompt], max_new_tokens=4)
        return generation.response

    # error mode: the original model's answer
    assert result["answer"] == generate()
    # the strongest features at the last prompt token, from the coders' encoders on the MLP
    # inputs of a plain forward of the prompt
    inputs = processor(images=[[image]], text=[prompt], return_tensors="pt")
    mlp_inputs = {}
    hooks = [
        model.get_submodule(h).register_forward_pre_hook(
            lambda _, args, h=h: mlp_inputs.__setitem__(h, args[0][0, -1])
        )
        for h in coders.hookpoints
    ]
    with torch.no_grad():
        model(**inputs)
        for hook in hooks:
            hook.remove()
        found = []
        for p, hookpoint in enumerate(coders.hookpoints):
            encoded = coders.encode(p, mlp_inputs[hookpoint][None])
            acts, indices = encoded.top_acts[0].tolist(), encoded.top_indices[0].tolist()
            for value, index in zip(acts, indices, strict=True):
                if value > 0:
                    found.append((value, p, index))
    expected = sorted(found, reverse=True)[:5]
    assert len(result["top_features"]) == 5
    for feature, (value, p, index) in zip(result["top_features"], expected, strict=True):
        assert (feature["layer"], feature["feature_idx"]) == (p, index)
        assert feature["hookpoint"] == coders.hookpoints[p]
        assert feature["activation"] == pytest.approx(value, abs=1e-4)
    # the edits, as the CLT-free steerer makes them on the original model
    steered = [SteeredFeature(coders.hookpoints[0], 10, 1.0, "set"),
               SteeredFeature(coders.hookpoints[1], 5, 0.0, "zero")]  # fmt: skip
    steerer = FeatureSteerer.from_coders(coders, steered)
    with steerer.attach(model, "decision"):
        assert result["edited"] == generate()
    with steerer.attach(model, "all"):  # --region is what decides where: every token differs
        assert result["edited"] != generate()
    assert result["edited"] != result["answer"]  # the edit matters
    assert result["edits"] == edits and result["region"] == "decision"

    # text output; open-loop gives the original model's answer as well
    main([str(run), *flags, "--mode", "open-loop", "--top", "2"])
    printed = capsys.readouterr().out
    assert f"original model:           {result['answer']!r}" in printed
    assert "replacement (open-loop):" in printed
    assert len([line for line in printed.splitlines() if line.endswith(".mlp")]) == 2
    # a feature beyond the coders' width, found once they are loaded
    with pytest.raises(
        ValueError, match="'0:64:zero': .* edits feature 64 but the coder at .* has 64 latents"
    ):
        main([str(run), *flags, "--edit", "0:64:zero"])


def test_bad_edits_and_inputs_are_one_line_naming_them(tmp_path, clt_run, capsys) -> None:
    run, coders = clt_run
    hooks = list(coders.hookpoints)
    name = f"{hooks[1]}:4:scale=0.5"
    assert parse_edit(name, hooks) == Edit(name, hooks[1], 4, "scale", 0.5)
    assert parse_edit("0:7:zero", hooks) == Edit("0:7:zero", 0, 7, "zero", None)
    last = len(hooks) - 1  # counted from the end as Python does
    assert parse_edit("-1:7:zero", hooks) == Edit("-1:7:zero", last, 7, "zero", None)
    assert parse_edit(f"-{len(hooks)}:7:zero", hooks).layer == 0
    for text, message in (
        ("3:1", "give LAYER:FEATURE:OP"),
        ("0:1:boost=2", "Unknown intervention op 'boost'"),
        ("0:x:zero", "the feature must be a latent index"),
        ("0:1:set", "set needs a value"),
        ("0:1:zero=2", "zero takes no value"),
        ("0:1:add=much", "'much' is not a number"),
        ("0:1:set=nan", "'0:1:set=nan': 'nan' is not a finite number"),
        ("0:1:scale=inf", "'0:1:scale=inf': 'inf' is not a finite number"),
        (f"{len(hooks)}:1:zero", f"the run has {len(hooks)} sources"),
        (f"-{len(hooks) + 1}:1:zero", f"or -1 to -{len(hooks)} from the last"),
        ("mlp:1:zero", "'mlp' is neither a source position nor one of the run's hookpoints"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_edit(text, hooks)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    # checked before the model loads (no --model: it would load the embedded default)
    with pytest.raises(ValueError, match=f"'9:1:zero': the run has {len(hooks)} sources"):
        main([str(run), "--image", str(image), "--question", "q", "--edit", "9:1:zero"])
    with pytest.raises(ValueError, match=f"'-9:1:zero': the run has {len(hooks)} sources"):
        main([str(run), "--image", str(image), "--question", "q", "--edit=-9:1:zero"])
    # argparse reads a value that starts with '-' as a flag: the error says how to give it
    with pytest.raises(SystemExit):
        main([str(run), "--image", str(image), "--question", "q", "--edit", "-1:1:zero"])
    assert "'-' is given as --FLAG=VALUE" in capsys.readouterr().err
    # a repeated --edit adds its edits to the earlier ones (argparse kept the last --edit only)
    with pytest.raises(ValueError, match=f"'9:1:zero': the run has {len(hooks)} sources"):
        main([str(run), "--image", str(image), "--question", "q", "--edit", "9:1:zero",
              "--edit", "0:1:zero"])  # fmt: skip
    with pytest.raises(ValueError, match="--image .*missing.png"):
        main([str(run), "--image", str(tmp_path / "missing.png"), "--question", "q"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="--image .*broken.png"):
        main([str(run), "--image", str(tmp_path / "broken.png"), "--question", "q"])
    with pytest.raises(ValueError, match="give --image FILE and --question TEXT"):
        main([str(run), "--image", str(image)])
    with pytest.raises(ValueError, match="--region 'answer'"):
        main([str(run), "--image", str(image), "--question", "q", "--region", "answer"])
    for device, message in (
        ("gpu", "'gpu' is not a torch device"),
        ("cuda:99", "cuda:99: torch .* sees \\d+ CUDA"),
    ):
        with pytest.raises(ValueError, match=f"--device {message}"):
            main([str(run), "--image", str(image), "--question", "q", "--device", device])
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        main([str(tmp_path / "nothing"), "--image", str(image), "--question", "q"])

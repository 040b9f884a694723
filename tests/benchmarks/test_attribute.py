"""The attribute stage: activation x gradient of the answer's logit difference per feature."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sparsify import SparseCoderConfig

from benchmarks import outputs
from benchmarks.__main__ import run
from benchmarks.adapters import get_adapter
from benchmarks.runs import load_run, teacher_forced_inputs
from benchmarks.stages.attribute import answer_logit_difference
from tests.benchmarks.test_capture_classify import GREEDY
from vlm_sparsify.coder_io import load_coders, save_coders
from vlm_sparsify.data import load_rgb
from vlm_sparsify.hookpoints import mlp_hookpoints
from vlm_sparsify.interventions import Intervention
from vlm_sparsify.replacement import ReplacementModel
from vlm_sparsify.training import build_coders


def test_answer_logit_difference_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 3.0, 2.0], [5.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    # prompt of 2 tokens; the response [1, 0] is predicted at rows 1 and 2
    value = answer_logit_difference(logits, torch.tensor([1, 0]), prompt_length=2)
    assert float(value) == (3.0 - 2.0) + (5.0 - 1.0)


@pytest.fixture(scope="module")
def coders_dir(tmp_path_factory, tiny_llava, llava_recipe) -> Path:
    """A CLT with random encoders and decoders (decoders start at zero when trained)."""
    model, _ = tiny_llava
    hookpoints = mlp_hookpoints(model, llava_recipe)
    d_in = model.config.text_config.hidden_size
    cfg = SparseCoderConfig(num_latents=64, k=8)
    coders = build_coders(hookpoints, d_in, cfg, cross_layer=2, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for source in coders.sources:
            for W in source.W_decs:
                W.copy_(torch.randn(W.shape, generator=generator) * 0.5)
    return save_coders(coders, tmp_path_factory.mktemp("coders") / "run")


def read(path: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ids"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_attributions_predict_the_effect_of_scaling_a_feature(
    tmp_path,
    tiny_llava_dir,
    coders_dir,  # noqa: F811
):
    out = tmp_path / "out"
    run(["easyvqa", "capture", "--out", str(out), "--model", str(tiny_llava_dir), "--coders",
         str(coders_dir), "--kinds", "yesno", "--limit", "3", *GREEDY])  # fmt: skip
    # region all: what a scale intervention on every token changes
    run(["easyvqa", "attribute", "--out", str(out), "--region", "all"])
    ids, coo = read(out / "store" / "attributions.safetensors")
    # other coders are refused even when the attributions are up to date
    other = load_coders(coders_dir)
    with torch.no_grad():
        next(iter(other.items()))[1].encoder.bias.add_(0.01)
    save_coders(other, tmp_path / "other")
    with pytest.raises(SystemExit, match="not the coders the feature store was captured with"):
        run(["easyvqa", "attribute", "--out", str(out), "--region", "all", "--coders",
             str(tmp_path / "other")])  # fmt: skip
    records = outputs.read_append_log(out / outputs.RESPONSES)
    assert ids == [r["id"] for r in records]
    assert set(coo["sample"].tolist()) <= {0, 1, 2} and len(coo["value"]) > 0

    # the three largest attributions of sample 0: each is the derivative of the objective under
    # scaling that feature in a real run of the model (central differences: this random CLT makes
    # the objective so curved that eps 1e-3 is already 6% off for the third, 1e-4 within 0.1%)
    loaded = load_run(out, "easyvqa", None, "cpu")
    item = {i.id: i for i in get_adapter("easyvqa").load_items(loaded.data, loaded.recipe)}
    record = records[0]
    image = load_rgb(item[record["id"]].image)
    inputs = teacher_forced_inputs(loaded, record, image)
    response = torch.tensor(record["response_token_ids"])
    prompt_length = inputs["input_ids"].shape[1] - len(response)
    # the whole response follows the prompt as the processor builds it
    prompt = loaded.processor(images=[image], text=[record["prompt"]], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt["input_ids"][0].tolist() + response.tolist()

    def objective(p: int, latent: int, scale: float) -> float:
        edit = Intervention("scale", features=latent, layers=p, value=scale)
        rm = ReplacementModel(loaded.model, loaded.coders, mode="error", interventions=[edit])
        with torch.no_grad():
            logits = rm(**inputs).logits.double()
        return float(answer_logit_difference(logits, response, prompt_length))

    first = coo["sample"] == 0
    eps = 1e-4
    for j in coo["value"][first].abs().argsort(descending=True)[:3].tolist():
        p, latent = int(coo["layer"][first][j]), int(coo["latent"][first][j])
        value = float(coo["value"][first][j])
        slope = (objective(p, latent, 1 + eps) - objective(p, latent, 1 - eps)) / (2 * eps)
        assert abs(value) > 1e-4
        assert slope == pytest.approx(value, rel=0.02), (p, latent)
    # the default region (decision) is recomputed, recorded, and leaves out the image rows
    run(["easyvqa", "attribute", "--out", str(out)])
    with safe_open(str(out / "store" / "attributions.safetensors"), "pt") as f:
        assert f.metadata()["region"] == "decision"
    _, decision = read(out / "store" / "attributions.safetensors")
    assert 0 < len(decision["value"]) < len(coo["value"])
    # analyze reads them: a ranking by attribution runs end to end
    run(["easyvqa", "score", "--out", str(out)])
    run(["easyvqa", "classify", "--out", str(out)])
    run(["easyvqa", "analyze", "--out", str(out), "--rank-by", "attribution",
         "--held-out-fraction", "0"])  # fmt: skip
    features = json.loads((out / "features.json").read_text())
    assert features["parameters"]["rank_by"] == "attribution"
    assert features["parameters"]["region"] == features["attribution_region"] == "decision"
    assert all("attribution" in f for f in features["features"])
    # attributions of fewer samples are redone on request, and never ranked as if complete
    run(["easyvqa", "attribute", "--out", str(out), "--limit", "2"])
    assert len(read(out / "store" / "attributions.safetensors")[0]) == 2
    with pytest.raises(SystemExit, match="lacks 1 of the 3 train samples"):
        run(["easyvqa", "analyze", "--out", str(out), "--force"])
    run(["easyvqa", "attribute", "--out", str(out)])
    assert len(read(out / "store" / "attributions.safetensors")[0]) == 3
    # one group alone separates nothing: analyze says so instead of ranking against nobody
    classification = json.loads((out / "classification.json").read_text())
    classification = {**classification, "GOOD": classification["GOOD"] + classification["BAD"],
                      "BAD": []}  # fmt: skip
    (out / "classification.json").write_text(json.dumps(classification))
    with pytest.raises(SystemExit, match="holds 3 GOOD and 0 BAD samples"):
        run(["easyvqa", "analyze", "--out", str(out), "--held-out-fraction", "0"])


def test_region_rows_follow_capture_regions():
    from benchmarks.stages.attribute import region_rows

    ids = torch.tensor([[1, 9, 9, 4, 5, 6, 7]])  # 9 = image token; the response starts at row 5
    assert region_rows(ids, 5, 9, "image").tolist() == [0, 1, 1, 0, 0, 0, 0]
    assert region_rows(ids, 5, 9, "prompt").tolist() == [1, 0, 0, 1, 1, 0, 0]
    assert region_rows(ids, 5, 9, "response").tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert region_rows(ids, 5, 9, "all").all()
    # rows 4 and 5 predict the response tokens 5 and 6; row 6's prediction is never read
    assert region_rows(ids, 5, 9, "decision").tolist() == [0, 0, 0, 0, 1, 1, 0]


def test_sample_attributions_are_activation_times_gradient():
    """On a stand-in replacement model whose objective is 2 a + b (a, b: the two activations of
    row 1): activation x gradient is 3 x 2 for latent 2 and 4 x 1 for latent 3."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from benchmarks.stages.attribute import sample_attributions

    class StandIn:
        num_latents, image_token_id = 4, None

        @contextmanager
        def attribution(self):
            self.leaves = []
            yield self.leaves

        def __call__(self, input_ids):
            acts = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
            self.leaves.append((0, acts, torch.tensor([[0, 1], [2, 3], [0, 3]])))
            mask = torch.zeros(1, 3, 3)
            mask[0, 1, 1] = 1.0  # row 1 predicts the response token 1
            return SimpleNamespace(logits=mask * (2 * acts[1, 0] + acts[1, 1]))

    inputs = {"input_ids": torch.tensor([[5, 6, 7]])}
    result = sample_attributions(StandIn(), inputs, torch.tensor([1]), "all")
    assert result == {(0, 2): 6.0, (0, 3): 4.0}

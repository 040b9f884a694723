"""Export to circuit-tracer: loads with its own load_clt, holds our weights, fidelity measured."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from safetensors.torch import save_file
from sparsify import SparseCoderConfig

from vlm_sparsify.cli import run_cli
from vlm_sparsify.coder_io import save_coders
from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.export import export_circuit_tracer, export_fidelity, fit_thresholds, main

HOOKS = [f"model.language_model.layers.{i}.mlp" for i in range(4)]


def random_clt(cross_layer: int, d: int = 8, latents: int = 8, k: int = 2) -> CrossLayerTranscoder:
    cfg = SparseCoderConfig(num_latents=latents, k=k, transcode=True)
    clt = CrossLayerTranscoder(HOOKS, d, cfg, cross_layer)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_()
    return clt


def test_export_loads_in_circuit_tracer_with_our_weights(tmp_path: Path) -> None:
    clt = random_clt(cross_layer=2)
    thresholds = [torch.full((8,), 0.1 * (p + 1)) for p in range(4)]
    export_circuit_tracer(clt, tmp_path / "ct", thresholds, model_name="llava-hf/llava-1.5-7b-hf")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    assert config["model_name"] == "llava-hf/llava-1.5-7b-hf"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == (
        "mlp.hook_in",
        "hook_mlp_out",
    )
    ct = load_clt(
        str(tmp_path / "ct"), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False
    )
    assert (ct.n_layers, ct.d_transcoder, ct.d_model) == (4, 8, 8)
    for i, source in enumerate(clt.sources):
        assert torch.equal(ct.W_enc[i], source.encoder.weight)
        assert torch.equal(ct.b_enc[i], source.encoder.bias)
        assert torch.equal(ct.activation_function.threshold[i, 0], thresholds[i])
        assert ct.W_dec[i].shape == (8, 4 - i, 8)
        for j in range(4 - i):
            expected = source.W_decs[j] if j < clt.n_targets(i) else torch.zeros(8, 8)
            assert torch.equal(ct.W_dec[i][:, j], expected)
        # circuit-tracer has one decoder bias per output layer: the sum over sources reaching it
        b = sum(clt.sources[p].b_decs[i - p] for p in clt.sources_reaching(i))
        torch.testing.assert_close(ct.b_dec[i], b)


def separable_inputs(n: int, d: int, k: int, seed: int) -> list[torch.Tensor]:
    """Noise below 0.5 everywhere plus k coordinates above 5: TopK is a clean cut."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in HOOKS:
        x = torch.rand(n, d, generator=g) * 0.5
        hot = torch.rand(n, d, generator=g).argsort(-1)[:, :k]
        xs.append(x.scatter(1, hot, 5 + torch.rand(n, k, generator=g)))
    return xs


def test_fitted_thresholds_reproduce_clean_topk_and_cli_measures_fidelity(tmp_path: Path) -> None:
    clt = random_clt(cross_layer=4)
    with torch.no_grad():
        for source in clt.sources:
            source.encoder.weight.copy_(torch.eye(8))
            source.encoder.bias.zero_()
    calib = separable_inputs(400, 8, 2, seed=0)
    for method in ("feature", "layer"):
        thresholds = fit_thresholds(clt, calib[:], method)
        assert all(bool(((t > 0.5) & (t < 5)).all()) for t in thresholds), method
        fidelity = export_fidelity(clt, thresholds, separable_inputs(100, 8, 2, seed=1))
        assert max(fidelity["fvu_export_vs_topk"]) < 1e-10
        assert fidelity["l0_export"] == [2.0] * 4
    # A TopK that is not a clean cut loses fidelity, and the CLI reports it
    save_coders(random_clt(cross_layer=2, latents=32, k=4), tmp_path / "run")
    g = torch.Generator().manual_seed(2)
    tensors = {f"inputs.{h}": torch.randn(512, 8, generator=g) for h in HOOKS}
    tensors |= {f"outputs.{h}": torch.randn(512, 8, generator=g) for h in HOOKS}
    save_file(tensors, str(tmp_path / "calib.safetensors"))
    result = main(
        ["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct"), "--calibration",
         str(tmp_path / "calib.safetensors"), "--n_layers", "4"]
    )  # fmt: skip
    assert set(result) == {"fvu_export_vs_topk", "l0_export", "fvu_topk", "fvu_export"}
    assert all(0.01 < v < 1.5 for v in result["fvu_export_vs_topk"])
    assert all(2 < v < 8 for v in result["l0_export"])
    assert sorted(p.name for p in (tmp_path / "ct").iterdir())[:2] == [
        "W_dec_0.safetensors",
        "W_dec_1.safetensors",
    ]


def test_feature_thresholds_imitate_the_coders_own_selection_groupmax_too() -> None:
    # groupmax (k groups of 4 latents, each group's largest fires): per token one hot latent of
    # 8-9 and one of 5-6 in group 0, one warm of 2-3 in group 1; TopK would take the two hot ones
    from vlm_sparsify.per_layer import PerLayerCoders

    cfg = SparseCoderConfig(num_latents=8, k=2, transcode=True, activation="groupmax")
    coders = PerLayerCoders(HOOKS[:1], 8, cfg)
    with torch.no_grad():
        coders[HOOKS[0]].encoder.weight.copy_(torch.eye(8))
        coders[HOOKS[0]].encoder.bias.zero_()
        coders[HOOKS[0]].W_dec.normal_(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)

    def tokens(n: int) -> torch.Tensor:
        x = torch.rand(n, 8, generator=g) * 0.5
        group0 = torch.rand(n, 4, generator=g).argsort(-1)[:, :2]
        x.scatter_(1, group0, torch.stack([8 + torch.rand(n, generator=g),
                                           5 + torch.rand(n, generator=g)], 1))  # fmt: skip
        warm = 4 + torch.randint(0, 4, (n, 1), generator=g)
        return x.scatter(1, warm, 2 + torch.rand(n, 1, generator=g))

    thresholds = fit_thresholds(coders, [tokens(400)], "feature")
    fidelity = export_fidelity(coders, thresholds, [tokens(100)])
    assert fidelity["fvu_export_vs_topk"][0] < 1e-10
    assert fidelity["l0_export"] == [2.0]


def test_best_separation_cuts_at_the_fewest_disagreements() -> None:
    from vlm_sparsify.export import _best_separation

    values = torch.tensor([[1.0, 0.5, 0, 0], [2, 1, 1, 0], [3, 2, 2, 3], [4, 3, 3, 3]])
    positive = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]]).bool()
    cut, ever = _best_separation(values, positive)
    # column 0: cutting at 1.5 misses one token (3), as cutting at 3.5 does: the lower cut wins;
    # columns 1 and 2 always positive: below every value (never below 0); column 3: clean cut
    torch.testing.assert_close(cut, torch.tensor([1.5, 0.5 - 1e-6, 0.0, 1.5]), atol=1e-7, rtol=0)
    assert cut.min() == 0.0 and ever.all()


def test_feature_thresholds_ignore_top_k_slots_holding_zero() -> None:
    """With one positive pre-activation, TopK's second slot holds a zero: not a selection."""
    from vlm_sparsify.per_layer import PerLayerCoders

    coders = PerLayerCoders(HOOKS[:1], 4, SparseCoderConfig(num_latents=4, k=2, transcode=True))
    with torch.no_grad():
        coders[HOOKS[0]].encoder.weight.copy_(torch.eye(4))
        coders[HOOKS[0]].encoder.bias.zero_()
    two_fire = torch.tensor([[-1.0, 5.0, 3.0, -1.0]]).expand(11, 4)
    one_fires = torch.tensor([[-1.0, 5.0, -1.0, -1.0]]).expand(10, 4)
    (threshold,) = fit_thresholds(coders, [torch.cat([two_fire, one_fires])], "feature")
    # latents 0 and 3 never fire: the layer value, median of (2nd + 3rd largest) / 2 = 1.5;
    # latent 2 fires at 3 and is 0 elsewhere: cut at 1.5; latent 1 always fires: below 5
    torch.testing.assert_close(threshold, torch.tensor([1.5, 5.0 - 1e-6, 1.5, 1.5]))


def test_jumprelu_features_fire_strictly_above_their_threshold() -> None:
    """As circuit-tracer's JumpReLU (x * (x > threshold)): a pre-activation at it stays off."""
    from vlm_sparsify.export import jumprelu_predictions
    from vlm_sparsify.per_layer import PerLayerCoders

    coders = PerLayerCoders(HOOKS[:1], 4, SparseCoderConfig(num_latents=4, k=2, transcode=True))
    with torch.no_grad():
        coders[HOOKS[0]].encoder.weight.copy_(torch.eye(4))
        coders[HOOKS[0]].encoder.bias.zero_()
    _, l0 = jumprelu_predictions(coders, [torch.ones(4)], [torch.tensor([[1.0, 2.0, 1.0, 0.5]])])
    assert l0 == [1.0]


def test_model_layers_are_distinct() -> None:
    from vlm_sparsify.export import model_layers

    assert model_layers(HOOKS[1:3], 4) == [1, 2]
    with pytest.raises(ValueError, match=r"hookpoints are layers \[1, 1\]"):
        model_layers([HOOKS[1], HOOKS[1]], 4)
    with pytest.raises(ValueError, match=r"hookpoints are layers \[None, 1\]"):
        model_layers(["model.language_model.mlp", HOOKS[1]], 4)


def test_the_cli_checks_the_layers_before_calibrating(tmp_path: Path, monkeypatch) -> None:
    import vlm_sparsify.run_activations

    def calibrate(*args, **kwargs):
        raise AssertionError("calibrated (runs the model) before checking the layers")

    monkeypatch.setattr(vlm_sparsify.run_activations, "run_activations", calibrate)
    save_coders(random_clt(cross_layer=2), tmp_path / "run")
    with pytest.raises(ValueError, match=r"layers \[0, 1, 2, 3\], but .* layers 0..2"):
        main(["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct"), "--n_layers", "3"])


def test_an_out_dir_with_another_config_yaml_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(ValueError, match="is not a circuit-tracer export"):
        export_circuit_tracer(random_clt(cross_layer=2), tmp_path / "ct", [torch.zeros(8)] * 4)
    assert (tmp_path / "ct" / "config.yaml").read_text() == "model_kind: transcoder_set\n"


def test_cli_fits_on_the_first_half_and_measures_on_the_held_out_half(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    clt = random_clt(cross_layer=2, latents=32, k=4)
    save_coders(clt, tmp_path / "run")
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(64, 8, generator=g) for _ in HOOKS]
    with torch.no_grad():  # outputs the TopK coder predicts exactly, row for row
        encoded = [clt.encode(p, x) for p, x in enumerate(inputs)]
        outputs = [clt.predict(encoded, t) for t in range(len(HOOKS))]
    tensors = {f"inputs.{h}": x for h, x in zip(HOOKS, inputs, strict=True)}
    save_file(tensors | {f"outputs.{HOOKS[0]}": outputs[0]}, str(tmp_path / "some.safetensors"))
    tensors |= {f"outputs.{h}": y for h, y in zip(HOOKS, outputs, strict=True)}
    save_file(tensors, str(tmp_path / "calib.safetensors"))
    args = ["circuit-tracer", str(tmp_path / "run"), "--n_layers", "4", "--calibration"]
    result = main([*args[:2], str(tmp_path / "ct"), *args[2:], str(tmp_path / "calib.safetensors")])
    assert max(result["fvu_topk"]) < 1e-10  # outputs and inputs of the same held-out rows
    fitted = fit_thresholds(clt, [x[:32] for x in inputs])
    for p, threshold in enumerate(fitted):
        on_disk = load_file(str(tmp_path / "ct" / f"W_enc_{p}.safetensors"))[f"threshold_{p}"]
        assert torch.equal(on_disk, threshold)
    # outputs of some hookpoints only: fidelity against the coder alone
    result = main([*args[:2], str(tmp_path / "ct2"), *args[2:], str(tmp_path / "some.safetensors")])
    assert set(result) == {"fvu_export_vs_topk", "l0_export"}


def test_export_refuses_saes(tmp_path: Path) -> None:
    from vlm_sparsify.per_layer import PerLayerCoders

    sae = PerLayerCoders(HOOKS, 8, SparseCoderConfig(num_latents=8, k=2))
    with pytest.raises(ValueError, match="transcode=False"):
        export_circuit_tracer(sae, tmp_path / "ct", [torch.zeros(8)] * 4)
    # the command says so in one line, before it would run the model for calibration
    save_coders(sae, tmp_path / "sae")
    with pytest.raises(SystemExit) as exit_:  # `python -m vlm_sparsify.export` exits with it
        run_cli(lambda: main(["circuit-tracer", str(tmp_path / "sae"), str(tmp_path / "ct")]))
    assert str(exit_.value.code).startswith("error: this run holds SAEs")


def test_export_warns_that_skip_connections_stay_behind(tmp_path: Path) -> None:
    cfg = SparseCoderConfig(num_latents=8, k=2, transcode=True, skip_connection=True)
    save_coders(CrossLayerTranscoder(HOOKS, 8, cfg, 2), tmp_path / "run")
    tensors = {f"inputs.{h}": torch.randn(64, 8) for h in HOOKS}
    save_file(tensors, str(tmp_path / "calib.safetensors"))
    with pytest.warns(UserWarning, match="skip connections .* not exported.* TopK .*fvu_topk"):
        main(["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct"), "--n_layers", "4",
              "--calibration", str(tmp_path / "calib.safetensors")])  # fmt: skip


def test_calibration_of_another_width_or_length_is_one_error_naming_it(tmp_path: Path) -> None:
    save_coders(random_clt(cross_layer=2), tmp_path / "run")
    calib = tmp_path / "calib.safetensors"
    command = ["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct"), "--n_layers", "4",
               "--calibration"]  # fmt: skip
    for tensors, wrong in (
        ({f"inputs.{h}": torch.randn(64, 16) for h in HOOKS}, r"'inputs\..*0\.mlp': \[64, 16\]"),
        ({f"inputs.{h}": torch.randn(64 + i, 8) for i, h in enumerate(HOOKS)}, r"\[65, 8\]"),
        ({f"inputs.{h}": torch.randn(1, 8) for h in HOOKS}, r"\[1, 8\]\} is not \[N, 8\]"),
    ):
        save_file(tensors, str(calib))
        with pytest.raises(ValueError, match=rf"{calib}: .*{wrong}.*N >= 2"):
            main([*command, str(calib)])
    assert not (tmp_path / "ct").exists()


def test_out_of_range_numbers_and_a_folder_as_calibration_file_are_named(tmp_path: Path) -> None:
    save_coders(random_clt(cross_layer=2), tmp_path / "run")
    command = ["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct")]
    # before: "a model with -1 layers" (--calibration_examples: the test below)
    with pytest.raises(ValueError, match="--n_layers must be at least 1, got 0"):
        main([*command, "--n_layers", "0"])
    (tmp_path / "acts").mkdir()  # before: "No such device (os error 19)", naming nothing
    with pytest.raises(IsADirectoryError, match=f"{tmp_path / 'acts'} is a folder, not a "):
        main([*command, "--n_layers", "4", "--calibration", str(tmp_path / "acts")])
    assert not (tmp_path / "ct").exists()


def test_a_failed_export_leaves_the_previous_one_and_no_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlm_sparsify.export as export

    clt = random_clt(cross_layer=2)
    out = tmp_path / "ct"
    export_circuit_tracer(clt, out, [torch.full((8,), 0.1)] * 4)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    written = []

    def fail_on_second_file(tensors: dict, path: str) -> None:
        if written:
            raise OSError("disk full")
        save_file(tensors, path)
        written.append(path)

    monkeypatch.setattr(export, "save_file", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        export_circuit_tracer(clt, out, [torch.full((8,), 0.5)] * 4)
    assert len(written) == 1 and Path(written[0]).parent.name.startswith(".ct.tmp-")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ct"]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_an_out_dir_that_is_not_an_earlier_export_is_refused_untouched(tmp_path: Path) -> None:
    clt = random_clt(cross_layer=2)
    save_coders(clt, tmp_path / "run")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "results.txt").write_text("keep me")
    thresholds = [torch.full((8,), 0.1)] * 4
    for folder in (tmp_path / "notes", tmp_path / "run", tmp_path):
        before = sorted(folder.rglob("*"))
        with pytest.raises(ValueError, match=f"{folder} exists and is not a circuit-tracer export"):
            export_circuit_tracer(clt, folder, thresholds)
        with pytest.raises(ValueError, match="pass a new or empty folder"):
            main(["circuit-tracer", str(tmp_path / "run"), str(folder)])
        assert sorted(folder.rglob("*")) == before
    (tmp_path / "empty").mkdir()
    for _ in range(2):  # an empty folder, then the earlier export in it
        export_circuit_tracer(clt, tmp_path / "empty", thresholds)
    assert (tmp_path / "empty" / "W_dec_3.safetensors").is_file()


def test_coders_of_other_module_paths_are_refused_before_calibrating(
    tmp_path: Path, tiny_llava_dir: Path
) -> None:
    clt = random_clt(cross_layer=2)
    clt.hookpoints = [f"language_model.model.layers.{i}.mlp" for i in range(4)]  # transformers 4.51
    save_coders(clt, tmp_path / "run", config={"model": str(tiny_llava_dir)})
    with pytest.raises(ValueError, match=r"not modules of .*pass --calibration ACTS"):
        main(["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct"), "--n_layers", "4"])
    assert not (tmp_path / "ct").exists()


def test_a_run_over_some_layers_exports_every_model_layer_and_loads_in_circuit_tracer(
    tmp_path: Path,
) -> None:
    # circuit-tracer reads file i at the model's layer i for every layer of the model (its
    # replacement model encodes at each one and subtracts a reconstruction of every layer)
    from vlm_sparsify.export import jumprelu_predictions

    cfg = SparseCoderConfig(num_latents=8, k=2, transcode=True)
    for layers in ((0, 1), (1, 3)):  # `--layers 0 1` of the 4-layer default, and a gap
        hooks = [f"model.language_model.layers.{i}.mlp" for i in layers]
        clt = CrossLayerTranscoder(hooks, 8, cfg, cross_layer=2)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in clt.parameters():
                p.normal_()
        run, out = tmp_path / f"run{layers}", tmp_path / f"ct{layers}"
        save_coders(clt, run, config={"model": "default"})
        g = torch.Generator().manual_seed(0)
        calib = {f"inputs.{h}": torch.randn(64, 8, generator=g) for h in hooks}
        save_file(calib, str(tmp_path / "calib.safetensors"))
        main(["circuit-tracer", str(run), str(out), "--calibration",
              str(tmp_path / "calib.safetensors")])  # fmt: skip
        assert yaml.safe_load((out / "config.yaml").read_text())["layers"] == list(layers)
        ct = load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
        assert ct.n_layers == 4  # the default model's layers, read from the run's config.json
        # circuit-tracer's own forward on inputs at every layer: our JumpReLU prediction at the
        # run's layers, nothing but zeros at the others (their MLP output is all error node)
        x = torch.randn(4, 16, 8, generator=g)
        thresholds = [ct.activation_function.threshold[i, 0] for i in layers]
        ours, _ = jumprelu_predictions(clt, thresholds, [x[i] for i in layers])
        theirs = ct(x)
        for layer in range(4):
            expected = ours[layers.index(layer)] if layer in layers else torch.zeros(16, 8)
            torch.testing.assert_close(theirs[layer], expected, rtol=1e-5, atol=1e-5)
        assert bool((ct.encode(x)[[i for i in range(4) if i not in layers]] == 0).all())


def test_hookpoints_circuit_tracer_cannot_place_are_refused(tmp_path: Path) -> None:
    clt = random_clt(cross_layer=2)
    for layers, n_layers in (((0, 1, 2, 4), 4), ((1, 0, 2, 3), 4), ((0, 1, 2, 3), 3)):
        clt.hookpoints = [f"model.language_model.layers.{i}.mlp" for i in layers]
        with pytest.raises(ValueError, match=rf"layers \[{', '.join(map(str, layers))}\], but"):
            export_circuit_tracer(clt, tmp_path / "ct", [torch.zeros(8)] * 4, n_layers=n_layers)
    assert not (tmp_path / "ct").exists()
    save_coders(random_clt(cross_layer=2), tmp_path / "run")  # no config.json: e.g. clt-training's
    with pytest.raises(FileNotFoundError, match="has no config.json .*pass --n_layers N"):
        main(["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct")])
    # attention transcoders would be read as MLPs (feature_input_hook mlp.hook_in)
    clt.hookpoints = [f"model.language_model.layers.{i}.self_attn" for i in range(4)]
    save_coders(clt, tmp_path / "attn", config={"model": "default"})
    with pytest.raises(ValueError, match=r"hookpoints \['model.language_model.layers.0.self_attn'"):
        main(["circuit-tracer", str(tmp_path / "attn"), str(tmp_path / "ct"), "--n_layers", "4"])
    assert not (tmp_path / "ct").exists()


def test_a_run_without_config_json_is_told_to_pass_calibration(tmp_path: Path) -> None:
    save_coders(random_clt(cross_layer=2), tmp_path / "run")  # no config.json: e.g. clt-training's
    with pytest.raises(FileNotFoundError, match="has no config.json .*pass --calibration ACTS"):
        main(["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct"), "--n_layers", "4"])


def test_calibration_activations_come_from_the_runs_own_training_positions(
    tmp_path, tiny_llava, tiny_llava_dir, llava_recipe
):
    from vlm_sparsify.data import easyvqa_examples, encode_example
    from vlm_sparsify.run_activations import run_activations

    _, processor = tiny_llava
    hookpoints = ["model.language_model.layers.0.mlp"]
    example = easyvqa_examples("train")[0]
    ids = encode_example(example, processor, llava_recipe, ctx_len=2048)["input_ids"][0]
    first = int(ids[0])  # the prompt template's first token: the same in every example
    rows = {}
    for tokens, exclude in (("all", []), ("text", []), ("text", [first])):
        run = tmp_path / f"{tokens}-{len(exclude)}"
        run.mkdir()
        settings = {"model": str(tiny_llava_dir), "dataset": "easyvqa", "tokens": tokens,
                    "exclude_tokens": exclude, "data_args": ""}  # fmt: skip
        (run / "config.json").write_text(json.dumps(settings))
        inputs, outputs = run_activations(run, hookpoints, num_examples=4, batch_size=2)
        assert inputs[0].shape == outputs[0].shape
        rows[tokens, len(exclude)] = inputs[0].shape[0]
    image_tokens = int((ids == processor.image_token_id).sum())
    assert rows["all", 0] - rows["text", 0] == 4 * image_tokens  # the run's --tokens
    assert rows["text", 0] - rows["text", 1] == 4 * int((ids == first).sum())  # --exclude_tokens


def test_calibration_shows_its_progress(tmp_path, tiny_llava_dir, capsys):
    # export's calibration ran the model over its examples silently (minutes at 7B size)
    from vlm_sparsify.run_activations import run_activations

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"model": str(tiny_llava_dir), "dataset": "easyvqa"})
    )
    run_activations(run, ["model.language_model.layers.0.mlp"], num_examples=4, batch_size=2)
    assert re.search(r"calibration: 100%.* 4/4 ", capsys.readouterr().err)


def test_an_out_dir_that_is_a_file_is_refused_untouched(tmp_path: Path) -> None:
    # it was moved aside as .notes.txt.old-<pid> and replaced (the next export deleted it)
    clt = random_clt(cross_layer=2)
    save_coders(clt, tmp_path / "run")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(ValueError, match=f"{notes} exists and is not a circuit-tracer export"):
        export_circuit_tracer(clt, notes, [torch.full((8,), 0.1)] * 4)
    with pytest.raises(ValueError, match="pass a new or empty folder"):
        main(["circuit-tracer", str(tmp_path / "run"), str(notes)])
    assert notes.read_text() == "keep me"
    assert sorted(tmp_path.iterdir()) == [notes, tmp_path / "run"]


def test_attention_hookpoints_are_refused_for_the_export_s_own_reason(tmp_path: Path) -> None:
    # the message was fidelity's: "the replacement model replaces MLPs only: measure coders ..."
    clt = random_clt(cross_layer=2)
    clt.hookpoints = [f"model.language_model.layers.{i}.self_attn" for i in range(4)]
    save_coders(clt, tmp_path / "attn", config={"model": "default"})
    with pytest.raises(ValueError, match="are not MLPs .*; circuit-tracer's transcoders read") as e:
        main(["circuit-tracer", str(tmp_path / "attn"), str(tmp_path / "ct"), "--n_layers", "4"])
    assert "replacement model" not in str(e.value)


def test_calibration_examples_are_checked_before_the_model_runs(tmp_path: Path) -> None:
    save_coders(random_clt(cross_layer=2), tmp_path / "run", config={"model": "default"})
    command = ["circuit-tracer", str(tmp_path / "run"), str(tmp_path / "ct"), "--n_layers", "4"]
    for count in ("0", "-3"):  # were torch.cat / islice errors from inside the calibration
        with pytest.raises(
            ValueError, match=f"--calibration_examples must be at least 1, got {count}"
        ):
            main([*command, "--calibration_examples", count])
    save_file({f"inputs.{h}": torch.randn(64, 8) for h in HOOKS}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="--calibration_examples .* --calibration FILE .* one"):
        main([*command, "--calibration", str(tmp_path / "c.safetensors"),
              "--calibration_examples", "8"])  # fmt: skip
    assert not (tmp_path / "ct").exists()

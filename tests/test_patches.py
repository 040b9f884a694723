"""The upstream patches in `patches/` apply to the installed eai-sparsify, and its stock
`Trainer`, patched, trains transcoders on a tiny LLaVA with images and token masks.

Training runs in a child process (this file run as a script) whose PYTHONPATH puts the
patched copy in front of the installed package.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PATCHES = sorted((Path(__file__).parents[1] / "patches").glob("*.patch"))

BOS = 1
IMAGE_TOKEN = 5
N_IMAGE_TOKENS = 4  # (28 px / 14 px)^2 patches; the default strategy drops the class token
N_TEXT_TOKENS = 6
N_ROWS = 4
BATCH_SIZE = 2
TEXT_LAYERS = ["language_model.layers.0", "language_model.layers.1", "language_model.layers.2"]
VISION_MLP = "vision_tower.encoder.layers.0.mlp"

requires_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git CLI")


def installed_sparsify() -> Path:
    spec = importlib.util.find_spec("sparsify")
    assert spec is not None and spec.submodule_search_locations, "eai-sparsify is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def pristine_copy(root: Path) -> Path:
    """Copy the installed package to `root/sparsify`; return `root`."""
    ignore = shutil.ignore_patterns("__pycache__", ".ruff_cache")
    shutil.copytree(installed_sparsify(), root / "sparsify", ignore=ignore)
    return root


def git_apply(root: Path, patch: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    # Inside a git work tree, `git apply` silently skips paths outside it: stop the search
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)}
    return subprocess.run(
        ["git", "apply", *flags, str(patch)], cwd=root, env=env, capture_output=True, text=True
    )


def test_patch_series_is_there() -> None:
    names = [p.name for p in PATCHES]
    assert "0001-trainer-multimodal-batches.patch" in names
    assert "0002-layer-discovery-text-config.patch" in names
    readme = (PATCHES[0].parent / "README.md").read_text()
    assert all(name in readme for name in names), "every patch needs a README entry"


def test_readmes_command_finds_the_installed_package(tmp_path: Path) -> None:
    # importing sparsify without triton prints a line to stdout, which `cd "$(...)"` would take
    readme = (PATCHES[0].parent / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith('cd "$(python'))
    command = command.removesuffix("\\").strip() + " && pwd"
    bin_dir = Path(sys.executable).parent  # `python` on PATH: this interpreter's (a venv's)
    if not (bin_dir / "python").is_file():
        pytest.skip(f"no `python` beside {sys.executable}")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == installed_sparsify().parent


@requires_git
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_applies_alone(tmp_path: Path, patch: Path) -> None:
    root = pristine_copy(tmp_path)
    result = git_apply(root, patch, "--check", "-v")
    assert result.returncode == 0, result.stderr
    assert "Skipped" not in result.stderr


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch CLI")
def test_series_applies_with_patch_p1(tmp_path: Path) -> None:
    root = pristine_copy(tmp_path)
    for patch in PATCHES:
        result = subprocess.run(
            ["patch", "-p1", "--forward", "-i", str(patch)], cwd=root, capture_output=True
        )
        assert result.returncode == 0, (patch.name, result.stdout)
    assert "get_text_config" in (root / "sparsify" / "utils.py").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Apply the series in order, then train in a child process on the patched copy."""
    if shutil.which("git") is None:
        pytest.skip("needs the git CLI to apply the patches")
    root = pristine_copy(tmp_path_factory.mktemp("patched"))
    for patch in PATCHES:
        for flags in (("--check",), ()):
            result = git_apply(root, patch, *flags)
            assert result.returncode == 0, (patch.name, result.stderr)

    out = root / "facts.json"
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": "disabled"}
    child = subprocess.run(
        [sys.executable, __file__, str(root), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(out.read_text())


def test_trainer_runs_the_patched_copy(trained: dict[str, Any]) -> None:
    assert trained["sparsify_file"].startswith(trained["root"])


def test_default_hookpoints_come_from_the_text_config(trained: dict[str, Any]) -> None:
    assert trained["text_mask"]["hookpoints"] == TEXT_LAYERS


@pytest.mark.parametrize("run", ["text_mask", "all_positions", "kl", "ce"])
def test_coders_train_and_save(trained: dict[str, Any], run: str) -> None:
    facts = trained[run]
    assert facts["saved"] == facts["hookpoints"], "every hookpoint needs a loadable coder"
    assert facts["finite"]
    assert facts["encoder_changed"] == facts["hookpoints"]


def test_token_mask_and_exclude_tokens_pick_the_trained_positions(
    trained: dict[str, Any],
) -> None:
    facts = trained["text_mask"]
    # token_mask drops the image positions, exclude_tokens drops BOS
    expected = BATCH_SIZE * N_TEXT_TOKENS
    assert facts["tokens_per_call"] == {name: [expected] * 2 for name in TEXT_LAYERS}
    # ... and the coders saw the layers' true inputs and outputs at exactly those positions
    assert facts["matches_reference"] == TEXT_LAYERS


def test_without_token_mask_every_position_trains(trained: dict[str, Any]) -> None:
    facts = trained["all_positions"]
    assert facts["hookpoints"] == ["language_model.layers.1.mlp", VISION_MLP]
    seq_len = 1 + N_IMAGE_TOKENS + N_TEXT_TOKENS
    # The vision tower sees one image per row: its patches plus the class token
    assert facts["tokens_per_call"] == {
        VISION_MLP: [BATCH_SIZE * (N_IMAGE_TOKENS + 1)] * 2,
        "language_model.layers.1.mlp": [BATCH_SIZE * seq_len] * 2,
    }
    assert facts["matches_reference"] == facts["hookpoints"]


def test_text_only_datasets_train_as_before(trained: dict[str, Any]) -> None:
    facts = trained["text_only"]
    seq_len = 1 + N_IMAGE_TOKENS + N_TEXT_TOKENS
    # Relative to LlamaForCausalLM.base_model, as upstream names them
    assert facts["hookpoints"] == ["layers.0", "layers.1", "layers.2"]
    assert facts["tokens_per_call"] == {
        name: [BATCH_SIZE * seq_len] * 2 for name in facts["hookpoints"]
    }
    assert facts["matches_reference"] == facts["hookpoints"]
    assert facts["model_calls"] == [["input_ids"]] * 2
    assert facts["saved"] == facts["encoder_changed"] == facts["hookpoints"]


def test_resolve_widths_names_modules_the_dummy_inputs_miss(trained: dict[str, Any]) -> None:
    # Dummy inputs hold no pixel_values, so the vision tower never runs on them
    assert VISION_MLP in trained["dummy_inputs_error"]


@pytest.mark.parametrize("run", ["text_mask", "all_positions", "kl", "ce"])
def test_model_gets_every_input_of_the_batch(trained: dict[str, Any], run: str) -> None:
    expected = ["attention_mask", "input_ids", "pixel_values"]
    if run == "ce":
        expected = sorted([*expected, "labels"])
    # One forward per step; kl adds a clean forward per step, ce one for the initial loss
    n_calls = {"kl": 4, "ce": 3}.get(run, 2)
    assert trained[run]["model_calls"] == [expected] * n_calls


FUSED_ENCODER_PATCH = PATCHES[0].parent / "0005-fused-encoder-preacts-gradient.patch"

AUXK_GRADIENTS = """
import json, sys
import torch
import torch.nn.functional as F
import sparsify.sparse_coder as sc
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.fused_encoder import EncoderOutput

def grads(multi_topk, reference):
    torch.manual_seed(0)
    coder = SparseCoder(16, SparseCoderConfig(num_latents=64, k=4, transcode=True,
                                              multi_topk=multi_topk))
    with torch.no_grad():
        coder.W_dec.normal_()
    x, y = torch.randn(32, 16), torch.randn(32, 16)
    dead = torch.arange(64) % 2 == 0
    fused = sc.fused_encoder
    if reference:  # the same encoder under plain autograd
        def plain(x, weight, bias, k, activation):
            pre = F.relu(F.linear(x, weight, bias))
            values, indices = pre.topk(k, sorted=False)
            return EncoderOutput(values, indices, pre)
        sc.fused_encoder = plain
    try:
        out = coder(x=x, y=y, dead_mask=dead)
        (out.auxk_loss + out.multi_topk_fvu).backward()  # the terms that read pre_acts
    finally:
        sc.fused_encoder = fused
    grad = coder.encoder.weight.grad
    return (torch.zeros_like(coder.encoder.weight) if grad is None else grad), dead

result = {}
for multi_topk in (False, True):
    got, dead = grads(multi_topk, False)
    want, _ = grads(multi_topk, True)
    result[str(multi_topk)] = {
        "max_diff": float((got - want).abs().max()),
        "rows_moved": int((got.abs().sum(1) > 0).sum()),
        "rows_moved_reference": int((want.abs().sum(1) > 0).sum()),
    }
print(json.dumps(result))
"""


def auxk_gradients(root: Path | None) -> dict[str, Any]:
    """Encoder gradients of AuxK (+ MultiTopK) with the installed sparsify (`root` None) or
    the copy at `root`, against the same encoder under plain autograd."""
    env = {**os.environ, "PYTHONPATH": str(root)} if root else dict(os.environ)
    child = subprocess.run(
        [sys.executable, "-c", AUXK_GRADIENTS], env=env, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@requires_git
def test_0005_lets_auxk_and_multi_topk_reach_the_encoders_of_dead_latents(tmp_path: Path) -> None:
    # stock 1.3.3 drops the gradient of pre_acts: these losses move no encoder row at all
    for stock in auxk_gradients(None).values():
        assert stock["rows_moved"] == 0 and stock["rows_moved_reference"] > 0
        assert stock["max_diff"] > 1e-3
    root = pristine_copy(tmp_path)
    assert git_apply(root, FUSED_ENCODER_PATCH).returncode == 0
    for patched in auxk_gradients(root).values():  # autograd's gradients, rows included
        assert patched["max_diff"] < 1e-5
        assert patched["rows_moved"] == patched["rows_moved_reference"] > 0


# -- child process ------------------------------------------------------------------------


def train_with_patched_sparsify(root: Path) -> dict[str, Any]:
    import sparsify
    import torch
    from datasets import Dataset
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
    from sparsify.utils import resolve_widths
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text_config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
    )

    def tiny_llava() -> LlavaForConditionalGeneration:
        torch.manual_seed(0)
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                image_size=28,
                patch_size=14,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
            ),
            text_config=text_config,
            image_token_index=IMAGE_TOKEN,
            vision_feature_layer=-2,
        )
        return LlavaForConditionalGeneration(config).eval()

    def tiny_llama() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(text_config).eval()

    def tiny_batches(token_mask: bool) -> Dataset:
        gen = torch.Generator().manual_seed(0)
        text = torch.randint(IMAGE_TOKEN + 1, 128, (N_ROWS, N_TEXT_TOKENS), generator=gen)
        input_ids = torch.cat(
            [
                torch.full((N_ROWS, 1), BOS),
                torch.full((N_ROWS, N_IMAGE_TOKENS), IMAGE_TOKEN),
                text,
            ],
            dim=1,
        )
        columns = {
            "input_ids": input_ids.tolist(),
            "attention_mask": torch.ones_like(input_ids).tolist(),
            "pixel_values": torch.randn(N_ROWS, 3, 28, 28, generator=gen).tolist(),
        }
        if token_mask:
            columns["token_mask"] = (input_ids != IMAGE_TOKEN).tolist()
        return Dataset.from_dict(columns).with_format("torch")

    def reference(model: torch.nn.Module, batch: dict, mask: torch.Tensor, names: list[str]):
        """Each hookpoint's input and output at the masked positions, by plain hooks."""
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(name: str):
            def hook(_module, args, output):
                x = args[0].flatten(0, 1)
                y = (output[0] if isinstance(output, tuple) else output).flatten(0, 1)
                keep = mask.flatten() if x.shape[0] == mask.numel() else slice(None)
                seen[name] = (x[keep], y[keep])

            return hook

        handles = [
            model.base_model.get_submodule(n).register_forward_hook(record(n)) for n in names
        ]
        with torch.no_grad():
            model(**batch)
        for handle in handles:
            handle.remove()
        return seen

    def train(run: str, dataset: Dataset, **kwargs: Any) -> dict[str, Any]:
        model = tiny_llava() if "pixel_values" in dataset.column_names else tiny_llama()
        cfg = TrainConfig(
            SparseCoderConfig(transcode=True, num_latents=64, k=4),
            batch_size=BATCH_SIZE,
            log_to_wandb=False,
            save_dir=str(root / "checkpoints"),
            run_name=run,
            **kwargs,
        )
        trainer = Trainer(cfg, dataset, model)
        before = {n: sae.encoder.weight.detach().clone() for n, sae in trainer.saes.items()}

        # Record what each coder is trained on: (x, y) per call
        calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in trainer.saes}
        handles = [
            sae.register_forward_pre_hook(
                lambda _m, _a, kw, name=name: calls[name].append(
                    (kw["x"].detach().clone(), kw["y"].detach().clone())
                ),
                with_kwargs=True,
            )
            for name, sae in trainer.saes.items()
        ]
        first = dataset[:BATCH_SIZE]
        ref_mask = torch.isin(first["input_ids"], torch.tensor(cfg.exclude_tokens), invert=True)
        if "token_mask" in first:
            ref_mask &= first["token_mask"].bool()
        ref_inputs = {k: v for k, v in first.items() if k != "token_mask"}
        ref = reference(model, ref_inputs, ref_mask, cfg.hookpoints)

        model_calls: list[list[str]] = []
        model.register_forward_pre_hook(
            lambda _m, _a, kw: model_calls.append(sorted(kw)), with_kwargs=True
        )
        trainer.fit()
        for handle in handles:
            handle.remove()

        # Judge the coders a user gets: loaded from disk with stock loading
        saved, changed, finite, fvu = [], [], True, {}
        for name in cfg.hookpoints:
            folder = Path(cfg.save_dir) / run / name
            if not (folder / "cfg.json").exists():
                continue
            coder = SparseCoder.load_from_disk(folder)
            if (coder.d_in, coder.num_latents) == (32, 64):
                saved.append(name)
            if not torch.equal(before[name], coder.encoder.weight):
                changed.append(name)
            with torch.no_grad():
                fvu[name] = coder(*ref[name]).fvu.item()
            finite &= math.isfinite(fvu[name]) and all(
                bool(torch.isfinite(p).all()) for p in coder.parameters()
            )

        facts: dict[str, Any] = {
            "hookpoints": list(cfg.hookpoints),
            "saved": saved,
            "finite": finite,
            "encoder_changed": changed,
            "fvu": fvu,
            "tokens_per_call": {n: [x.shape[0] for x, _ in c] for n, c in calls.items()},
            "model_calls": model_calls,
        }
        if cfg.loss_fn == "fvu":
            facts["matches_reference"] = [
                n
                for n, c in calls.items()
                if torch.allclose(c[0][0], ref[n][0], atol=1e-6)
                and torch.allclose(c[0][1], ref[n][1], atol=1e-6)
            ]
        return facts

    try:
        resolve_widths(tiny_llava(), [VISION_MLP])
        dummy_inputs_error = ""
    except ValueError as error:
        dummy_inputs_error = str(error)

    return {
        "root": str(root),
        "sparsify_file": sparsify.__file__,
        "dummy_inputs_error": dummy_inputs_error,
        "text_mask": train("text_mask", tiny_batches(token_mask=True), exclude_tokens=[BOS]),
        "all_positions": train(
            "all_positions",
            tiny_batches(token_mask=False),
            hookpoints=[VISION_MLP, "language_model.layers.1.mlp"],
        ),
        # End-to-end losses train on the MLPs (so every decoder gets a gradient at step 1),
        # and ce swaps hookpoints for nn.Identity, which whole layers cannot be
        "kl": train(
            "kl",
            tiny_batches(token_mask=True),
            loss_fn="kl",
            hookpoints=["language_model.layers.*.mlp"],
        ),
        "text_only": train(
            "text_only", tiny_batches(token_mask=False).select_columns(["input_ids"])
        ),
        "ce": train(
            "ce",
            tiny_batches(token_mask=True),
            loss_fn="ce",
            hookpoints=["language_model.layers.*.mlp"],
        ),
    }


if __name__ == "__main__":
    import sparsify

    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    # The patched copy must shadow the installed package
    assert Path(sparsify.__file__).is_relative_to(root), sparsify.__file__
    out.write_text(json.dumps(train_with_patched_sparsify(root)))

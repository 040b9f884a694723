"""Checkpoints: CLT round trip in clt-training's layout, clt-training folders, stock PLT, atomicity."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

from vlm_sparsify.coder_io import CheckpointError, load_coders, load_for_finetune, save_coders
from vlm_sparsify.cross_layer import CrossLayerTranscoder
from vlm_sparsify.per_layer import PerLayerCoders

HOOKS = [f"model.language_model.layers.{i}.mlp" for i in range(4)]
D, LATENTS, K = 8, 32, 4


def acts(seed: int, n: int = 64) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g) for _ in HOOKS], [
        torch.randn(n, D, generator=g) for _ in HOOKS
    ]


def trained_like_clt(cross_layer: int, decoder_dtype=None) -> CrossLayerTranscoder:
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    clt = CrossLayerTranscoder(HOOKS, D, cfg, cross_layer, decoder_dtype=decoder_dtype)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_()
    return clt


def file_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize("decoder_dtype", [None, torch.bfloat16])
def test_clt_round_trip_in_untied_layout(tmp_path: Path, decoder_dtype) -> None:
    clt = trained_like_clt(cross_layer=2, decoder_dtype=decoder_dtype)
    save_coders(clt, tmp_path / "run", config={"cross_layer": 2})
    for p, hook in enumerate(HOOKS):
        n = [2, 2, 2, 1][p]
        folder = tmp_path / "run" / hook
        assert sorted(f.name for f in folder.iterdir()) == ["cfg.json", "sae.safetensors"]
        expected = ["encoder.bias", "encoder.weight"]
        expected += [f"W_decs.{i}" for i in range(n)] + [f"b_decs.{i}" for i in range(n)]
        assert file_keys(folder / "sae.safetensors") == sorted(expected)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert (cfg["n_targets"], cfg["n_sources"], cfg["d_in"]) == (n, [1, 2, 2, 2][p], D)
        assert (cfg["coalesce_topk"], cfg["transcode"], cfg["source_index"]) == ("none", True, p)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"cross_layer": 2}

    loaded = load_coders(tmp_path / "run", hookpoints=HOOKS, d_in=D)
    assert isinstance(loaded, CrossLayerTranscoder)
    assert loaded.cross_layer == 2 and loaded.hookpoints == HOOKS
    assert loaded.sources[0].W_decs[1].dtype == (decoder_dtype or torch.float32)
    xs, ys = acts(0)
    a, b = clt(xs, ys), loaded(xs, ys)
    torch.testing.assert_close(a.fvu, b.fvu, rtol=0, atol=0)
    for pa, pb in zip(a.predictions, b.predictions, strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # no two loaded parameters share storage
    ptrs = [p.data_ptr() for p in loaded.parameters()]
    assert len(set(ptrs)) == len(ptrs)


def write_clt_training_folder(root: Path, post_enc_value: float) -> dict[str, dict]:
    """A run as EleutherAI/clt-training's untied CLT saves it (cross_layer 3 over 4 hookpoints):
    cfg.json = its SparseCoderConfig fields + d_in; state_dict with `W_dec`/`b_dec` aliases of
    index 0 and `post_encs.{i}`."""
    g = torch.Generator().manual_seed(7)
    states = {}
    for p, hook in enumerate(HOOKS):
        n = min(3, 4 - p)
        cfg = {
            "dtype": "none",
            "activation": "topk",
            "expansion_factor": 32,
            "normalize_decoder": True,
            "num_latents": LATENTS,
            "k": K,
            "skip_connection": False,
            "transcode": True,
            "tp_output": True,
            "n_targets": n,
            "n_sources": min(p + 1, 3),
            "normalize_io": False,
            "divide_cross_layer": False,
            "train_post_encoder": True,
            "post_encoder_scale": False,
            "per_source_tied": False,
            "secondary_target_tied": False,
            "coalesce_topk": "none",
            "topk_coalesced": False,
            "use_fp8": False,
            "d_in": D,
        }
        state = {
            "encoder.weight": torch.randn(LATENTS, D, generator=g),
            "encoder.bias": torch.randn(LATENTS, generator=g),
        }
        for i in range(n):
            state[f"W_decs.{i}"] = torch.randn(LATENTS, D, generator=g)
            state[f"b_decs.{i}"] = torch.randn(D, generator=g)
            state[f"post_encs.{i}"] = torch.full((LATENTS,), post_enc_value)
        state["W_dec"] = state["W_decs.0"].clone()
        state["b_dec"] = state["b_decs.0"].clone()
        (root / hook).mkdir(parents=True)
        save_file(state, str(root / hook / "sae.safetensors"))
        (root / hook / "cfg.json").write_text(json.dumps(cfg))
        states[hook] = state
    return states


@pytest.mark.parametrize("post_enc_value", [0.0, 0.25])
def test_clt_training_folder_loads(tmp_path: Path, post_enc_value: float) -> None:
    states = write_clt_training_folder(tmp_path, post_enc_value)
    clt = load_coders(tmp_path)
    assert isinstance(clt, CrossLayerTranscoder)
    assert clt.hookpoints == HOOKS and clt.cross_layer == 3
    assert [clt.n_targets(p) for p in range(4)] == [3, 3, 2, 1]
    # Target 2's prediction by hand: sources 0, 1, 2, each (act + post_enc) * W_dec row + b
    xs, _ = acts(1, n=5)
    expected = torch.zeros(5, D)
    for p in range(3):
        s = states[HOOKS[p]]
        pre = torch.relu(xs[p] @ s["encoder.weight"].T + s["encoder.bias"])
        values, indices = pre.topk(K, dim=-1)
        values = values + post_enc_value * (values > 0)
        dense = torch.zeros(5, LATENTS).scatter(1, indices, values)
        expected += dense @ s[f"W_decs.{2 - p}"] + s[f"b_decs.{2 - p}"]
    encoded = [clt.encode(p, x) for p, x in enumerate(xs)]
    torch.testing.assert_close(clt.predict(encoded, 2), expected, rtol=1e-4, atol=1e-4)
    # Zero offsets are dropped; trained ones are kept and saved again
    assert (clt.sources[0].post_encs is None) == (post_enc_value == 0.0)
    save_coders(clt, tmp_path / "resaved")
    assert ("post_encs.0" in file_keys(tmp_path / "resaved" / HOOKS[0] / "sae.safetensors")) == (
        post_enc_value != 0.0
    )


def test_a_per_layer_folder_among_clt_training_ones_is_named(tmp_path: Path) -> None:
    write_clt_training_folder(tmp_path / "run", post_enc_value=0.0)
    stray = PerLayerCoders(["model.language_model.layers.4.mlp"], D, SparseCoderConfig(k=K))
    save_coders(stray, tmp_path / "stray")
    (tmp_path / "stray" / stray.hookpoints[0]).rename(tmp_path / "run" / stray.hookpoints[0])
    with pytest.raises(CheckpointError, match=r"layers\.4\.mlp': 0\}.*folder is missing or extra"):
        load_coders(tmp_path / "run")


def test_plt_saved_by_us_loads_with_stock_sparsify(tmp_path: Path) -> None:
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    plt = PerLayerCoders(HOOKS, D, cfg)
    xs, ys = acts(2)
    plt.init_biases(xs, ys)
    with torch.no_grad():
        for coder in plt.coders:
            coder.W_dec.normal_()
    save_coders(plt, tmp_path / "run")
    for p, hook in enumerate(HOOKS):
        stock = SparseCoder.load_from_disk(tmp_path / "run" / hook)
        out = stock(xs[p], ys[p])
        torch.testing.assert_close(out.sae_out, plt[hook](xs[p], ys[p]).sae_out, rtol=0, atol=0)
    loaded = load_coders(tmp_path / "run")
    assert isinstance(loaded, PerLayerCoders) and loaded.hookpoints == HOOKS
    torch.testing.assert_close(loaded(xs, ys).fvu, plt(xs, ys).fvu, rtol=0, atol=0)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    run = tmp_path / "run"
    old = trained_like_clt(cross_layer=4)
    save_coders(old, run, write_extra=lambda folder: (folder / "state.json").write_text("{}"))
    assert (run / "state.json").exists()
    before = {f.relative_to(run): f.read_bytes() for f in run.rglob("*") if f.is_file()}

    def crash(folder: Path) -> None:
        (folder / "state.json").write_text('{"half')
        raise OSError("disk full")

    new = trained_like_clt(cross_layer=2)
    with pytest.raises(OSError, match="disk full"):
        save_coders(new, run, write_extra=crash)
    after = {f.relative_to(run): f.read_bytes() for f in run.rglob("*") if f.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary left behind
    assert load_coders(run).cross_layer == 4


def test_mismatched_checkpoints_name_the_file_and_fix(tmp_path: Path) -> None:
    clt = trained_like_clt(cross_layer=2)
    save_coders(clt, tmp_path / "run")
    with pytest.raises(CheckpointError, match="were requested"):
        load_coders(tmp_path / "run", hookpoints=HOOKS[:3])
    # one width, not a {hookpoint: width} dict of every folder in file-system order
    with pytest.raises(CheckpointError, match=rf"has d_in {D} but the model's MLP width is 16"):
        load_coders(tmp_path / "run", d_in=16)
    weights = tmp_path / "run" / HOOKS[1] / "sae.safetensors"
    save_file({"encoder.weight": torch.zeros(LATENTS, D + 1)}, str(weights))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp/sae\.safetensors: missing"):
        load_coders(tmp_path / "run")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"missing .*layers\.1\.mlp/sae\.safetensors"):
        load_coders(tmp_path / "run")
    for coders in (clt, PerLayerCoders(HOOKS, D, SparseCoderConfig(num_latents=LATENTS, k=K))):
        save_coders(coders, tmp_path / "run")
        (tmp_path / "run" / HOOKS[1] / "cfg.json").unlink()  # not one coder fewer in silence
        with pytest.raises(CheckpointError, match=r"missing .*layers\.1\.mlp/cfg\.json beside"):
            load_coders(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_coders(tmp_path / "nowhere")


def test_unreadable_files_are_one_error_naming_the_file(tmp_path: Path) -> None:
    for coders in (
        trained_like_clt(cross_layer=2),
        PerLayerCoders(HOOKS, D, SparseCoderConfig(num_latents=LATENTS, k=K)),
    ):
        save_coders(coders, tmp_path / "run")
        weights = tmp_path / "run" / HOOKS[1] / "sae.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        with pytest.raises(ValueError, match=rf"cannot read {weights}: it is not a readable"):
            load_coders(tmp_path / "run")
    save_coders(trained_like_clt(cross_layer=2), tmp_path / "run")
    cfg_path = tmp_path / "run" / HOOKS[2] / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "k": LATENTS + 1}))
    with pytest.raises(CheckpointError, match=rf"{cfg_path}: k 33 must be between 1 and .* 32"):
        load_coders(tmp_path / "run")
    cfg_path.write_text('{"d_in": 8,')
    with pytest.raises(ValueError, match=rf"{cfg_path} is not valid JSON: Expecting"):
        load_coders(tmp_path / "run")


def test_a_checkpoint_is_on_disk_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    save_coders(trained_like_clt(cross_layer=2), tmp_path / "run")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_coders(trained_like_clt(cross_layer=2), tmp_path / "run", config={"k": K})
    first_rename = events.index(next(e for e in events if e[0] == "replace"))
    synced = {path for kind, path in events[:first_rename] if kind == "fsync"}
    tmp = str(tmp_path / f".run.tmp-{os.getpid()}")
    saved = {str(p).replace(str(tmp_path / "run"), tmp) for p in (tmp_path / "run").rglob("*")}
    assert saved | {tmp} <= synced  # every file and folder, before the old one moves aside
    assert events[-1] == ("fsync", str(tmp_path))  # the renames themselves


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    clt = trained_like_clt(cross_layer=1)
    save_coders(clt, tmp_path / "run")
    path = tmp_path / "run" / HOOKS[0] / "sae.safetensors"
    state = {k: v.clone() for k, v in clt.sources[0].state_dict().items()}
    state["W_decs.0"] = torch.zeros(LATENTS, D + 2)
    save_file(state, str(path))
    with pytest.raises(
        CheckpointError, match=r"W_decs\.0 has shape \[32, 10\], expected \[32, 8\]"
    ):
        load_coders(tmp_path / "run")


def test_folders_of_a_killed_save_are_cleaned_or_put_back(tmp_path: Path) -> None:
    import subprocess
    import sys

    from vlm_sparsify.coder_io import clean_stale_folders

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    run_dir = tmp_path / "run"
    for name in (f".run.tmp-{dead}", f".run.old-{dead}", ".run.tmp-notes", ".other.tmp-1"):
        (tmp_path / name).mkdir()
    (tmp_path / f".run.old-{dead}" / "config.json").write_text("{}")
    live = tmp_path / f".run.tmp-{os.getppid()}"  # a process still writing
    live.mkdir()
    notes = clean_stale_folders(run_dir)
    # RUN was missing: the kill came between the renames, the .old folder is the checkpoint
    assert (run_dir / "config.json").is_file() and len(notes) == 2
    assert notes[0].startswith(f"restored {run_dir} from .run.old-{dead}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.tmp-1", ".run.tmp-notes", live.name, "run"]
    )
    (tmp_path / f".run.old-{dead}").mkdir()  # beside an existing RUN: removed
    assert clean_stale_folders(run_dir) == [
        f"removed {tmp_path / f'.run.old-{dead}'} (left by process {dead}, killed while saving)"
    ]


def test_a_killed_saves_folders_named_with_our_own_pid_are_stale(tmp_path: Path) -> None:
    # a container restarted after a kill between the two renames: the run is PID 1 again, and
    # its checkpoint waits at .RUN.old-1 (RUN missing), the new one at .RUN.tmp-1
    from vlm_sparsify.coder_io import clean_stale_folders

    run_dir = tmp_path / "run"
    old, tmp = tmp_path / f".run.old-{os.getpid()}", tmp_path / f".run.tmp-{os.getpid()}"
    for folder in (old, tmp):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"folder": folder.name}))
    notes = clean_stale_folders(run_dir)
    assert json.loads((run_dir / "config.json").read_text()) == {"folder": old.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and len(notes) == 2


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_checkpoint_files_get_the_umask_s_permissions(tmp_path: Path, kind: str) -> None:
    """safetensors writes 0600 files; colleagues sharing a cluster must read the coders."""
    cfg = SparseCoderConfig(num_latents=8, k=2, transcode=True)
    hookpoints = ["a.mlp", "b.mlp"]
    coders = (
        CrossLayerTranscoder(hookpoints, 4, cfg, 2)
        if kind == "clt"
        else PerLayerCoders(hookpoints, 4, cfg)
    )
    mask = os.umask(0o027)  # group may read, others not: not the usual 0o022
    try:
        run = save_coders(coders, tmp_path / "run", config={"k": 2})
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert "sae.safetensors" in modes and set(modes.values()) == {0o640}, modes


def test_per_layer_coders_load_in_the_order_the_caller_trained_them(tmp_path: Path) -> None:
    # their folders carry no order: `--finetune` of a self_attn + mlp run (forward order) was
    # refused as "other hookpoints" because the folders' natural sort puts mlp first
    hooks = ["model.language_model.layers.0.self_attn", "model.language_model.layers.0.mlp"]
    coders = PerLayerCoders(hooks, D, SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True))
    save_coders(coders, tmp_path / "run")
    assert load_coders(tmp_path / "run", hookpoints=hooks).hookpoints == hooks
    load_for_finetune(coders, tmp_path / "run", "cpu")
    assert load_coders(tmp_path / "run").hookpoints == hooks[::-1]  # no order asked: natural sort
    with pytest.raises(CheckpointError, match="were requested"):
        load_coders(tmp_path / "run", hookpoints=hooks[:1])


def test_folders_a_killed_write_left_inside_a_run_are_no_hookpoints(tmp_path: Path) -> None:
    # RUN-best replaces a per-layer hookpoint's folder alone (`.<hookpoint>.tmp-<pid>`, then
    # `.<hookpoint>.old-<pid>`, inside RUN-best): a kill left them, loaded as two more coders
    from vlm_sparsify.coder_io import clean_stale_children

    run = tmp_path / "run-best"
    coders = PerLayerCoders(HOOKS, D, SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True))
    save_coders(coders, run)
    dead = 2**22 + 1  # above Linux's pid_max: no such process
    shutil.copytree(run / HOOKS[0], run / f".{HOOKS[0]}.tmp-{dead}")
    assert load_coders(run).hookpoints == HOOKS
    (run / HOOKS[1]).rename(run / f".{HOOKS[1]}.old-{dead}")  # killed between the two renames
    with pytest.raises(CheckpointError, match=rf"{HOOKS[1]} is missing: .*\.old-{dead} holds"):
        load_coders(run)
    notes = clean_stale_children(run)  # what the training CLI does when it starts again
    assert len(notes) == 2 and sorted(p.name for p in run.iterdir()) == HOOKS
    assert load_coders(run).hookpoints == HOOKS


def test_a_per_layer_file_that_disagrees_with_its_cfg_is_one_line_naming_the_tensor(
    tmp_path: Path,
) -> None:
    coders = PerLayerCoders(HOOKS, D, SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True))
    save_coders(coders, tmp_path / "run")
    cfg_path = tmp_path / "run" / HOOKS[1] / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "skip_connection": True}))
    with pytest.raises(CheckpointError) as caught:
        load_coders(tmp_path / "run")
    message = str(caught.value)  # the command-line tools print it as their one line
    assert "\n" not in message and 'Missing key(s) in state_dict: "W_skip"' in message, message


def test_finetune_from_a_clt_with_post_encoder_offsets_names_them(tmp_path: Path) -> None:
    write_clt_training_folder(tmp_path / "run", post_enc_value=0.25)
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    ours = CrossLayerTranscoder(HOOKS, D, cfg, 3)
    # torch's first line alone ("Error(s) in loading state_dict for ...:") named nothing
    with pytest.raises(CheckpointError, match=r"cannot fine-tune .*post_encs\.0") as caught:
        load_for_finetune(ours, tmp_path / "run", "cpu")
    assert "\n" not in str(caught.value)


def test_one_coders_folder_is_told_to_pass_the_run_above_it(tmp_path: Path) -> None:
    # sparsify's load_from_disk takes RUN/<hookpoint>; load_coders said "not the save_dir above it"
    coders = PerLayerCoders(HOOKS, D, SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True))
    save_coders(coders, tmp_path / "run")
    with pytest.raises(CheckpointError, match="is one coder's folder: pass the run folder above"):
        load_coders(tmp_path / "run" / HOOKS[0])


def test_loading_casts_decoders_to_dtype_unless_decoder_dtype_says_otherwise(
    tmp_path: Path,
) -> None:
    save_coders(trained_like_clt(cross_layer=2), tmp_path / "run")
    as_double = load_coders(tmp_path / "run", dtype=torch.float64)
    assert {p.dtype for p in as_double.parameters()} == {torch.float64}
    mixed = load_coders(tmp_path / "run", decoder_dtype=torch.bfloat16)
    assert mixed.sources[1].W_decs[1].dtype == torch.bfloat16
    assert (
        mixed.sources[1].encoder.weight.dtype == mixed.sources[1].b_decs[1].dtype == torch.float32
    )


def test_post_encoder_offsets_and_scales_round_trip(tmp_path: Path) -> None:
    clt = trained_like_clt(cross_layer=2)
    clt.sources[1].add_post_encoder(scales=True)
    with torch.no_grad():
        for param in (*clt.sources[1].post_encs, *clt.sources[1].post_enc_scales):
            param.uniform_(0.5, 1.5)
    save_coders(clt, tmp_path / "run")
    cfgs = [json.loads((tmp_path / "run" / h / "cfg.json").read_text()) for h in HOOKS]
    assert [cfg["post_encoder_scale"] for cfg in cfgs] == [False, True, False, False]
    loaded = load_coders(tmp_path / "run")
    assert [loaded.has_post_encoder_scale(p) for p in range(4)] == [False, True, False, False]
    xs, ys = acts(1)
    torch.testing.assert_close(loaded(xs, ys).predictions, clt(xs, ys).predictions)


def test_a_clt_reaching_beyond_its_last_layer_keeps_its_cross_layer(tmp_path: Path) -> None:
    """cross_layer 16 over 4 hookpoints has the targets of cross_layer 4, but a fine-tune with
    --cross_layer 16 must find 16."""
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    save_coders(CrossLayerTranscoder(HOOKS, D, cfg, 16), tmp_path / "run")
    assert load_coders(tmp_path / "run").cross_layer == 16


def test_folders_without_a_listed_order_load_in_natural_order(tmp_path: Path) -> None:
    hooks = [f"model.language_model.layers.{i}.mlp" for i in (2, 10)]
    cfg = SparseCoderConfig(num_latents=LATENTS, k=K, transcode=True)
    save_coders(PerLayerCoders(hooks, D, cfg), tmp_path / "run")
    assert load_coders(tmp_path / "run").hookpoints == hooks


def test_a_clt_missing_a_listed_hookpoint_folder_is_named(tmp_path: Path) -> None:
    save_coders(trained_like_clt(cross_layer=2), tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / HOOKS[3])
    with pytest.raises(CheckpointError, match="lists hookpoints .* the run folder is incomplete"):
        load_coders(tmp_path / "run")


def test_a_clt_is_refused_in_another_hookpoint_order(tmp_path: Path) -> None:
    """A CLT's sources reach the next ones: its order is its own (per-layer coders take the
    caller's)."""
    save_coders(trained_like_clt(cross_layer=2), tmp_path / "run")
    with pytest.raises(CheckpointError, match="were requested"):
        load_coders(tmp_path / "run", hookpoints=HOOKS[::-1])


def test_k_may_equal_the_latents_and_expansion_factor_counts_them(tmp_path: Path) -> None:
    from vlm_sparsify.coder_io import _check_cfg

    path = tmp_path / "cfg.json"
    _check_cfg(path, {"d_in": 4, "k": 8, "num_latents": 8})
    _check_cfg(path, {"d_in": 4, "k": 32, "num_latents": 0, "expansion_factor": 8})
    with pytest.raises(CheckpointError, match="k 33 must be between 1 and the coder's 32 latents"):
        _check_cfg(path, {"d_in": 4, "k": 33, "num_latents": 0, "expansion_factor": 8})


def test_a_save_killed_between_its_renames_leaves_the_old_checkpoint_to_put_back(
    tmp_path: Path, monkeypatch
) -> None:
    from vlm_sparsify import coder_io

    old = trained_like_clt(cross_layer=2)
    save_coders(old, tmp_path / "run")
    real_replace = os.replace

    def killed_at_the_second_rename(src, dst) -> None:
        if Path(src).name.startswith(".run.tmp-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(coder_io.os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_coders(trained_like_clt(cross_layer=1), tmp_path / "run")
    monkeypatch.undo()
    assert not (tmp_path / "run").exists()
    (note,) = coder_io.clean_stale_folders(tmp_path / "run")  # as the next save of RUN does
    assert note.startswith(f"restored {tmp_path / 'run'}")
    xs, ys = acts(2)
    torch.testing.assert_close(load_coders(tmp_path / "run")(xs, ys).fvu, old(xs, ys).fvu)


@pytest.mark.parametrize("change", ["num_latents", "skip_connection"])
def test_finetune_from_coders_of_another_shape_names_it(tmp_path: Path, change: str) -> None:
    save_coders(trained_like_clt(cross_layer=2), tmp_path / "run")
    options = {"num_latents": 2 * LATENTS} if change == "num_latents" else {"skip_connection": True}
    cfg = SparseCoderConfig(**{"num_latents": LATENTS, "k": K, "transcode": True} | options)
    with pytest.raises(CheckpointError, match=f"cannot fine-tune .* {change} "):
        load_for_finetune(CrossLayerTranscoder(HOOKS, D, cfg, 2), tmp_path / "run", "cpu")


def test_a_sharded_read_checks_cross_layer_and_post_encoder_offsets(tmp_path: Path) -> None:
    from vlm_sparsify.coder_io import read_clt_tensors

    clt = trained_like_clt(cross_layer=2)
    save_coders(clt, tmp_path / "run")
    got = read_clt_tensors(tmp_path / "run", HOOKS, D, 2, {1: ["W_decs.1"]})
    assert torch.equal(got[1]["W_decs.1"], clt.sources[1].W_decs[1].detach())
    with pytest.raises(CheckpointError, match="cross_layer 2, not 3; pass --cross_layer 2"):
        read_clt_tensors(tmp_path / "run", HOOKS, D, 3, {1: ["W_decs.1"]})
    clt.sources[0].add_post_encoder(scales=False)
    with torch.no_grad():
        clt.sources[0].post_encs[0].fill_(0.25)
    save_coders(clt, tmp_path / "run")
    with pytest.raises(CheckpointError, match="per-target activation offsets"):
        read_clt_tensors(tmp_path / "run", HOOKS, D, 2, {0: ["W_decs.0"]})


@pytest.mark.parametrize(
    ("option", "value"),
    [("normalize_io", True), ("per_source_tied", True), ("activation", "relu")],
)
def test_clt_training_options_we_do_not_implement_are_named(
    tmp_path: Path, option: str, value
) -> None:
    save_coders(trained_like_clt(cross_layer=2), tmp_path / "run")
    path = tmp_path / "run" / HOOKS[1] / "cfg.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {option: value}))
    with pytest.raises(CheckpointError, match=f"{option}={value!r} is not supported"):
        load_coders(tmp_path / "run")

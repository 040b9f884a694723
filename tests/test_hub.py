"""`python -m vlm_sparsify.hub RUN REPO`: what goes up, and what is refused before anything does."""

from pathlib import Path

import pytest
from sparsify import SparseCoderConfig

import vlm_sparsify.hub as hub
from vlm_sparsify.coder_io import CheckpointError, save_coders
from vlm_sparsify.per_layer import PerLayerCoders

HOOKS = [f"model.language_model.layers.{i}.mlp" for i in range(2)]


def test_the_save_dir_above_a_run_is_refused_before_anything_is_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploaded: dict[str, list[str]] = {}

    class Recorder:
        def __init__(self, token: str | None = None):
            pass

        def create_repo(self, repo: str, exist_ok: bool = False) -> None:
            pass

        def upload_folder(self, repo_id: str, folder_path: str, allow_patterns: list[str]) -> None:
            uploaded[repo_id] = allow_patterns

    monkeypatch.setattr(hub, "HfApi", Recorder)
    run_dir = tmp_path / "checkpoints" / "run"
    coders = PerLayerCoders(HOOKS, 8, SparseCoderConfig(num_latents=16, k=2, transcode=True))
    save_coders(coders, run_dir, write_extra=lambda folder: (folder / "state.pt").write_bytes(b""))
    # the save_dir's runs would go up with their resume files: `state.pt` matches only at the top
    with pytest.raises(CheckpointError, match="holds no <hookpoint>/cfg.json"):
        hub.main([str(tmp_path / "checkpoints"), "me/coders"])
    assert uploaded == {}
    hub.main([str(run_dir), "me/coders"])
    assert sorted(uploaded["me/coders"]) == sorted(
        f"{hook}/{name}" for hook in HOOKS for name in ("cfg.json", "sae.safetensors")
    )


def test_resume_files_in_sub_folders_stay_behind(tmp_path: Path) -> None:
    # stock sparsify's --save_best writes RUN/best/<hookpoint>/ with its own resume files
    run_dir = tmp_path / "run"
    coders = PerLayerCoders(HOOKS, 8, SparseCoderConfig(num_latents=16, k=2, transcode=True))
    save_coders(coders, run_dir)
    save_coders(coders, run_dir / "best" / HOOKS[0])
    for folder in (run_dir, run_dir / "best" / HOOKS[0]):
        for name in ("state.pt", "rank_0_state.pt", "optimizer_0.pt", "lr_scheduler_0.pt"):
            (folder / name).write_bytes(b"")
    # a sharded run's per-process resume files (sharded_checkpoint: rank<r>-<name>)
    for name in ("rank0-optimizer_0.pt", "rank1-shard.json", "rank0-train_params.safetensors"):
        (run_dir / name).write_bytes(b"")
    (run_dir / "train_params.safetensors").write_bytes(b"")
    files = hub.hub_files(run_dir)
    assert not [f for f in files if f.endswith(".pt") or "rank" in f or "train_params" in f], files
    assert f"best/{HOOKS[0]}/{HOOKS[0]}/sae.safetensors" in files


def test_a_repository_name_the_hub_cannot_hold_is_named_before_anything(tmp_path, tiny_llava_dir):
    # it failed at the upload, as 'check the network and the token', and with --push_to_hub
    # only after the whole training
    from tests.test_training import cli
    from vlm_sparsify.__main__ import run

    for repo in ("my coders", "me/my/coders"):
        with pytest.raises(ValueError, match=f"'{repo}' is not a Hub repository id .*user/name"):
            hub.main([str(tmp_path / "nothing"), repo])
        with pytest.raises(ValueError, match=f"--push_to_hub '{repo}' is not a Hub repository"):
            run(cli(tiny_llava_dir, tmp_path, "r", "--push_to_hub", repo))
    assert not any(tmp_path.iterdir())


def test_a_failed_upload_never_shows_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    class Refusing:
        def __init__(self, token: str | None = None):
            self.token = token

        def create_repo(self, repo: str, exist_ok: bool = False) -> None:
            raise PermissionError(f"401 Unauthorized: token {self.token} is invalid")

    monkeypatch.setattr(hub, "HfApi", Refusing)
    with pytest.raises(hub.HubUploadError) as err:
        hub.push_to_hub(tmp_path, "me/coders", token="hf_secret123")
    assert "hf_secret123" not in str(err.value) and "hf_secret123" not in err.value.reason
    assert "token *** is invalid" in err.value.reason and str(tmp_path) in str(err.value)

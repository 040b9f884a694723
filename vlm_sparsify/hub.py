"""Share a run on the Hugging Face Hub: SAE / PLT runs in the layout sparsify's `load_many`
reads, a CLT in clt-training's (`coder_io.load_coders(snapshot_download(REPO))` reads both;
docs/checkpoints.md).

`python -m vlm_sparsify.hub RUN REPO` uploads a finished run (what `--push_to_hub REPO` does at
the end of training), with the token of HF_TOKEN or `hf auth login`.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from vlm_sparsify.cli import run_cli
from vlm_sparsify.coder_io import run_hookpoints

TRAINING_ONLY = [
    "state.pt",
    "optimizer_*.pt",
    "lr_scheduler_*.pt",
    "train_params.safetensors",
    "rank*-*",  # a sharded run's per-process resume files
    "rank_*_state.pt",  # stock sparsify's per-process state (a stock run uploaded with this)
]
"""Resume-only files a shared copy leaves out (optimizer state is large and private), at any
depth."""


class HubUploadError(OSError):
    """The upload failed (no network, no permission, ...); the run folder is as it was.
    `reason` is the failure itself, in one line and without the token."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def check_repo_id(repo: str, flag: str = "") -> None:
    """`repo` is a name the Hub can hold (`namespace/name` or `name`), checked before any work:
    the upload that would refuse it comes at the end of a training."""
    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise ValueError(
            f"{flag + ' ' if flag else ''}'{repo}' is not a Hub repository id "
            f"({str(err).strip().splitlines()[0]}); give one such as user/name"
        ) from None


def hub_files(run_dir: Path) -> list[str]:
    """Relative paths `push_to_hub` uploads, chosen by huggingface_hub's own filter."""
    files = sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*") if p.is_file())
    # in sub-folders too: stock sparsify's --save_best writes RUN/best/<hookpoint>/ with its own
    patterns = [*TRAINING_ONLY, *(f"*/{pattern}" for pattern in TRAINING_ONLY)]
    return list(filter_repo_objects(files, ignore_patterns=patterns))


def push_to_hub(run_dir: Path, repo: str, token: str | None = None) -> str:
    """Upload coders, cfg.json files, config.json and summary.json; returns the repo URL. Any
    failure is one HubUploadError saying the run is saved and how to upload it later (the
    token never appears in it)."""
    try:
        api = HfApi(token=token)
        api.create_repo(repo, exist_ok=True)
        files = [glob.escape(name) for name in hub_files(run_dir)]  # exactly these, no pattern
        api.upload_folder(repo_id=repo, folder_path=str(run_dir), allow_patterns=files)
    except Exception as err:  # whatever went wrong, the run on disk is intact
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if token:
            text = text.replace(token, "***")
        reason = f"{type(err).__name__}: {text}"
        raise HubUploadError(
            f"the run is saved in {run_dir}, but uploading it to {repo} failed ({reason}); "
            f"upload it later with `python -m vlm_sparsify.hub {run_dir} {repo}` (token: "
            "HF_TOKEN or `hf auth login`)",
            reason,
        ) from None
    return f"https://huggingface.co/{repo}"


def main(argv: list[str] | None = None) -> str:
    """`python -m vlm_sparsify.hub RUN REPO`: upload a finished run folder."""
    parser = argparse.ArgumentParser(
        prog="python -m vlm_sparsify.hub",
        description="Upload a run folder (coders, configs, summary; no optimizer state) to a "
        "Hub repository, with the token of HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("run", type=Path, metavar="RUN", help="the run folder (SAVE_DIR/RUN_NAME)")
    parser.add_argument("repo", metavar="REPO", help="the Hub repository, e.g. user/my-coders")
    args = parser.parse_args(argv)
    check_repo_id(args.repo)
    run_hookpoints(args.run)  # never the save_dir: its runs' resume files would go up
    try:
        url = push_to_hub(args.run, args.repo, os.environ.get("HF_TOKEN"))
    except HubUploadError as err:  # its "upload it later" would name this very command
        raise HubUploadError(
            f"uploading {args.run} to {args.repo} failed ({err.reason}); check the network and "
            "the token (HF_TOKEN or `hf auth login`), then run this command again",
            err.reason,
        ) from None
    print(f"Uploaded {args.run} to {url}")
    return url


if __name__ == "__main__":
    run_cli(main)

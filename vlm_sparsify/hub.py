"""Share a run on the Hugging Face Hub in the layout sparsify's `SparseCoder.load_many` reads."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

TRAINING_ONLY = [
    "state.pt",
    "optimizer_*.pt",
    "lr_scheduler_*.pt",
    "train_params.safetensors",
    "rank*-*",  # a sharded run's per-process resume files
]
"""Resume-only files a shared copy leaves out (optimizer state is large and private)."""


def hub_files(run_dir: Path) -> list[str]:
    """Relative paths `push_to_hub` uploads, chosen by huggingface_hub's own filter."""
    files = sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=TRAINING_ONLY))


def push_to_hub(run_dir: Path, repo: str, token: str | None = None) -> str:
    """Upload coders, cfg.json files, config.json and summary.json; returns the repo URL."""
    api = HfApi(token=token)
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(run_dir), ignore_patterns=TRAINING_ONLY)
    return f"https://huggingface.co/{repo}"

"""The resumable part of a checkpoint: optimizer and scheduler state, step, live parameters.

Coders are saved at schedule-free's averaged point (what users load); resuming needs the live
(train-mode) parameters instead, so they are stored beside, in `train_params.safetensors`.
Everything is loaded with `weights_only=True` or safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlm_sparsify.files import load_safetensors, load_torch
from vlm_sparsify.training import Trainer, TrainingState
from vlm_sparsify.training_plot import plot_trainer

STATE_FILE = "state.pt"
PARAMS_FILE = "train_params.safetensors"
SUMMARY_FILE = "summary.json"


def live_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in trainer.coders.state_dict().items()}


def write_training_state(
    folder: Path, trainer: Trainer, params: dict[str, torch.Tensor], summary: list[dict]
) -> None:
    write_step_state(folder, trainer, summary)
    write_resume_files(folder, trainer, params)


def write_step_state(folder: Path, trainer: Trainer, summary: list[dict]) -> None:
    """The step, counters and histories (`state.pt`), the summary table and `training.png`."""
    torch.save(trainer.state.to_dict(), folder / STATE_FILE)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    plot_trainer(trainer, folder, summary)


def write_resume_files(
    folder: Path, trainer: Trainer, params: dict[str, torch.Tensor], prefix: str = ""
) -> None:
    """Optimizer and scheduler state and the live parameters (a sharded run: this rank's, its
    files named `rank{r}-...`: flat, so stock sparsify's `load_many` sees only coder folders)."""
    for i, opt in enumerate(trainer.optimizers):
        torch.save(opt.state_dict(), folder / f"{prefix}optimizer_{i}.pt")
    for i, scheduler in enumerate(trainer.schedulers):
        torch.save(scheduler.state_dict(), folder / f"{prefix}lr_scheduler_{i}.pt")
    save_file(params, str(folder / f"{prefix}{PARAMS_FILE}"))


def read_state(
    run_dir: Path, batch_size: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """`run_dir`'s `state.pt`, as `TrainingState.from_dict` takes it."""
    if not (run_dir / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"cannot resume: {run_dir} has no {STATE_FILE}; run without --resume to start anew"
        )
    state: dict[str, Any] = load_torch(run_dir / STATE_FILE, map_location=device)
    # saved before the count: such runs resumed at the start of their next batch
    state.setdefault("examples_seen", state["batches_seen"] * batch_size)
    return state


def read_training_state(run_dir: Path, trainer: Trainer, prefix: str = "") -> None:
    """Restore `trainer` from `run_dir` so that it continues exactly where it stopped (`prefix`:
    of this process's parameter and optimizer files in a sharded run)."""
    device = next(trainer.coders.parameters()).device
    state = read_state(run_dir, trainer.cfg.batch_size, device)
    params = load_safetensors(run_dir / f"{prefix}{PARAMS_FILE}", device)
    expected = trainer.coders.state_dict()
    mismatched = sorted(
        k
        for k in expected.keys() | params.keys()
        if k not in params or k not in expected or params[k].shape != expected[k].shape
    )
    if mismatched:
        raise ValueError(
            f"cannot resume from {run_dir}: its coders differ from this run's settings "
            f"(first differing tensors: {mismatched[:4]}); use the same flags or a new --run_name"
        )
    trainer.coders.load_state_dict(params)
    trainer.state = TrainingState.from_dict(state)
    for i, opt in enumerate(trainer.optimizers):
        opt.load_state_dict(load_torch(run_dir / f"{prefix}optimizer_{i}.pt", device))
    for i, scheduler in enumerate(trainer.schedulers):
        scheduler.load_state_dict(load_torch(run_dir / f"{prefix}lr_scheduler_{i}.pt", device))

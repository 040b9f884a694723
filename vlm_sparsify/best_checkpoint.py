"""`--save_best`: the coders as they were at the checkpoint where their loss was lowest.

As in sparsify, at each checkpoint the mean loss over the steps since the previous one is
compared with the best so far. Per-layer coders trained on FVU each keep their own best (a
hookpoint's folder is replaced alone); a CLT (each target's prediction sums several sources) or
an end-to-end run is kept whole, on its summed loss. They go to `SAVE_DIR/RUN-best/`, a run
folder of its own that loads like RUN (sparsify writes `RUN/best`, but RUN is replaced whole at
every checkpoint here). The best losses so far are part of the resumable state.

What improved is copied from the checkpoint just written to RUN (the same averaged weights,
already assembled on rank 0 when the coders are sharded), so the coders are written once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vlm_sparsify.coder_io import (
    RUN_CONFIG_FILE,
    atomic_dir,
    clean_stale_children,
    clean_stale_folders,
)
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.recipe import RUN_RECIPE_FILE
from vlm_sparsify.sharded_per_layer import ShardedPerLayer
from vlm_sparsify.training import Trainer


def best_dir(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-best"


def clean_after_kill(run_dir: Path) -> list[str]:
    """What killed checkpoint writes left (`coder_io.clean_stale_folders`) beside RUN and
    RUN-best, and inside RUN-best beside its hookpoint folders; returns what was done."""
    best = best_dir(run_dir)
    return clean_stale_folders(run_dir) + clean_stale_folders(best) + clean_stale_children(best)


def recent_losses(trainer: Trainer) -> dict[str, float]:
    """Mean loss since the last check: per hookpoint for per-layer FVU coders, else one ("")."""
    state = trainer.state
    n = state.global_step - state.best_checked_step
    if n <= 0:
        return {}
    if trainer.cfg.loss_fn != "fvu":
        window = state.loss_history[-n:]
        return {"": sum(window) / len(window)}
    fvu = state.fvu_history[-n:]
    if isinstance(trainer.coders, PerLayerCoders | ShardedPerLayer):
        hookpoints = trainer.coders.hookpoints
        return {h: sum(step[i] for step in fvu) / n for i, h in enumerate(hookpoints)}
    return {"": sum(sum(step) for step in fvu) / n}


def improved_since_last_check(trainer: Trainer) -> list[str]:
    """Every rank calls this before writing a checkpoint (the best losses are part of it):
    the hookpoints whose recent loss is the lowest so far ("" = the whole coder set)."""
    state = trainer.state
    losses = recent_losses(trainer)
    state.best_checked_step = state.global_step
    improved = [k for k, v in losses.items() if v < state.best_loss.get(k, float("inf"))]
    state.best_loss.update({k: losses[k] for k in improved})
    return improved


def keep_best(run_dir: Path, hookpoints: list[str], improved: list[str]) -> None:
    """Copy what improved from the checkpoint in `run_dir` to `RUN-best` (one process): a
    per-layer hookpoint's folder replaced alone, a whole coder set replaced whole, and so is
    `RUN-best` when every hookpoint improved (a run's first check: nothing of an earlier run
    under the same name, `--overwrite`, stays in it)."""
    if not improved:
        return
    out = best_dir(run_dir)
    if improved == [""] or set(improved) == set(hookpoints):
        with atomic_dir(out) as tmp:
            for hookpoint in hookpoints:
                shutil.copytree(run_dir / hookpoint, tmp / hookpoint)
            for name in (RUN_CONFIG_FILE, RUN_RECIPE_FILE):
                if (run_dir / name).is_file():
                    shutil.copy2(run_dir / name, tmp / name)
        return
    out.mkdir(parents=True, exist_ok=True)
    for hookpoint in improved:
        with atomic_dir(out / hookpoint) as tmp:
            shutil.copytree(run_dir / hookpoint, tmp, dirs_exist_ok=True)
    for name in (RUN_CONFIG_FILE, RUN_RECIPE_FILE):
        if (run_dir / name).is_file():
            tmp_file = out / f".{name}.tmp"
            shutil.copy2(run_dir / name, tmp_file)
            os.replace(tmp_file, out / name)

"""`--save_best`: the coders as they were at the checkpoint where their loss was lowest.

As in sparsify, at each checkpoint the mean loss over the steps since the previous one is
compared with the best so far. Per-layer coders trained on FVU each keep their own best (a
hookpoint's folder is replaced alone); a CLT (each target's prediction sums several sources) or
an end-to-end run is kept whole, on its summed loss. They go to `SAVE_DIR/RUN-best/`, a run
folder of its own that loads like RUN (sparsify writes `RUN/best`, but RUN is replaced whole at
every checkpoint here). The best losses so far are part of the resumable state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from vlm_sparsify.coder_io import RUN_CONFIG_FILE, replace_dir, save_coders
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.sharded_checkpoint import write_sharded_checkpoint
from vlm_sparsify.sharded_clt import ShardedCLT
from vlm_sparsify.sharded_per_layer import ShardedPerLayer
from vlm_sparsify.training import Trainer, eval_weights


def best_dir(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-best"


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


def save_best(trainer: Trainer, run_dir: Path, config: dict[str, Any]) -> list[str]:
    """Every rank calls this at each checkpoint; returns what improved ("" = the whole set)."""
    state = trainer.state
    losses = recent_losses(trainer)
    state.best_checked_step = state.global_step
    improved = [k for k, v in losses.items() if v < state.best_loss.get(k, float("inf"))]
    state.best_loss.update({k: losses[k] for k in improved})
    if not improved:
        return []
    out = best_dir(run_dir)
    if isinstance(trainer.coders, ShardedCLT):  # every rank holds a share
        write_sharded_checkpoint(trainer, out, config, resume_files=False)
        return improved
    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    if isinstance(trainer.coders, ShardedPerLayer):  # each coder written by its process
        coders = trainer.coders
        mine = [h for h in improved if coders.hookpoints.index(h) in coders.owned]
        with eval_weights(trainer.optimizers):
            _replace_coders(coders.local, out, mine, config if rank_zero else None)
        if dist.is_initialized():
            dist.barrier()
        return improved
    if rank_zero:
        with eval_weights(trainer.optimizers):  # the averaged weights users load
            if improved == [""]:
                save_coders(trainer.coders, out, config=config)
            else:
                _replace_coders(trainer.coders, out, improved, config)
    if dist.is_initialized():
        dist.barrier()
    return improved


def _replace_coders(
    coders: PerLayerCoders, out: Path, hookpoints: list[str], config: dict[str, Any] | None
) -> None:
    """Each improved hookpoint's folder replaced on its own (written beside, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    for hookpoint in hookpoints:
        tmp = out / f".{hookpoint}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        coders[hookpoint].save_to_disk(tmp)
        replace_dir(tmp, out / hookpoint)
    if config is not None:
        tmp_config = out / f".{RUN_CONFIG_FILE}.tmp"
        tmp_config.write_text(json.dumps(config, indent=2, default=str))
        os.replace(tmp_config, out / RUN_CONFIG_FILE)

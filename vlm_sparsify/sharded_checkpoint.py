"""Checkpoints of a sharded CLT (`--distribute_modules`): the usual CLT run for users, and each
rank's resume files beside it.

Rank 0 assembles every source's folder in the CLT layout (`encoder.*` from the source's owner,
`W_decs.{i}` / `b_decs.{i}` from the owner of target p+i, sent one tensor at a time), so the run
loads, exports and shares like any other. Every rank writes its live parameters and optimizer
and scheduler state to `rank{r}/` of the same temporary folder, which rank 0 renames into place
once all have written: `--save_dir` must be on a filesystem every process sees, as with
sparsify's own `--distribute_modules`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vlm_sparsify.coder_io import (
    RUN_CONFIG_FILE,
    CheckpointError,
    clt_source_cfg,
    read_clt_tensors,
    replace_dir,
    write_clt_source,
)
from vlm_sparsify.sharded_clt import ShardedCLT
from vlm_sparsify.train_state import read_training_state, write_resume_files, write_step_state
from vlm_sparsify.training import Trainer, eval_weights

SHARD_FILE = "shard.json"


def rank_dir(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank{rank}"


def gather_source(clt: ShardedCLT, p: int, dst: int = 0) -> dict[str, Tensor] | None:
    """Source p's tensors under clt-training's keys, on the CPU of rank `dst` (None elsewhere)."""
    L, d, n = clt.num_latents, clt.d_in, clt.n_targets(p)
    # (key, the layer whose owner holds it, shape, dtype)
    pieces = [("encoder.weight", p, (L, d), clt.dtype), ("encoder.bias", p, (L,), clt.dtype)]
    pieces += [(f"W_decs.{i}", p + i, (L, d), clt.decoder_dtype) for i in range(n)]
    pieces += [(f"b_decs.{i}", p + i, (d,), clt.dtype) for i in range(n)]
    out = {}
    for key, layer, shape, dtype in pieces:
        owner = clt.owners[layer]
        if clt.rank == owner == dst:
            out[key] = clt.source_tensor(p, key).detach().cpu().clone()
        elif clt.rank == owner:
            dist.send(clt.source_tensor(p, key).detach().contiguous(), dst=dst)
        elif clt.rank == dst:
            buffer = torch.empty(shape, dtype=dtype, device=clt.device)
            dist.recv(buffer, src=owner)
            out[key] = buffer.cpu()
    return out if clt.rank == dst else None


def write_sharded_checkpoint(
    trainer: Trainer, run_dir: Path, config: dict[str, Any], resume_files: bool = True
) -> None:
    """Every rank calls this at the same step; the checkpoint appears at `run_dir` at once
    (without `resume_files`: the coders and config alone, as `--save_best` keeps them)."""
    clt = trainer.coders
    assert isinstance(clt, ShardedCLT)
    tmp = run_dir.parent / f".{run_dir.name}.tmp-sharded"
    if clt.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    live = {k: v.detach().cpu().clone() for k, v in clt.state_dict().items()}
    summary = trainer.summary()
    with eval_weights(trainer.optimizers):  # users load schedule-free's averaged point
        for p, hookpoint in enumerate(clt.hookpoints):
            tensors = gather_source(clt, p)
            if tensors is not None:
                write_clt_source(tmp / hookpoint, tensors, clt_source_cfg(clt, p))
    if resume_files:
        mine = rank_dir(tmp, clt.rank)
        mine.mkdir()
        write_resume_files(mine, trainer, live)
        (mine / SHARD_FILE).write_text(json.dumps({"world_size": clt.world, "owners": clt.owners}))
    if clt.rank == 0:
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        if resume_files:
            write_step_state(tmp, trainer, summary)
    _barrier()
    if clt.rank == 0:
        replace_dir(tmp, run_dir)
    _barrier()


def read_sharded_training_state(run_dir: Path, trainer: Trainer) -> None:
    """Restore this rank's share of a sharded run; the same number of processes must resume it."""
    clt = trainer.coders
    assert isinstance(clt, ShardedCLT)
    mine = rank_dir(run_dir, clt.rank)
    shard = mine / SHARD_FILE
    if not shard.is_file():
        raise FileNotFoundError(
            f"cannot resume: {run_dir} has no {mine.name}/{SHARD_FILE}: it was not written by a "
            f"--distribute_modules run of at least {clt.rank + 1} processes"
        )
    saved = json.loads(shard.read_text())
    if saved["owners"] != clt.owners:
        raise ValueError(
            f"cannot resume {run_dir}: it was sharded over {saved['world_size']} processes and "
            f"this run has {clt.world}; resume with the same number of processes"
        )
    read_training_state(run_dir, trainer, resume_dir=mine)


@torch.no_grad()
def load_owned_tensors(clt: ShardedCLT, run_dir: str | Path) -> None:
    """`--finetune RUN`: this process's tensors of a CLT run (any CLT run, sharded or not, of the
    same hookpoints, width and cross_layer), read one by one from its source files."""
    wanted: dict[int, list[str]] = {}
    for t in clt.owned:
        wanted.setdefault(t, []).extend(["encoder.weight", "encoder.bias"])
        for p in clt.sources_reaching(t):
            wanted.setdefault(p, []).extend([f"W_decs.{t - p}", f"b_decs.{t - p}"])
    tensors = read_clt_tensors(
        run_dir, clt.hookpoints, clt.d_in, clt.cross_layer, wanted, clt.device
    )
    for p, state in tensors.items():
        for key, value in state.items():
            target = clt.source_tensor(p, key)
            if value.shape != target.shape:
                raise CheckpointError(
                    f"{run_dir}: {clt.hookpoints[p]} {key} has shape {list(value.shape)}, this "
                    f"run's is {list(target.shape)}; pass the checkpoint's --num_latents"
                )
            target.copy_(value)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

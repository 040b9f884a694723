"""Checkpoints of sharded coders (`--distribute_modules`): the usual run folder for users, and
each rank's resume files beside it.

Rank 0 assembles every hookpoint's folder, receiving the tensors other processes hold one at a
time: a CLT source's in the CLT layout (`encoder.*` from the source's owner, `W_decs.{i}` /
`b_decs.{i}` from the owner of target p+i), a per-layer coder as stock sparsify saves it. So the
run loads, exports and shares like any other. Every rank writes its live parameters and optimizer
and scheduler state to `rank{r}-*` files of the same temporary folder (`.RUN.tmp-<rank 0's
pid>`, which `clean_stale_folders` removes after a kill), which rank 0 renames into place once
all have written: `--save_dir` must be on a filesystem every process sees, as with
sparsify's own `--distribute_modules`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from sparsify import SparseCoder
from torch import Tensor

from vlm_sparsify.coder_io import (
    RUN_CONFIG_FILE,
    CheckpointError,
    atomic_dir,
    check_finetune_shape,
    clt_source_cfg,
    coder_shape,
    read_clt_tensors,
    saved_shape,
    temp_dir,
    write_clt_source,
)
from vlm_sparsify.files import read_json
from vlm_sparsify.sharded_clt import ShardedCLT
from vlm_sparsify.sharded_per_layer import ShardedPerLayer
from vlm_sparsify.sharding import ShardedCoders
from vlm_sparsify.train_state import read_training_state, write_resume_files, write_step_state
from vlm_sparsify.training import Trainer, eval_weights


def rank_prefix(rank: int) -> str:
    """Of a process's resume files beside the coder folders: `rank3-optimizer_0.pt`, ..."""
    return f"rank{rank}-"


def shard_file(run_dir: Path, rank: int) -> Path:
    """Which layers process `rank` held (`world_size`, `owners`)."""
    return run_dir / f"{rank_prefix(rank)}shard.json"


Piece = tuple[str, int, Callable[[], Tensor], torch.Size, torch.dtype]
"""(key, rank holding it, how that rank gets it, shape, dtype)."""


def gather_pieces(coders: ShardedCoders, pieces: list[Piece], dst: int = 0) -> dict[str, Tensor]:
    """The tensors, on the CPU of rank `dst` (an empty dict elsewhere)."""
    out = {}
    for key, owner, get, shape, dtype in pieces:
        if coders.rank == owner == dst:
            out[key] = get().detach().cpu().clone()
        elif coders.rank == owner:
            dist.send(get().detach().contiguous(), dst=dst)
        elif coders.rank == dst:
            buffer = torch.empty(shape, dtype=dtype, device=coders.device)
            dist.recv(buffer, src=owner)
            out[key] = buffer.cpu()
    return out


def source_pieces(clt: ShardedCLT, p: int) -> list[Piece]:
    """CLT source p's tensors under clt-training's keys."""
    L, d, n = clt.num_latents, clt.d_in, clt.n_targets(p)
    shapes = {"encoder.weight": (L, d), "encoder.bias": (L,)}
    shapes |= {f"W_decs.{i}": (L, d) for i in range(n)} | {f"b_decs.{i}": (d,) for i in range(n)}
    pieces: list[Piece] = []
    for key, shape in shapes.items():
        layer = p + int(key.split(".")[1]) if key.startswith(("W_decs", "b_decs")) else p
        dtype = clt.decoder_dtype if key.startswith("W_decs") else clt.dtype
        get = partial(clt.source_tensor, p, key)
        pieces.append((key, clt.owners[layer], get, torch.Size(shape), dtype))
    return pieces


def coder_pieces(coders: ShardedPerLayer, p: int) -> list[Piece]:
    """Hookpoint p's stock `SparseCoder` tensors, under its own keys."""
    template = SparseCoder(coders.d_in, coders.cfg, device="meta", dtype=coders.dtype)
    owner = coders.owners[p]

    def get(key: str) -> Tensor:
        return coders.coder(p).state_dict()[key]

    return [
        (key, owner, partial(get, key), value.shape, value.dtype)
        for key, value in template.state_dict().items()
    ]


def write_coders(coders: ShardedCoders, folder: Path) -> None:
    """Every hookpoint's folder, written by rank 0 (the tensors gathered to it)."""
    for p, hookpoint in enumerate(coders.hookpoints):
        if isinstance(coders, ShardedCLT):
            tensors = gather_pieces(coders, source_pieces(coders, p))
            if coders.rank == 0:
                write_clt_source(folder / hookpoint, tensors, clt_source_cfg(coders, p))
        else:
            assert isinstance(coders, ShardedPerLayer)
            tensors = gather_pieces(coders, coder_pieces(coders, p))
            if coders.rank == 0:
                coder = SparseCoder(coders.d_in, coders.cfg, device="cpu", dtype=coders.dtype)
                coder.load_state_dict(tensors)
                coder.save_to_disk(folder / hookpoint)


def write_sharded_checkpoint(
    trainer: Trainer,
    run_dir: Path,
    config: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
) -> None:
    """Every rank calls this at the same step; the checkpoint appears at `run_dir` at once
    (`write_extra(folder)`: rank 0's further files, as `save_coders` takes them)."""
    clt = trainer.coders
    assert isinstance(clt, ShardedCoders)
    pid = _rank0_pid(clt)
    # rank 0 creates the folder and renames it into place; every rank writes into it
    writing = atomic_dir(run_dir, pid) if clt.rank == 0 else nullcontext(temp_dir(run_dir, pid))
    with writing as tmp:
        _barrier()
        live = {k: v.detach().cpu().clone() for k, v in clt.state_dict().items()}
        summary = trainer.summary()
        with eval_weights(trainer.optimizers):  # users load schedule-free's averaged point
            write_coders(clt, tmp)
        write_resume_files(tmp, trainer, live, rank_prefix(clt.rank))
        shard = {"world_size": clt.world, "owners": clt.owners}
        shard_file(tmp, clt.rank).write_text(json.dumps(shard))
        if clt.rank == 0:
            (tmp / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
            write_step_state(tmp, trainer, summary)
            if write_extra is not None:
                write_extra(tmp)
        _barrier()
    _barrier()


def _rank0_pid(coders: ShardedCoders) -> int:
    """Rank 0's process id, on every rank: it names the temporary folder they all write."""
    pid = torch.tensor([os.getpid()], dtype=torch.int64, device=coders.device)
    if dist.is_initialized():
        dist.broadcast(pid, src=0)
    return int(pid.item())


def read_sharded_training_state(run_dir: Path, trainer: Trainer) -> None:
    """Restore this rank's share of a sharded run; the same number of processes must resume it."""
    clt = trainer.coders
    assert isinstance(clt, ShardedCoders)
    shard = shard_file(run_dir, clt.rank)
    if not shard.is_file():
        raise FileNotFoundError(
            f"cannot resume: {run_dir} has no {shard.name}: it was not written by a "
            f"--distribute_modules run of at least {clt.rank + 1} processes"
        )
    saved = read_json(shard)
    if saved["owners"] != clt.owners:
        raise ValueError(
            f"cannot resume {run_dir}: it was sharded over {saved['world_size']} processes and "
            f"this run has {clt.world}; resume with the same number of processes"
        )
    read_training_state(run_dir, trainer, rank_prefix(clt.rank))


@torch.no_grad()
def load_owned_tensors(coders: ShardedCoders, run_dir: str | Path) -> None:
    """`--finetune RUN`: this process's tensors of a run of the same hookpoints and shape
    (`coder_shape`, read from RUN's cfg.json files first, as one process checks it): a CLT's read
    one by one from its source files, or the stock coders of this process's hookpoints."""
    ours = coder_shape(coders)
    check_finetune_shape(run_dir, ours, saved_shape(run_dir, coders.hookpoints, coders.d_in))
    if isinstance(coders, ShardedPerLayer):
        for p in coders.owned:
            hookpoint = coders.hookpoints[p]
            try:
                saved = SparseCoder.load_from_disk(Path(run_dir) / hookpoint, device="cpu")
                coders.coder(p).load_state_dict(saved.state_dict())
            except (FileNotFoundError, RuntimeError, KeyError, SafetensorError) as err:
                raise CheckpointError(
                    f"{run_dir}: cannot fine-tune {hookpoint} from it ({' '.join(str(err).split())}"
                    "); pass a run of per-layer coders of these hookpoints, width and skip "
                    "connection"
                ) from err
        return
    clt = coders
    assert isinstance(clt, ShardedCLT)
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
                    f"{run_dir}: {clt.hookpoints[p]} {key} has shape {list(value.shape)}, not "
                    f"{list(target.shape)} as its cfg.json says; re-save the checkpoint"
                )
            target.copy_(value)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

"""What every sharded coder set (`--distribute_modules`) shares: which process holds which
layers, and the collectives of a sharded step (no-ops on one process).

A sharded coder set holds the layers of a contiguous block (`shard_layers`), gathers each
layer's activations from every process's batch to the layer's owner (`gather_rows`, the world
batch in rank order), and broadcasts each source's sparse features so that every process can
report them for its own tokens (`share_features`).
"""

from __future__ import annotations

import os
from bisect import bisect_right, insort
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from sparsify import SparseCoderConfig
from torch import Tensor, nn


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes: (0, 1) without torch.distributed."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init_distributed(timeout: timedelta | None = None) -> bool:
    """Under torchrun (LOCAL_RANK set) or another launcher (WORLD_SIZE > 1): pin this process to
    its GPU when LOCAL_RANK says which (before NCCL starts, or every rank's collectives would use
    GPU 0) and join the process group (gloo without CUDA). Returns whether this process is one of
    several."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and local_rank is not None:
            torch.cuda.set_device(int(local_rank))
        dist.init_process_group(backend, timeout=timeout)
    return True


def shard_layers(weights: list[int], world: int) -> list[int]:
    """Owner rank of each layer: contiguous blocks, at least one layer per rank, with the
    heaviest block (total `weights`: parameters per layer) as light as contiguous blocks allow."""
    n = len(weights)
    if world > n:
        raise ValueError(
            f"--distribute_modules shards whole layers: {world} processes for {n} hookpoints; "
            "use at most one process per hookpoint"
        )

    def greedy_starts(capacity: int) -> list[int]:
        starts, load = [0], 0
        for layer, weight in enumerate(weights):
            if load + weight > capacity:
                starts.append(layer)
                load = 0
            load += weight
        return starts

    low, high = max(weights), sum(weights)  # binary search on the heaviest block
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if len(greedy_starts(mid)) <= world else (mid + 1, high)
    starts = greedy_starts(low)
    for layer in range(1, n):  # fewer blocks than ranks: splitting one never makes it heavier
        if len(starts) == world:
            break
        if layer not in starts:
            insort(starts, layer)
    return [bisect_right(starts, layer) - 1 for layer in range(n)]


class ShardedCoders(nn.Module):
    """Base of the sharded coder sets: `owners[l]` is the rank holding layer l, `owned` this
    process's layers."""

    # set by both subclasses
    cfg: SparseCoderConfig
    d_in: int
    device: torch.device
    dtype: torch.dtype

    def __init__(self, hookpoints: list[str], weights: list[int]):
        super().__init__()
        self.hookpoints = list(hookpoints)
        self.rank, self.world = rank_world()
        self.owners = shard_layers(weights, self.world)
        self.owned = [layer for layer, r in enumerate(self.owners) if r == self.rank]

    def plan(self) -> str:
        """Which layers each process holds, e.g. `layers 0-12 on rank 0, 13-19 on rank 1`."""
        blocks = []
        for rank in range(self.world):
            layers = [t for t, r in enumerate(self.owners) if r == rank]
            span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
            blocks.append(f"{span} on rank {rank}")
        return "layers " + ", ".join(blocks)


@dataclass
class Features:
    """A source's k (value, index) pairs for the world batch, as every process holds them."""

    values: Tensor
    """[N_world, k] float32 (a leaf collecting this process's gradients when asked)."""
    indices: Tensor
    """[N_world, k] int64."""


def share_features(
    encoded: tuple[Tensor, Tensor] | None,
    owner: int,
    n_world: int,
    k: int,
    device: torch.device,
    leaf: bool,
) -> Features:
    """A source's (values, indices) from its `owner` (which passes them; the others None) to
    every process; with `leaf` the values collect gradients."""
    # indices travel as int32 (a third less to send), then back to int64 for the kernels
    if encoded is not None:
        values = encoded[0].detach().float().contiguous()
        indices = encoded[1].to(torch.int32).contiguous()
    else:
        values = torch.empty(n_world, k, device=device)
        indices = torch.empty(n_world, k, dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.broadcast(values, src=owner)
        dist.broadcast(indices, src=owner)
    if leaf:
        values.requires_grad_(torch.is_grad_enabled())
    return Features(values, indices.long())


# -- collectives (no-ops on one process) ------------------------------------------------------


def token_counts(n_local: int, device: torch.device) -> list[int]:
    if not dist.is_initialized():
        return [n_local]
    mine = torch.tensor([n_local], device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, mine)
    return [int(c) for c in counts]


def gather_rows(x: Tensor, counts: list[int], dst: int) -> Tensor | None:
    """Every process's rows of x, concatenated in rank order, at `dst` (None elsewhere)."""
    if not dist.is_initialized():
        return x
    width = max(counts)
    padded = x.new_zeros(width, *x.shape[1:])
    padded[: x.shape[0]] = x
    rank = dist.get_rank()
    parts = [torch.empty_like(padded) for _ in counts] if rank == dst else None
    dist.gather(padded, parts, dst=dst)
    if parts is None:
        return None
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def gathered(rows: Tensor | None) -> Tensor:
    """`gather_rows`' result at its `dst` (this process), where it is never None."""
    if rows is None:
        raise RuntimeError("these rows were gathered at another process")
    return rows


def sum_at(x: Tensor, dst: int) -> Tensor:
    """x summed over processes, valid at `dst`."""
    if dist.is_initialized():
        x = x.contiguous()
        dist.reduce(x, dst=dst, op=dist.ReduceOp.SUM)
    return x

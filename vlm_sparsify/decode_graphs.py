"""CUDA graphs of the open-loop replacement's per-layer work at decoding steps.

At a decoding step (one new position per sequence) a 7B model on a GPU waits for the CPU to
launch its kernels: on an H200 the base LLaVA-7B took ~33 ms per token for 8 sequences, about
1 ms of Python and launches per layer, on a card that reads its weights in ~3 ms. The replacement's
per-layer work (encoder, top-k, decode, the pending-sum addition and the read-out: about 13 torch
calls with their views and slices) cost ~0.28 ms per layer more than the MLP it stands in for
(2026-11-27, `BENCHMARKS.md`). Replayed from a CUDA graph it is three calls: copy the layer's
input in, replay, copy the prediction out.

A graph is recorded per source layer and forward shape (rows, width, dtype, inference mode) the
first time that layer runs at that shape: the replacement's own eager code (`step`), run once on
the ambient stream (it takes the lazy copies), once on a side stream (library warm-up), both
into a scratch ring, then captured on that stream reading a fixed input buffer and adding into the
shape's fixed ring of pending sums. The replacement resets that ring at each forward's first layer
(`ring`); replaying in layer order then does what the eager code does, kernel for kernel.

Everything a graph reads must outlive it at a fixed address: its input buffer, its shape's ring,
the coders' weights and the inference copies (`owner`, kept referenced here; the replacement
makes a new `DecodeGraphs` whenever it takes new copies) and the small index tensors the copies
cache for good (`CLTInference._offsets`). The replacement passes `step` with each call rather
than storing it here: a bound method kept by an object its instance holds would make a reference
cycle, and a dropped replacement model would keep its copies (26 GB for a CLT-16 on LLaVA-7B)
until the garbage collector's next full pass.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Step = Callable[[int, Tensor, Tensor], Tensor]
"""`step(p, x [N, d], ring [N, H, d])`: layer p's eager open-loop work, adding into `ring`;
returns layer p's prediction `[N, d]`."""


@dataclass
class _Shape:
    """The graphs of one forward shape: a fixed ring, and per layer its input, output and graph."""

    ring: Tensor
    pool: Any
    inputs: dict[int, Tensor] = field(default_factory=dict)
    outputs: dict[int, Tensor] = field(default_factory=dict)
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)


class DecodeGraphs:
    """Per-layer CUDA graphs of `step` for the forward shapes met most recently."""

    max_shapes = 4
    """Forward shapes whose graphs are kept (the oldest is dropped): a decoding step's rows are
    the batch's sequences, so a generation meets one."""

    def __init__(self, owner: Any):
        self._owner = owner  # the inference copies the graphs read: alive as long as they are
        self._shapes: OrderedDict[tuple, _Shape] = OrderedDict()
        self._current: _Shape | None = None
        self.failed: str | None = None
        """Why a capture failed (then every later forward runs eagerly), or None."""

    @property
    def captured(self) -> int:
        """Graphs recorded and kept, over all shapes."""
        return sum(len(shape.graphs) for shape in self._shapes.values())

    def ring(self, x: Tensor, targets: int, start: Tensor) -> Tensor:
        """Begin a forward whose layers read rows like x `[N, d]`: its shape's fixed ring of
        pending sums `[N, targets, d]` float32, set to `start` `[targets, d]` (made at first use)."""
        key = (x.shape, x.dtype, x.device, torch.is_inference_mode_enabled())
        shape = self._shapes.get(key)
        if shape is None:
            rows, d = x.shape
            ring = torch.empty(rows, targets, d, dtype=torch.float32, device=x.device)
            shape = _Shape(ring, torch.cuda.graph_pool_handle())
            self._shapes[key] = shape
            while len(self._shapes) > self.max_shapes:
                self._shapes.popitem(last=False)
        self._shapes.move_to_end(key)
        self._current = shape
        shape.ring.copy_(start)
        return shape.ring

    def run(self, p: int, x: Tensor, step: Step) -> Tensor | None:
        """Layer p's prediction for x `[N, d]` from its graph of `step`, recorded at its first
        call; None when recording fails (`failed` says why; the caller runs `step` eagerly on the
        ring)."""
        shape = self._current
        assert shape is not None, "ring() begins each forward"
        graph = shape.graphs.get(p)
        if graph is None:
            return self._capture(p, x, shape, step)
        shape.inputs[p].copy_(x)
        graph.replay()
        return shape.outputs[p].clone()

    def _capture(self, p: int, x: Tensor, shape: _Shape, step: Step) -> Tensor | None:
        """Record layer p's graph, then replay it on x (the ring holds this forward's sums)."""
        static = x.clone()
        scratch = torch.empty_like(shape.ring)  # warm-ups add here, not to the pending sums
        step(p, static, scratch)  # the lazy copies and index tensors, on the ambient stream
        ambient = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(ambient)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                step(p, static, scratch)
                graph.capture_begin(pool=shape.pool, capture_error_mode="thread_local")
                try:
                    output = step(p, static, shape.ring)
                finally:
                    graph.capture_end()
        except RuntimeError as error:
            self.failed = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"recording the replacement's decoding step as a CUDA graph failed ({self.failed}); "
                "decoding eagerly from now on (ReplacementModel(cuda_graphs=False) skips trying)",
                stacklevel=3,
            )
            ambient.wait_stream(side)
            return None
        ambient.wait_stream(side)
        shape.inputs[p], shape.outputs[p], shape.graphs[p] = static, output, graph
        graph.replay()
        return output.clone()

"""The replacement model: a VLM whose MLPs are replaced by coders, in any forward or `generate`.

Forward hooks on the coders' MLP hookpoints. At source p the MLP input x_p is encoded into
sparse features f_p, interventions edit f_p, and f_p is decoded into every target it reaches
(p .. p + n_targets(p) - 1); the decoded parts are summed in a per-forward ring of slots (one
per target when they fit in `full_ring_bytes`, else max n_targets, reused; target t in slot
t mod depth) until the target's MLP runs. The ring starts afresh at the first hookpoint of every
forward (at zero, or in open loop through the fused copies at the targets' summed decoder biases),
so with a KV cache each step decodes only the new positions. A CLT decodes through
`CLTInference` unless `decoder="per-target"`: one wide copy of each source's decoders, so a
source decodes into all its targets in one call (and on CUDA its encoder runs in bf16, as in
training); with `decoder="triton"` straight into the ring, and with `decoder="hybrid"` straight
into the ring in a prefill and by `embedding_bag` at decoding steps. A pre-hook on the root model
reads each forward's tokens for their regions (image / prompt / response). Modes:

- `open-loop`: MLP output at t := sum of the decoded parts of every source reaching t.
- `error`: MLP output := true output + (prediction with interventions - prediction without), i.e.
  reconstruction + error term; without interventions the original model, bit for bit.
- `off`: the original model (features are still captured inside `capture()`).

Layers without a coder are left alone. SAEs (per-layer coders with `transcode` off) read the
MLP's output instead of its input: open-loop replaces the output by its reconstruction.
Only one replacement model may hook a model at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, get_args

import torch
from sparsify import SparseCoder
from torch import Tensor, nn

from vlm_sparsify.capture import FeatureCapture
from vlm_sparsify.clt_inference import CLTInference, Kernel
from vlm_sparsify.coder_io import Coders
from vlm_sparsify.cross_layer import CLTSource, CrossLayerTranscoder, free_memory_bytes
from vlm_sparsify.decode_graphs import DecodeGraphs
from vlm_sparsify.interventions import Intervention, apply_interventions
from vlm_sparsify.positions import SequencePositions, generate_method
from vlm_sparsify.triton_decode import available as triton_available

Mode = Literal["open-loop", "error", "off"]
Decoder = Literal["auto", "fused", "triton", "hybrid", "per-target"]
DECODERS: tuple[Decoder, ...] = get_args(Decoder)


def resolve_decoder(decoder: Decoder, device: torch.device) -> Decoder:
    """The decoder `decoder` means for a CLT on `device`: `auto` is `hybrid` on a CUDA GPU with
    triton installed, else `fused` (Triton's interpreter, TRITON_INTERPRET=1, is for tests)."""
    if decoder != "auto":
        return decoder
    return "hybrid" if device.type == "cuda" and triton_available(device) else "fused"


class ReplacementModel:
    """Wraps `model` with `coders` (coder-set interface) on their hookpoints.

    Use as a context manager (`with ReplacementModel(vlm, coders) as rm:` hooks `vlm` until exit)
    or call `rm(...)` / `rm.forward(...)` / `rm.generate(...)`, which hook it for the call.
    `decoder` (CLTs): `auto` (default): `hybrid` for coders on a CUDA GPU with triton installed,
    else `fused`, resolved when the copies are taken (`decoder_in_use`); at LLaVA-1.5-7B size on
    an H200, open-loop generation took 1.02-1.18x the base model's time with hybrid, 1.10-1.35x
    with triton and 1.70-1.77x with fused (three runs, BENCHMARKS.md). `fused`: when no gradient
    must reach the coders' weights, decode through `CLTInference`'s wide copies of the decoders
    (one `embedding_bag` per source), taken at the first such forward and checked against the
    CLT's weights whenever the model is hooked anew (`with rm:` or a call outside one, not at
    each forward inside a block; `fused_nbytes`: the memory they take); `triton`: the same
    copies, each source decoded straight into the pending sums by `vlm_sparsify.triton_decode`
    (CUDA); `hybrid`: Triton in forwards of at least `hybrid_min_rows` positions (a prefill),
    the fused `embedding_bag` below (a decoding step's one row per sequence, where a Triton
    launch's overhead can cost more than the decode); `per-target`: target by target with the
    CLT's own weights. Forwards that train the coders (grad enabled, weights requiring grad:
    end-to-end training) always use the CLT's own weights.
    `cuda_graphs` (CLTs through the copies on a CUDA GPU): open-loop decoding steps (forwards
    of one new position per sequence after a KV cache) of fewer than `graph_max_rows` positions
    with nothing captured or edited replay each layer's work from a CUDA graph recorded at its
    first such step (`vlm_sparsify.decode_graphs`: the same kernels, without the per-call Python
    and launches a decoding step waits for); False runs them eagerly.
    """

    hybrid_min_rows = 128
    """`decoder="hybrid"`: forwards with at least this many positions (all sequences together)
    decode with the Triton kernel (a prefill of 8 prompts has ~5,000; a decoding step one per
    sequence)."""

    graph_max_rows = 128
    """`cuda_graphs`: open-loop decoding steps of fewer positions than this (all sequences
    together) replay CUDA graphs of each layer's work (`vlm_sparsify.decode_graphs`)."""

    full_ring_bytes = 64 * 2**20
    """Forwards whose pending sums for every target fit in this many bytes (a decoding step:
    8 rows x 32 targets x 4,096 floats = 4 MiB) keep one slot per target, so no slot is emptied
    for reuse; larger ones (a prefill) keep max n_targets slots, reused in turn."""

    attribution_own_weights_on: tuple[str, ...] = ("cuda",)
    """Device types where attribution decodes through the CLT's own weights (sparsify's kernel)
    rather than the fused copies: their `embedding_bag` has no bf16 gradient kernel on CUDA
    (`_embedding_bag_per_sample_weights_backward_cuda`, seen on an H200)."""

    def __init__(
        self,
        model: nn.Module,
        coders: Coders,
        mode: Mode = "open-loop",
        interventions: Sequence[Intervention] = (),
        image_token_id: int | None = None,
        decoder: Decoder = "auto",
        cuda_graphs: bool = True,
    ):
        self._installs = 0
        self.mode = mode
        self.model = model
        self.coders = coders
        self.hookpoints: list[str] = list(coders.hookpoints)
        missing = [h for h in self.hookpoints if not has_submodule(model, h)]
        if missing:
            raise ValueError(
                f"coder hookpoints {missing} are not modules of {type(model).__name__}: these "
                "coders were trained on another model (more layers, other module paths); "
                "hookpoints are paths from the root model, e.g. model.language_model.layers.0.mlp"
            )
        attention = [
            h for h in self.hookpoints if "Attention" in type(model.get_submodule(h)).__name__
        ]
        if attention:
            raise ValueError(
                f"coder hookpoints {attention[:3]} are attention modules: the replacement model "
                "replaces MLPs (transcoders read their input, SAEs their output); coders of "
                "attention hookpoints train and load, but do not run here"
            )
        config = getattr(model, "config", None)
        self.image_token_id = image_token_id
        if image_token_id is None:
            self.image_token_id = getattr(config, "image_token_id", None)
            if self.image_token_id is None:
                self.image_token_id = getattr(config, "image_token_index", None)
        sources = [source for _, source in coders.items()]
        self._widths = [source.encoder.out_features for source in sources]
        self.num_latents = max(self._widths)
        # an SAE reads and predicts the MLP's output; transcoders (PLT, CLT) read its input
        self._reads_output = not getattr(coders, "transcode", True)
        for hookpoint, source in zip(self.hookpoints, sources, strict=True):
            _check_width(model.get_submodule(hookpoint), hookpoint, source, self._reads_output)
        self._dtype = next(coders.parameters()).dtype
        # skip terms only where the coders have them: each call casts the layer's input
        has_skip = getattr(getattr(coders, "cfg", None), "skip_connection", True)
        self._skip = getattr(coders, "skip", None) if has_skip else None
        if decoder not in DECODERS:
            raise ValueError(f"Unknown decoder '{decoder}'; use {', '.join(DECODERS)}")
        self.decoder: Decoder = decoder
        is_clt = isinstance(coders, CrossLayerTranscoder)
        self._fused = decoder != "per-target" and is_clt
        if self._fused and decoder in ("triton", "hybrid"):
            from vlm_sparsify.triton_decode import check_available

            check_available(next(coders.parameters()).device)
        self._hybrid = False  # this install's copies: Triton in prefills only (resolved decoder)
        self._inference: CLTInference | None = None
        self.cuda_graphs = cuda_graphs
        self._graphs: DecodeGraphs | None = None  # of this install's copies (cuda_graphs)
        self._graphed = False  # this forward replays self._graphs
        self._use_fused = False  # this forward decodes through self._inference
        self._fused_checked = False  # self._inference checked against the weights this install
        self._copies_refused = False  # this install: too little free memory for the copies
        self._warned_memory = False
        self._weights_train = False  # some coder weight requires grad (checked at install)
        self._window = max(coders.n_targets(p) for p in range(len(self.hookpoints)))
        self._depth = self._window  # this forward's ring slots: _window, or one per target
        self._ring_bias = False  # this forward's ring starts at the targets' summed biases
        self.interventions = list(interventions)
        self._capture: FeatureCapture | None = None
        self._leaves: list[tuple[int, Tensor, Tensor]] | None = None
        self._handles: list[Any] = []
        # Per-forward state: pending predictions [N, depth, d] (target t in slot t % depth)
        self._ring: Tensor | None = None
        # where each forward's tokens sit: regions, decision positions, generate's prompt length
        self._positions = SequencePositions(self.image_token_id)
        self._regions: Tensor | None = None
        self._decision: Tensor | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def mode(self) -> Mode:
        """`open-loop`, `error` or `off` (set it outside `with rm:`)."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if self._installs:
            raise RuntimeError("change the mode outside `with rm:` (its hooks depend on it)")
        if getattr(self, "_leaves", None) is not None and mode != "error":
            raise RuntimeError("attribution needs mode='error': change it outside the block")
        match mode:
            case "open-loop" | "error" | "off":
                self._mode: Mode = mode
            case other:
                raise ValueError(f"Unknown replacement mode '{other}'; use open-loop, error or off")

    @property
    def interventions(self) -> list[Intervention]:
        """The standing interventions, applied in every forward (a list; one is a list too)."""
        return list(self._interventions)

    @interventions.setter
    def interventions(self, interventions: Intervention | Sequence[Intervention]) -> None:
        interventions = _as_list(interventions)
        if interventions and getattr(self, "_leaves", None) is not None:
            raise RuntimeError(
                "attribution runs without interventions: intervene outside `rm.attribution()`"
            )
        self._per_source = self.check_interventions(interventions)
        self._interventions = list(interventions)
        self._regional = any(i.regional for i in interventions)

    def check_interventions(
        self, interventions: Sequence[Intervention]
    ) -> list[list[Intervention]]:
        """`interventions` by source position, after checking each edits only features its
        sources' coders have (a clear error names the feature and the coder's width)."""
        per_source: list[list[Intervention]] = [[] for _ in self.hookpoints]
        for intervention in interventions:
            highest = max(intervention.feature_indices)
            for p in intervention.source_positions(self.hookpoints):
                if highest >= self._widths[p]:
                    raise ValueError(
                        f"{intervention} edits feature {highest} but the coder at "
                        f"{self.hookpoints[p]} has {self._widths[p]} latents"
                    )
                per_source[p].append(intervention)
        return per_source

    @contextmanager
    def intervene(
        self, interventions: Intervention | Sequence[Intervention]
    ) -> Iterator[ReplacementModel]:
        """Add `interventions` to the standing ones until the block exits."""
        standing = self._interventions
        self.interventions = [*standing, *_as_list(interventions)]
        try:
            yield self
        finally:
            self.interventions = standing

    @contextmanager
    def capture(self, value_dtype: torch.dtype = torch.bfloat16) -> Iterator[FeatureCapture]:
        """Record every source's top-k per token while the block runs; read `pop_samples()`.
        Blocks nest: an inner block records the forwards run inside it, the outer one not."""
        capture = FeatureCapture(len(self.hookpoints), self.num_latents, value_dtype)
        outer, self._capture = self._capture, capture
        try:
            yield capture
        finally:
            self._capture = outer

    @contextmanager
    def attribution(self) -> Iterator[list[tuple[int, Tensor, Tensor]]]:
        """Expose every source's feature activations as leaf tensors that gradients reach.

        Inside the block each forward appends `(source, top_acts [N, k], top_indices [N, k])`;
        `top_acts` requires grad, and decoding adds `decode(acts) - decode(acts.detach())` to the
        targets: zero in value (error mode stays exact), the features' direct path in gradient.
        After `backward()`, `top_acts * top_acts.grad` is the activation x gradient attribution.
        Only in error mode, without interventions (adding one, or another mode, inside the block is
        an error: the attribution step would ignore them).
        """
        if self.mode != "error" or self._interventions:
            raise ValueError("attribution needs mode='error' and no interventions")
        leaves: list[tuple[int, Tensor, Tensor]] = []
        outer, self._leaves = self._leaves, leaves
        try:
            yield leaves
        finally:
            self._leaves = outer

    @property
    def fused_nbytes(self) -> int:
        """Bytes of the fused inference copies (0 before the first hooked call or unfused)."""
        return self._inference.nbytes if self._inference is not None else 0

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        """Hook the model (nested calls count; `remove()` undoes one)."""
        if self._installs == 0:
            holder = getattr(self.model, _HOLDER, None)
            if holder is not None and holder is not self:
                raise RuntimeError(
                    "another ReplacementModel already hooks this model: leave its `with` block "
                    "(or let its call end) first; one replacement at a time"
                )
            setattr(self.model, _HOLDER, self)
            self._fused_checked = False
            self._copies_refused = False  # memory may have been freed since: ask again
            self._weights_train = any(param.requires_grad for param in self.coders.parameters())
            self._positions.install(self.model)
            self._handles.append(self._positions)
            self._handles.append(
                self.model.register_forward_pre_hook(self._start_forward, with_kwargs=True)
            )
            self._handles.append(self.model.register_forward_hook(self._end_forward))
            for p, hookpoint in enumerate(self.hookpoints):
                module = self.model.get_submodule(hookpoint)
                if self.mode == "open-loop" and not self._reads_output:
                    # the MLP's own output is not needed: do not compute it
                    self._handles.append(_ForwardOverride(module, partial(self._open_loop, p)))
                else:
                    self._handles.append(module.register_forward_hook(partial(self._replace, p)))
        self._installs += 1

    def remove(self) -> None:
        """Undo one `install()`; the last one unhooks the model."""
        if self._installs == 0:
            return
        self._installs -= 1
        if self._installs == 0:
            handles, self._handles = self._handles, []
            delattr(self.model, _HOLDER)
            for handle in handles:
                handle.remove()

    def __enter__(self) -> ReplacementModel:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextmanager
    def _hooked(self) -> Iterator[None]:
        self.install()
        try:
            yield
        finally:
            self.remove()

    def _start_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """After `SequencePositions.observe`: the regions the capture and interventions need."""
        positions = self._positions
        self._regions = self._decision = None
        regions = positions.regions if self._capture is not None or self._regional else None
        if regions is None:
            return
        if self._capture is not None:
            if positions.new_sequence:
                self._capture.start_sequence()
            self._capture.start_forward(positions.past, positions.tokens, regions)
        if self._regional:
            self._regions = regions.reshape(-1)
            decision = positions.decision
            assert decision is not None
            self._decision = decision.reshape(-1)

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After a forward of the root model: its regions are stale for a forward of a submodule
        alone (e.g. the language model), which the pre-hook does not see."""
        self._regions = self._decision = None
        if self._capture is not None:
            self._capture.end_forward()

    def _open_loop(self, p: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Stands in for MLP p's forward in open-loop mode: the coders' prediction from x."""
        if p == 0:
            self._start_layers()
            self._graphed = self._start_graphed(x)
        if self._graphed:
            assert self._graphs is not None
            prediction = self._graphs.run(p, x.reshape(-1, x.shape[-1]), self._graph_step)
            if prediction is not None:
                return prediction.view(x.shape)
            self._graphed = False  # recording failed: the rest of the forward eagerly, same ring
        prediction = self._layer(p, (x,), x)
        assert prediction is not None
        return prediction

    def _replace(
        self, p: int, module: nn.Module | None, args: tuple, output: Tensor
    ) -> Tensor | None:
        """Forward hook of MLP p (modes other than open loop, and SAEs)."""
        if p == 0:
            self._start_layers()
        return self._layer(p, args, output)

    def _start_layers(self) -> None:
        """At the first hookpoint of each forward (even one of the language model alone): the
        ring starts afresh, and whether this forward decodes through the copies."""
        self._ring = None
        self._use_fused = (
            self._fused
            and not self._copies_refused
            and not (torch.is_grad_enabled() and self._weights_train)
        )
        if self._use_fused and not self._fused_checked:
            self._take_inference_copies()
        # open loop through the copies: the ring starts at the decoder biases' sums, so
        # each source decodes without its biases (one kernel less per source)
        self._ring_bias = self._use_fused and self.mode == "open-loop"

    def _start_graphed(self, x: Tensor) -> bool:
        """Whether this open-loop forward replays CUDA graphs of its layers (`cuda_graphs`: a
        decoding step through the copies, nothing recorded or edited, no gradient); if so the
        ring is the graphs' fixed one, set to the targets' summed biases."""
        graphs = self._graphs
        if graphs is None or graphs.failed or not self._use_fused or not x.is_cuda:
            return False
        if self._interventions or self._capture is not None or self._leaves is not None:
            return False
        d, targets = x.shape[-1], len(self.hookpoints)
        rows = x.numel() // d
        if rows >= self.graph_max_rows or rows * targets * d * 4 > self.full_ring_bytes:
            return False
        positions = self._positions
        if positions.past == 0 or positions.length != 1:
            # not a decoding step (one new position per sequence): a shape that may not come
            # again (a prefill, assisted decoding's candidates)
            return False
        if torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return False
        assert self._inference is not None
        start = self._inference.target_biases()
        self._ring = graphs.ring(x.reshape(rows, d), targets, start)
        self._depth = targets
        return True

    def _graph_step(self, p: int, x: Tensor, ring: Tensor) -> Tensor:
        """Layer p's open-loop work on rows x, adding into `ring` (what a graph records)."""
        pending, self._ring = self._ring, ring
        try:
            return self._predict(p, x)
        finally:
            self._ring = pending

    def _predict(self, p: int, x: Tensor) -> Tensor:
        """Open loop without edits or capture: layer p's prediction `[N, d]` from its MLP input
        rows x, after adding source p's parts to the ring."""
        top_acts, top_indices, _ = self._encode(p, x)
        self._add_open_loop(p, x, top_acts, top_indices)
        prediction = self._take(p, x.dtype)
        assert prediction is not None
        return prediction

    def _layer(self, p: int, args: tuple, output: Tensor) -> Tensor | None:
        """MLP p's output in this mode: the prediction (open loop), the output corrected by the
        edits' effect (error), or None (unchanged)."""
        mode = self.mode
        if self._leaves is not None:
            return self._attribution_step(p, args[0], output)
        edits = self._per_source[p] if mode != "off" else ()
        if mode == "open-loop" or edits or self._capture is not None:
            read = output if self._reads_output else args[0]
            x = read.reshape(-1, read.shape[-1])
            top_acts, top_indices, _ = self._encode(p, x)
            if self._capture is not None:
                self._capture.record(p, top_acts, top_indices)
            if mode == "open-loop":
                if edits:
                    top_acts, top_indices = apply_interventions(
                        edits, top_acts, top_indices, self._regions, self._decision
                    )
                self._add_open_loop(p, x, top_acts, top_indices)
            elif edits:
                edited = apply_interventions(
                    edits, top_acts, top_indices, self._regions, self._decision
                )
                if self._direct(p, x.shape[0]):
                    # decode(edited) - decode(clean) = decode(edited) + decode(-clean)
                    self._decode_into_ring(p, *edited, bias=False)
                    self._decode_into_ring(p, -top_acts, top_indices, bias=False)
                else:
                    clean = self._decode(p, top_acts, top_indices)
                    self._accumulate(p, self._decode(p, *edited) - clean)
        prediction = self._take(p, output.dtype)
        if mode == "open-loop":
            assert prediction is not None
            return prediction.view(output.shape)
        if prediction is not None:
            return output + prediction.view(output.shape)
        return None

    def _direct(self, p: int, rows: int) -> bool:
        """Whether source p decodes straight into the ring (the Triton kernel) in a forward of
        `rows` positions."""
        if not self._use_fused:
            return False
        assert self._inference is not None  # set with _use_fused
        direct = self._inference.direct(p)
        if direct and self._hybrid:
            direct = rows >= self.hybrid_min_rows
        return direct

    def _add_open_loop(self, p: int, x: Tensor, top_acts: Tensor, top_indices: Tensor) -> None:
        """Add source p's open-loop parts (decoded features, skip terms) to its targets' sums."""
        skips = self._skip(p, x) if self._skip is not None else []
        bias = not self._ring_bias
        if self._direct(p, x.shape[0]):
            self._decode_into_ring(p, top_acts, top_indices, bias=bias)
            if skips:
                self._accumulate(p, torch.stack(skips, 1))
        else:
            parts = self._decode(p, top_acts, top_indices, bias=bias)
            self._accumulate(p, parts + torch.stack(skips, 1) if skips else parts)

    def _attribution_step(self, p: int, x: Tensor, output: Tensor) -> Tensor:
        assert self._leaves is not None
        x = output if self._reads_output else x
        flat = x.detach().reshape(-1, x.shape[-1])
        with torch.no_grad():
            top_acts, top_indices, _ = self._encode(p, flat)
        if self._capture is not None:
            self._capture.record(p, top_acts, top_indices)
        leaf = top_acts.detach().requires_grad_(True)
        self._leaves.append((p, leaf, top_indices))
        own = leaf.device.type in self.attribution_own_weights_on
        live = self._decode(p, leaf, top_indices, own_weights=own)
        self._accumulate(p, live - self._decode(p, leaf.detach(), top_indices, own_weights=own))
        prediction = self._take(p, output.dtype)
        assert prediction is not None
        return output + prediction.view(output.shape)

    def _take_inference_copies(self) -> None:
        """(Re)take the fused copies unless they still match the CLT's weights; decode with the
        CLT's own weights instead when the copies would take over half the free memory (asked
        again at the next install: `with rm:` or a call)."""
        self._fused_checked = True
        device = next(self.coders.parameters()).device
        decoder = resolve_decoder(self.decoder, device)  # the coders may have moved since
        self._hybrid = decoder == "hybrid"
        kernel: Kernel = "triton" if decoder in ("triton", "hybrid") else "embedding_bag"
        inference = self._inference
        if inference is not None and inference.current() and inference.kernel == kernel:
            return
        self._inference = self._graphs = None  # free the stale copies before taking new ones
        clt = self.coders
        assert isinstance(clt, CrossLayerTranscoder)
        free = free_memory_bytes(device)
        needed = CLTInference.copy_nbytes(clt)
        if free is not None and needed > free / 2:
            if not self._warned_memory:
                warnings.warn(
                    f"the fused CLT decoders would copy {needed / 2**30:.1f} GiB with "
                    f"{free / 2**30:.1f} GiB free on {device}: decoding target by target instead "
                    "while memory is short (decoder='per-target'; docs/replacement.md)",
                    stacklevel=2,
                )
                self._warned_memory = True
            self._copies_refused = True
            self._use_fused = False
            return
        self._inference = CLTInference(clt, kernel)
        if self.cuda_graphs and device.type == "cuda":
            self._graphs = DecodeGraphs(self._inference)

    def _encode(self, p: int, x: Tensor) -> Any:
        """Source p's top-k features of the MLP input rows x `[N, d]`."""
        if self._use_fused:
            assert self._inference is not None
            return self._inference.encode(p, x)
        return self.coders.encode(p, x.to(self._dtype))

    def _decode(
        self,
        p: int,
        top_acts: Tensor,
        top_indices: Tensor,
        own_weights: bool = False,
        bias: bool = True,
    ) -> Tensor:
        """Source p's contributions to its targets, stacked: `[N, n_targets(p), d]`; through the
        CLT's own weights when `own_weights` (or when this forward does not use the copies);
        without the decoder biases if not `bias` (the copies only)."""
        if self._use_fused and not own_weights:
            assert self._inference is not None
            return self._inference.decode(p, top_acts, top_indices, bias)
        assert bias, "the biases are left out only by the copies"
        parts = self.coders.decode(p, top_acts, top_indices)
        return parts[0].unsqueeze(1) if len(parts) == 1 else torch.stack(parts, 1)

    @property
    def decode_graphs(self) -> DecodeGraphs | None:
        """The CUDA graphs of this install's copies (`cuda_graphs`; None before the first hooked
        call, on a CPU, or without copies): `captured` counts them, `failed` says why recording
        failed, if it did."""
        return self._graphs

    @property
    def decoder_in_use(self) -> Decoder:
        """How a CLT decodes on the coders' current device (`auto` resolved: `resolve_decoder`);
        `per-target` for per-layer coders, which have one target each."""
        if not self._fused:
            return "per-target"
        return resolve_decoder(self.decoder, next(self.coders.parameters()).device)

    def _ring_slots(self, p: int, n: int, like: Tensor, d: int) -> list[tuple[Tensor, int, int]]:
        """The ring's slots of targets p .. p + n - 1 as (view [N, count, d], first, count): one
        run of slots, or two when they wrap past the ring's end (allocated at first use)."""
        if self._ring is None:
            self._ring = self._new_ring(like, d)
        depth = self._depth
        start = p % depth
        first = min(n, depth - start)  # slots up to the ring's end, then from its start
        runs = [(self._ring[:, start : start + first], 0, first)]
        if first < n:
            runs.append((self._ring[:, : n - first], first, n - first))
        return runs

    def _new_ring(self, like: Tensor, d: int) -> Tensor:
        """This forward's pending sums `[N, depth, d]`: zeros, or the targets' summed decoder
        biases (`_ring_bias`); one slot per target when they fit in `full_ring_bytes`."""
        rows, targets = like.shape[0], len(self.hookpoints)
        dtype = torch.promote_types(like.dtype, torch.float32)
        full = rows * targets * d * dtype.itemsize <= self.full_ring_bytes
        self._depth = depth = targets if full else self._window
        if not self._ring_bias:
            return like.new_zeros(rows, depth, d, dtype=dtype)
        assert self._inference is not None
        ring = like.new_empty(rows, depth, d, dtype=dtype)
        return ring.copy_(self._inference.target_biases()[:depth])

    def _accumulate(self, p: int, parts: Tensor) -> None:
        """Add source p's stacked contributions to the pending sums of targets p, p + 1, ..."""
        _, n, d = parts.shape
        for slots, first, count in self._ring_slots(p, n, parts, d):
            slots += parts[:, first : first + count]

    def _decode_into_ring(self, p: int, top_acts: Tensor, top_indices: Tensor, bias: bool) -> None:
        """Decode source p straight into its targets' slots (the Triton kernel)."""
        inference = self._inference
        assert inference is not None
        d = inference.clt.d_in
        for slots, first, count in self._ring_slots(p, inference.n_targets[p], top_acts, d):
            out = slots.view(slots.shape[0], count * d)
            inference.decode_into(p, top_acts, top_indices, out, first, count, bias)

    def _take(self, p: int, dtype: torch.dtype) -> Tensor | None:
        """Target p's pending sum as a new `[N, d]` tensor of `dtype`; its slot is reset for
        the target that uses it next, if any."""
        if self._ring is None:
            return None
        slot = self._ring[:, p % self._depth]
        prediction = slot.to(dtype, memory_format=torch.contiguous_format, copy=True)
        after = p + self._depth
        if after < len(self.hookpoints):
            if self._ring_bias:
                assert self._inference is not None
                slot.copy_(self._inference.target_biases()[after])
            else:
                slot.zero_()
        return prediction

    # ------------------------------------------------------------------ running
    def forward(
        self,
        *args: Any,
        interventions: Intervention | Sequence[Intervention] = (),
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's forward through the replacement (same arguments and outputs);
        `interventions` add to the standing ones for this call, as in `generate` (the model's
        forward would take them in its **kwargs and ignore them)."""
        with self._hooked(), self.intervene(interventions):
            return self.model(*args, **kwargs)

    __call__ = forward

    def generate(
        self,
        *args: Any,
        interventions: Intervention | Sequence[Intervention] = (),
        **kwargs: Any,
    ) -> Any:
        """`model.generate` through the replacement; `interventions` add to the standing ones.

        Captured response rows stop before each row's first EOS token (which `model.generate`
        under `with rm:` does not know: use this method to capture responses).
        """
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            raise ValueError("ReplacementModel.generate needs input_ids (token regions)")
        beams = self._generation_setting("num_beams", kwargs) or 1
        if self._capture is not None and beams > 1:
            raise ValueError(
                "capture follows each row's own tokens; beam search reorders rows between "
                "steps: capture with num_beams=1 (greedy or sampling)"
            )
        prompt_length = tokens.shape[1]
        with self._hooked(), self.intervene(interventions):
            # read inside: the hooks wrap `generate` (the prompt length: SequencePositions)
            output = generate_method(self.model)(*args, **kwargs)
        if self._capture is not None:
            sequences = output if isinstance(output, Tensor) else output.sequences
            self._capture.end_sequence(self._response_stops(sequences, prompt_length, kwargs))
        return output

    def _generation_setting(self, name: str, kwargs: dict) -> Any:
        """The value of `name` that `generate(**kwargs)` uses: its keyword, else that of the
        `generation_config` given, else the model's (transformers fills a given config's unset
        values from the model's)."""
        if name in kwargs:
            return kwargs[name]
        for config in (
            kwargs.get("generation_config"),
            getattr(self.model, "generation_config", None),
        ):
            value = getattr(config, name, None)
            if value is not None:
                return value
        return None

    def _response_stops(self, sequences: Tensor, prompt_length: int, kwargs: dict) -> list[int]:
        eos = self._generation_setting("eos_token_id", kwargs)
        response = sequences[:, prompt_length:]
        if eos is None:
            return [sequences.shape[1]] * len(sequences)
        eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos])
        is_eos = torch.isin(response.cpu(), eos)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), response.shape[1])
        return (first + prompt_length).tolist()


_HOLDER = "_vlm_sparsify_replacement"
"""Attribute marking the model a ReplacementModel hooks (one at a time)."""


def _as_list(interventions: Intervention | Sequence[Intervention]) -> list[Intervention]:
    if isinstance(interventions, Intervention):
        return [interventions]
    interventions = list(interventions)
    wrong = [i for i in interventions if not isinstance(i, Intervention)]
    if wrong:
        raise TypeError(f"interventions are Intervention objects, got {wrong[0]!r}")
    return interventions


def _check_width(
    module: nn.Module, hookpoint: str, source: SparseCoder | CLTSource, reads_output: bool
) -> None:
    """Clear error when a coder's width is not its MLP's (coders of another model)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return
    d_model = linears[-1].out_features if reads_output else linears[0].in_features
    d_in = source.encoder.in_features
    if d_in != d_model:
        raise ValueError(
            f"the coder at {hookpoint} reads {d_in}-dimensional activations but the model's "
            f"MLP there has width {d_model}: these coders were trained on another model"
        )


class _ForwardOverride:
    """Replaces a module's `forward` until `remove()` (a handle like a hook's), which restores
    a `forward` set on the instance before (an accelerate hook on the module, say)."""

    def __init__(self, module: nn.Module, forward: Any):
        self.module = module
        self.before = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.before is None:
            del self.module.forward
        else:
            self.module.forward = self.before


def has_submodule(model: nn.Module, path: str) -> bool:
    """Whether `path` names a module of `model`."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True

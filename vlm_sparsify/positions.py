"""Where each forward of a model sits in its sequence: token regions and decision positions.

Hooks that act on some token positions only (capture, region-limited interventions, steering
at the decision positions) need, at every forward of the model, which of its tokens are image,
prompt or response tokens and which are *decision* positions: the last prompt token and every
response token, the positions whose next-token prediction is a response token (where the
benchmarks select features). `SequencePositions.install(model)` reads them with a pre-hook on the
root model (its `input_ids`, attention mask and KV cache) and wraps the model's `generate` for
the prompt length: inside `generate` the prompt is what it was given, with or without a KV cache
(without one every step re-runs the whole sequence); outside, a forward without past starts a
sequence whose prompt is that forward's tokens (so a plain forward's decision position is each
row's last non-pad token, left or right padded) and forwards with a past continue it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import wraps
from typing import Any

import torch
from torch import Tensor, nn

from vlm_sparsify.capture import REGION_CODE, token_regions

STEER_REGIONS = ("all", "decision")
"""Token positions the CLT-free steerer and the neuron hooks can act on."""


class SequencePositions:
    """Per forward of a model: its tokens' region codes and decision mask, flattened `[B * n]`."""

    def __init__(self, image_token_id: int | None = None):
        self.image_token_id = image_token_id
        self.prompt_length = 0
        """Prompt length of the current sequence (padded, in positions)."""
        self.new_sequence = False
        """Whether the last forward started a sequence (its first forward in a `generate`)."""
        self.past = 0
        """Positions the current sequence held before the last forward."""
        self.tokens: Tensor | None = None
        """The last forward's `input_ids` `[B, n]` (None with `inputs_embeds`)."""
        self._forward: tuple[Tensor | None, tuple[int, int], torch.device] | None = None
        self._regions: Tensor | None = None
        self._decision: Tensor | None = None
        self._generate_prompt_length: int | None = None
        self._generate_started = False
        self._handles: list[Any] = []
        self._model: nn.Module | None = None

    @property
    def length(self) -> int | None:
        """Positions per sequence in the last forward (1 at a decoding step; None before one)."""
        return None if self._forward is None else self._forward[1][1]

    @property
    def regions(self) -> Tensor | None:
        """Region codes `[B, n]` (int8, `capture.REGION_CODE`) of the last forward's tokens
        (computed at the first request; None when the forward had no tokens)."""
        if self._regions is None and self._forward is not None:
            mask, shape, device = self._forward
            self._regions = token_regions(
                self.tokens, mask, shape, self.past, self.prompt_length, self.image_token_id, device
            )
        return self._regions

    @property
    def decision(self) -> Tensor | None:
        """Whether each of the last forward's tokens `[B, n]` is a decision position: a row's
        last non-pad prompt token (with right padding too) or a response token (pad never)."""
        if self._decision is None and self._forward is not None:
            regions = self.regions
            assert regions is not None
            mask = self._forward[0]
            positions = torch.arange(self.past, self.past + regions.shape[1], device=regions.device)
            last = torch.full_like(positions[:1], self.prompt_length - 1)
            if mask is not None and mask.ndim == 2 and self.past < self.prompt_length:
                # each row's last non-pad prompt position (computed on the device: no host sync)
                from_end = mask[:, : self.prompt_length].flip(1).ne(0).int().argmax(1, keepdim=True)
                last = self.prompt_length - 1 - from_end
            decision = (positions >= self.prompt_length) | (positions == last)
            self._decision = decision & (regions != REGION_CODE["pad"])
        return self._decision

    # ------------------------------------------------------------------ hooks
    def install(self, model: nn.Module) -> None:
        """Read every forward of `model` and wrap its `generate` until `remove()`."""
        if self._model is not None:
            raise RuntimeError("these SequencePositions already follow a model; remove() first")
        self._model = model
        self._handles.append(model.register_forward_pre_hook(self.observe, with_kwargs=True))
        if hasattr(model, "generate"):
            self._handles.append(_GenerateWrapper(model, self._generating))

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles, self._model = [], None

    @contextmanager
    def following(self, model: nn.Module) -> Iterator[SequencePositions]:
        """Follow `model`'s forwards until the block exits."""
        self.install(model)
        try:
            yield self
        finally:
            self.remove()

    @contextmanager
    def _generating(self, prompt_length: int) -> Iterator[None]:
        outer = self._generate_prompt_length, self._generate_started
        self._generate_prompt_length, self._generate_started = prompt_length, False
        try:
            yield
        finally:
            self._generate_prompt_length, self._generate_started = outer

    def observe(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """The pre-hook: where this forward's tokens sit (regions and decision mask are
        computed when asked for, without a host sync)."""
        self._forward = self._regions = self._decision = None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = tokens if tokens is not None else embeds
        self.tokens = tokens
        if reference is None:
            return
        batch, n = reference.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # one per attention type (Gemma 3, Qwen2-VL: static cache)
            mask = mask.get("full_attention", next(iter(mask.values()), None))
        if isinstance(mask, Tensor) and mask.ndim == 2:
            past = mask.shape[1] - n
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            # a static cache's length is a tensor that grows in place: read it now
            past = int(cache.get_seq_length()) if cache is not None else 0
            if isinstance(mask, Tensor) and mask.ndim == 4 and mask.shape[-1] >= past + n:
                mask = _mask_of_4d(mask, past, n)
            else:
                mask = None
        # generate() without a KV cache re-runs the whole sequence: still the same sequence
        if self._generate_prompt_length is not None:
            self.new_sequence = not self._generate_started
            self._generate_started = True
        else:
            self.new_sequence = past == 0
        if self.new_sequence:
            self.prompt_length = self._generate_prompt_length or n
        self.past = past
        self._forward = (mask, (batch, n), reference.device)


def _mask_of_4d(mask: Tensor, past: int, n: int) -> Tensor:
    """The `[B, past + n]` padding mask of a 4-d attention mask `[B, 1, n, positions]` (a static
    cache's): a token is a pad when it does not attend to itself (its diagonal entry is False, or
    not 0 in an additive float mask); earlier positions count as tokens."""
    own = mask[:, 0, :, past : past + n].diagonal(dim1=-2, dim2=-1)
    own = own if own.dtype == torch.bool else own == 0
    return torch.cat([own.new_ones(own.shape[0], past), own], 1).long()


def generate_method(model: nn.Module) -> Callable[..., Any]:
    """`model.generate` (a transformers model's, from `GenerationMixin`)."""
    generate = model.generate
    if not callable(generate):  # nn.Module types an attribute as a tensor or a module
        raise TypeError(f"{type(model).__name__} has no generate method")
    return generate


class _GenerateWrapper:
    """Calls `generating(prompt_length)` around every `model.generate`, until `remove()`.

    The first wrapper of a model replaces `generate` on the instance by one that enters every
    registered callback; the last one removed restores what was there before (removal in any
    order).
    """

    def __init__(self, model: nn.Module, generating: Callable[[int], Any]):
        self.model, self.generating = model, generating
        if _GENERATE_HOOKS not in model.__dict__:
            callbacks: list[Callable[[int], Any]] = []
            original = generate_method(model)

            @wraps(original)
            def generate(*args: Any, **kwargs: Any) -> Any:
                tokens = kwargs.get("input_ids", args[0] if args else None)
                if tokens is None:
                    tokens = kwargs.get("inputs_embeds")
                with ExitStack() as stack:
                    if isinstance(tokens, Tensor) and tokens.ndim >= 2:
                        for callback in list(callbacks):
                            stack.enter_context(callback(tokens.shape[1]))
                    return original(*args, **kwargs)

            before = model.__dict__.get("generate")
            model.__dict__[_GENERATE_HOOKS] = (callbacks, before)
            model.__dict__["generate"] = generate
        model.__dict__[_GENERATE_HOOKS][0].append(generating)

    def remove(self) -> None:
        entry = self.model.__dict__.get(_GENERATE_HOOKS)
        if entry is None or self.generating not in entry[0]:
            return
        callbacks, before = entry
        callbacks.remove(self.generating)
        if not callbacks:
            del self.model.__dict__[_GENERATE_HOOKS]
            if before is None:
                del self.model.__dict__["generate"]
            else:
                self.model.__dict__["generate"] = before


_GENERATE_HOOKS = "_vlm_sparsify_generate_hooks"
"""Attribute of a model whose `generate` is wrapped: (prompt-length callbacks, what it replaced)."""


def check_steer_region(region: str) -> str:
    if region not in STEER_REGIONS:
        raise ValueError(f"Unknown steering region '{region}'; use {' or '.join(STEER_REGIONS)}")
    return region


def decision_rows(positions: SequencePositions, rows: int) -> Tensor:
    """`[rows, 1]` 1.0 at the last forward's decision positions, 0.0 elsewhere, for a hook whose
    input holds that forward's tokens as rows."""
    decision = positions.decision
    if decision is None:
        raise ValueError("steering at the decision positions needs the forward's input_ids")
    if decision.numel() != rows:
        raise ValueError(
            f"a hook saw {rows} token rows where the forward had {decision.numel()} tokens: "
            "decision positions are known for the root model's own tokens only"
        )
    return decision.reshape(rows, 1).float()

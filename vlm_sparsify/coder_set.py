"""The coder-set interface (docs/internals.md): what every coder set shares, what it returns
for a batch, and sparsify's FVU.

A leaf module: the coder sets (`PerLayerCoders`, `CrossLayerTranscoder`, `ShardedCLT`,
`ShardedPerLayer`) import it, it imports none of them.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from sparsify import SparseCoderConfig
from sparsify.fused_encoder import EncoderOutput
from torch import Tensor, nn

MeanReducer = Callable[[Tensor], Tensor]
"""Averages a tensor over data-parallel ranks (identity on one process)."""


class CoderSetOutput(NamedTuple):
    """What a coder set returns for one batch; the loss is `fvu.sum()`."""

    fvu: Tensor
    """Fraction of variance unexplained per target hookpoint, shape [H]."""

    latent_acts: list[Tensor]
    """Per source: the k active latent values, [N, k]."""

    latent_indices: list[Tensor]
    """Per source: the k active latent indices, [N, k]."""

    predictions: list[Tensor]
    """Per target: the predicted module output, [N, d]."""

    auxk_loss: Tensor | None = None
    """Per source: sparsify's AuxK loss of its dead latents, [H] (None without dead masks)."""

    multi_topk_fvu: Tensor | None = None
    """Per target: FVU when decoding the top 4k latents, [H] (None unless `cfg.multi_topk`)."""


def total_variance(y: Tensor) -> Tensor:
    """sparsify's FVU denominator: sum over tokens and dimensions of (y - mean y)^2."""
    return (y - y.mean(0)).pow(2).sum()


def fraction_of_variance_unexplained(
    y: Tensor, y_hat: Tensor, variance: Tensor | None = None
) -> Tensor:
    """sparsify's FVU: ||y - y_hat||^2 / `total_variance(y)` (or the given denominator)."""
    if variance is None:
        variance = total_variance(y)
    return (y - y_hat).pow(2).sum() / variance


def centre_encoder(encoder: nn.Linear, mean: Tensor) -> None:
    """sparsify's step-0 transcoder init: the encoder's bias makes `mean` encode to zero."""
    encoder.bias.data = -mean @ encoder.weight.data.T


@runtime_checkable
class CoderSet(Protocol):
    """The training interface every coder set implements (all four, sharded ones included).

    Source p reads `inputs[p]`, target t predicts `outputs[t]`, both [N, d] (MLP input at
    source p, MLP output at target t, masked to training tokens).
    """

    hookpoints: list[str]
    """Source hookpoints, in model order."""

    cfg: SparseCoderConfig

    @property
    def transcode(self) -> bool:
        """False for SAEs, which read and predict the MLP output."""
        ...

    def n_targets(self, p: int) -> int:
        """Targets source p writes into: p .. p + n_targets(p) - 1 (1 per-layer)."""
        ...

    def sources_reaching(self, t: int) -> list[int]:
        """Sources writing into target t ([t] per-layer)."""
        ...

    def init_biases(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        reduce_mean: MeanReducer | None = None,
    ) -> None:
        """Step-0 init from the first batch: encoders centred, decoder biases = output means."""
        ...

    def forward(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        total_variances: list[Tensor] | None = None,
        dead_masks: list[Tensor] | None = None,
    ) -> CoderSetOutput:
        """Encode every source, decode into its targets, FVU per target."""
        ...

    def before_batch(self) -> None:
        """sparsify's per-batch hook before the forward (SAEs renormalise decoder rows)."""
        ...

    def before_optimizer_step(self) -> None:
        """sparsify's pre-step hook (SAEs keep unit-norm decoder rows)."""
        ...

    # every coder set is an nn.Module: what training calls of the Module

    def __call__(
        self,
        inputs: list[Tensor],
        outputs: list[Tensor],
        total_variances: list[Tensor] | None = None,
        dead_masks: list[Tensor] | None = None,
    ) -> CoderSetOutput:
        """`forward` through the Module's hooks."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_dict(self, *, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]: ...

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any: ...


@runtime_checkable
class InferenceCoderSet(CoderSet, Protocol):
    """A whole coder set in one process (`PerLayerCoders`, `CrossLayerTranscoder`: what
    `load_coders` returns), as the replacement model, capture and export use it."""

    def items(self) -> Sequence[tuple[str, nn.Module]]:
        """(hookpoint, source module) in model order."""
        ...

    def __getitem__(self, hookpoint: str) -> nn.Module:
        """The source module of a hookpoint."""
        ...

    def encode(self, p: int, x: Tensor) -> EncoderOutput:
        """TopK features of source p (top-k indices in no particular order)."""
        ...

    def decode(self, p: int, top_acts: Tensor, top_indices: Tensor) -> list[Tensor]:
        """Contribution of source p to each of its targets (bias of p->t included)."""
        ...

    def skip(self, p: int, x: Tensor) -> list[Tensor]:
        """Skip-connection terms of source p into its targets (empty without them)."""
        ...

    def predict(self, sources: list[EncoderOutput | None], t: int) -> Tensor:
        """Prediction of target t: the sum over the sources reaching it."""
        ...

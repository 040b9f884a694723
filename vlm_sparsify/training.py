"""The lean training loop: batch -> activations -> loss per target -> optimizer step.

One path for SAEs, per-layer transcoders and cross-layer transcoders. It reuses sparsify's coder,
kernels, optimizers and config dataclasses; what it adds is multimodal batches (every model input
reaches the model, the token mask comes from the batch), cross-layer targets, exact data-parallel
training (global FVU denominators, summed gradients) and bit-exact resume.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder
from sparsify.config import SparseCoderConfig, TrainConfig
from sparsify.muon import Muon
from sparsify.sign_sgd import SignSGD
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from vlm_sparsify.cli import interrupts_deferred
from vlm_sparsify.coder_io import whole_coders
from vlm_sparsify.coder_set import CoderSet, MeanReducer, total_variance
from vlm_sparsify.cross_layer import CLTSource, CrossLayerTranscoder
from vlm_sparsify.data import shared_prefix_length
from vlm_sparsify.end_to_end import check_end_to_end, end_to_end_sum
from vlm_sparsify.per_layer import PerLayerCoders
from vlm_sparsify.replacement import ReplacementModel
from vlm_sparsify.schedule_free import ScheduleFreeSignSGD
from vlm_sparsify.sharded_clt import ShardedCLT
from vlm_sparsify.sharded_per_layer import ShardedPerLayer
from vlm_sparsify.sharding import ShardedCoders

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last checkpoint on disk is left as it was."""


class HookpointError(ValueError):
    """A hookpoint whose input or output is not the residual stream's [batch, seq, d]."""


class NoTrainingDataError(ValueError):
    """The run found nothing to train on: no readable example, or no training position."""


class _StopForward(Exception):
    """Raised by the last hook: the rest of the model is not needed for training."""


def build_coders(
    hookpoints: list[str],
    d_in: int,
    cfg: SparseCoderConfig,
    cross_layer: int,
    device: torch.device,
    init_seed: int = 0,
    decoder_dtype: torch.dtype | None = None,
    distribute: bool = False,
) -> CoderSet:
    """Per-layer coders for `cross_layer == 0`, else a cross-layer transcoder (with `distribute`,
    only this process's layers of them: `ShardedPerLayer` / `ShardedCLT`). The coders get their
    own copy of `cfg`: the trainer sets its `k` (--k_decay_steps), `cfg.k` stays the run's."""
    if cross_layer:
        cfg.transcode = True
    cfg = dataclasses.replace(cfg)
    if cross_layer == 0:
        if distribute:
            return ShardedPerLayer(hookpoints, d_in, cfg, device, init_seed=init_seed)
        return PerLayerCoders(hookpoints, d_in, cfg, device, init_seed=init_seed)
    if distribute:
        return ShardedCLT(
            hookpoints,
            d_in,
            cfg,
            cross_layer,
            device,
            decoder_dtype=decoder_dtype,
            init_seed=init_seed,
        )
    return CrossLayerTranscoder(
        hookpoints, d_in, cfg, cross_layer, device, decoder_dtype=decoder_dtype, init_seed=init_seed
    )


def coder_modules(coders: CoderSet) -> list[SparseCoder | CLTSource]:
    """One module per source (per owned layer when sharded): one optimizer parameter group."""
    if isinstance(coders, ShardedCLT):
        return [coders.layer(t) for t in coders.owned]
    if isinstance(coders, ShardedPerLayer):
        coders = coders.local
    if isinstance(coders, PerLayerCoders):
        return [coders.coder(p) for p in range(len(coders.hookpoints))]
    if isinstance(coders, CrossLayerTranscoder):
        return coders.source_modules()
    raise TypeError(f"unknown coder set {type(coders).__name__}")


def build_optimizers(
    cfg: TrainConfig, coders: CoderSet, num_batches: int
) -> tuple[list[Any], list[Any]]:
    """sparsify.Trainer's optimizers and learning rates, one parameter group per source."""
    modules = coder_modules(coders)
    latents = modules[0].encoder.weight.shape[0]
    match cfg.optimizer:
        case "signum":
            lr = cfg.lr or 5e-3 / (latents / 2**14) ** 0.5
            groups = [{"params": m.parameters(), "lr": lr} for m in modules]
            # stock's ScheduleFreeWrapper(SignSGD) step, bit for bit, without its buffer swaps
            opt = ScheduleFreeSignSGD(SignSGD(groups), momentum=0.95)
            opt.train()
            return [opt], []
        case "adam":
            lr = cfg.lr or 2e-4 / (latents / 2**14) ** 0.5
            adam = torch.optim.Adam([{"params": m.parameters(), "lr": lr} for m in modules])
            return [adam], [get_linear_schedule_with_warmup(adam, cfg.lr_warmup_steps, num_batches)]
        case "muon":
            params = {p for m in modules for p in m.parameters()}
            matrices = {p for p in params if p.ndim >= 2}
            # Muon's ddp mode splits identical parameters over ranks; sharded ones are not
            ddp = dist.is_initialized() and not isinstance(coders, ShardedCoders)
            muon = Muon(list(matrices), lr=cfg.lr or 2e-3, ddp=ddp)
            adam = torch.optim.Adam(list(params - matrices), lr=cfg.lr or 2e-3)
            return [muon, adam], [
                get_linear_schedule_with_warmup(muon, 0, num_batches),
                get_linear_schedule_with_warmup(adam, cfg.lr_warmup_steps, num_batches),
            ]
        case other:
            raise ValueError(f"Unknown optimizer '{other}'; choose signum, adam or muon")


# -- activations ------------------------------------------------------------------------------


@torch.no_grad()
def collect_activations(
    model: PreTrainedModel,
    hookpoints: list[str],
    inputs: dict[str, Tensor],
    mask: Tensor,
) -> tuple[list[Tensor], list[Tensor]]:
    """MLP inputs and outputs at every hookpoint, flattened to [N, d] over masked tokens.

    Every model input of the batch (pixel values, image sizes, attention mask) reaches the model;
    the forward stops after the last hookpoint.
    """
    xs, ys, _ = _forward_with_capture(model, hookpoints, inputs, mask, stop_early=True)
    return xs, ys


@torch.no_grad()
def collect_activations_and_logits(
    model: PreTrainedModel,
    hookpoints: list[str],
    inputs: dict[str, Tensor],
    mask: Tensor,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """`collect_activations` from a whole forward, and its logits [batch, seq, vocab]."""
    xs, ys, output = _forward_with_capture(model, hookpoints, inputs, mask, stop_early=False)
    return xs, ys, output.logits


def _forward_with_capture(
    model: PreTrainedModel,
    hookpoints: list[str],
    inputs: dict[str, Tensor],
    mask: Tensor,
    stop_early: bool,
) -> tuple[list[Tensor], list[Tensor], Any]:
    flat_mask = mask.flatten()
    width = model.config.get_text_config().hidden_size
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    last = hookpoints[-1]

    def make_hook(name: str):
        expected = (*mask.shape, width)

        def checked(what: str, t: Any) -> Tensor:
            if not isinstance(t, Tensor) or tuple(t.shape) != expected:
                shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise HookpointError(
                    f"hookpoint {name}: its {what} is {shape}, not [batch, seq, "
                    f"{width}]; coders train on modules that read and write the residual "
                    "stream, such as the MLPs"
                )
            return t

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            # decoder layers pass attention its hidden states by keyword
            x = checked("input", args[0] if args else kwargs.get("hidden_states"))
            y = checked("output", output[0] if isinstance(output, tuple) else output)
            captured[name] = (x.flatten(0, 1)[flat_mask], y.flatten(0, 1)[flat_mask])
            if stop_early and name == last:
                raise _StopForward

        return hook

    handles = [
        model.get_submodule(h).register_forward_hook(make_hook(h), with_kwargs=True)
        for h in hookpoints
    ]
    output = None
    try:
        output = model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [h for h in hookpoints if h not in captured]
    if missing:
        raise RuntimeError(f"hookpoints {missing} did not run in the model's forward")
    return [captured[h][0] for h in hookpoints], [captured[h][1] for h in hookpoints], output


# -- data parallel ------------------------------------------------------------------------------


def _all_sum(x: Tensor) -> Tensor:
    """Sum over ranks, in place. NCCL reduces CUDA tensors only: CPU ones (the per-step FVU and
    AuxK figures) go through the rank's GPU."""
    if not dist.is_initialized():
        return x
    if x.device.type == "cpu" and dist.get_backend() == "nccl":
        on_gpu = x.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return x.copy_(on_gpu)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def total_variances(outputs: list[Tensor]) -> list[Tensor]:
    """FVU denominators over the GLOBAL batch: sum over tokens of (y - mean y)^2 per target."""
    if not dist.is_initialized():
        # exactly sparsify's expression, so one process reproduces sparsify bit for bit
        return [total_variance(y) for y in outputs]
    n = _all_sum(torch.tensor(float(outputs[0].shape[0]), device=outputs[0].device))
    variances = []
    for y in outputs:
        mean = _all_sum(y.float().sum(0)) / n
        variances.append(_all_sum((y.float() - mean).pow(2).sum()))
    return variances


def global_mean_reducer(n_local: int, device: torch.device) -> MeanReducer | None:
    """Turns a local mean over n_local tokens into the global mean over all ranks' tokens (None
    on one process: the local mean is the global one)."""
    if not dist.is_initialized():
        return None
    n_total = _all_sum(torch.tensor(float(n_local), device=device))

    def reduce(local_mean: Tensor) -> Tensor:
        # a rank without tokens has a NaN mean of nothing; it adds nothing
        local_sum = local_mean * n_local if n_local else torch.zeros_like(local_mean)
        return _all_sum(local_sum) / n_total

    return reduce


def sum_gradients(coders: CoderSet) -> None:
    """Data parallel: every rank's loss is its share of the global loss, so gradients add up.
    (Sharded coders' parameters each live on one rank and saw the whole batch: nothing to add.)"""
    if not dist.is_initialized() or isinstance(coders, ShardedCoders):
        return
    params = list(coders.parameters())
    # every rank reduces the same tensors: one that had no tokens this step may hold no gradient
    has_grad = torch.tensor(  # int32: every backend reduces it (not all reduce bools)
        [int(p.grad is not None) for p in params], dtype=torch.int32, device=params[0].device
    )
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for p, needed in zip(params, has_grad.tolist(), strict=True):
        if needed:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


# -- one step ------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything besides weights and optimizer state that a resumed run needs."""

    global_step: int = 0
    batches_seen: int = 0
    examples_seen: int = 0
    """Raw examples the trained batches held (skipped ones included): where a resumed run goes
    on, so that a short last batch (--max_examples not a multiple of --batch_size) leaves the
    rest of its examples to a resumed run with a larger --max_examples."""
    tokens_seen: int = 0
    skipped: list[str] = field(default_factory=list)
    tokens_since_fired: list[Tensor] = field(default_factory=list)
    fvu_history: list[list[float]] = field(default_factory=list)
    l0_history: list[list[float]] = field(default_factory=list)
    loss_history: list[float] = field(default_factory=list)
    """End-to-end loss (`--loss_fn kl` or `ce`) per step; empty with fvu."""
    best_loss: dict[str, float] = field(default_factory=dict)
    """`--save_best`: the lowest loss so far per hookpoint, or "" for the whole coder set."""
    best_checked_step: int = 0
    """`--save_best`: the step of the last comparison."""
    n_examples: int | None = None
    """How many examples the dataset held (None: a Hugging Face dataset, read as a stream, or a
    run saved before this field): batches are taken in its shuffled order, which another count
    changes."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "batches_seen": self.batches_seen,
            "examples_seen": self.examples_seen,
            "tokens_seen": self.tokens_seen,
            "skipped": self.skipped,
            "tokens_since_fired": self.tokens_since_fired,
            "fvu_history": self.fvu_history,
            "l0_history": self.l0_history,
            "loss_history": self.loss_history,
            "best_loss": self.best_loss,
            "best_checked_step": self.best_checked_step,
            "n_examples": self.n_examples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        return cls(**data)


class StepMark(NamedTuple):
    """The training state right after an optimizer step (`grad_acc_steps` > 1), kept so that a
    run ending mid-accumulation can go back to it: counters, history lengths, dead counts."""

    global_step: int
    batches_seen: int
    examples_seen: int
    tokens_seen: int
    lengths: tuple[int, ...]
    """Of `skipped`, `fvu_history`, `l0_history` and `loss_history`."""
    tokens_since_fired: list[Tensor]

    @classmethod
    def of(cls, state: TrainingState) -> StepMark:
        histories = (state.skipped, state.fvu_history, state.l0_history, state.loss_history)
        return cls(
            state.global_step,
            state.batches_seen,
            state.examples_seen,
            state.tokens_seen,
            tuple(len(h) for h in histories),
            [counts.clone() for counts in state.tokens_since_fired],
        )

    def restore(self, state: TrainingState) -> None:
        state.global_step, state.batches_seen = self.global_step, self.batches_seen
        state.examples_seen, state.tokens_seen = self.examples_seen, self.tokens_seen
        histories: tuple[list[Any], ...] = (
            state.skipped,
            state.fvu_history,
            state.l0_history,
            state.loss_history,
        )
        for history, length in zip(histories, self.lengths, strict=True):
            del history[length:]
        for counts, saved in zip(state.tokens_since_fired, self.tokens_since_fired, strict=True):
            counts.copy_(saved)


class Activations(NamedTuple):
    """One batch's activations at the hookpoints, [N, d] each over its training positions, and
    what the end-to-end loss runs the model on again (None: `--loss_fn fvu`, or no examples)."""

    inputs: list[Tensor]
    outputs: list[Tensor]
    model_inputs: dict[str, Tensor] | None = None
    mask: Tensor | None = None
    clean_logits: Tensor | None = None
    """The model's own logits (`--loss_fn kl`)."""


def loss_per_target(
    coders: CoderSet,
    inputs: list[Tensor],
    outputs: list[Tensor],
    variances: list[Tensor],
    micro_acc_steps: int = 1,
    scale: float = 1.0,
    backward: bool = True,
    dead_masks: list[Tensor] | None = None,
    auxk_alpha: float = 0.0,
) -> tuple[Tensor, list[Tensor], list[float], float]:
    """Forward (+ backward); per-target FVU [H], active indices and L0 per source, summed AuxK.

    The loss is sparsify's: fvu + auxk_alpha * auxk (with `dead_masks`) + multi_topk_fvu / 8.
    """
    fvu = torch.zeros(len(outputs))
    auxk = 0.0
    active = torch.zeros(len(inputs))
    indices: list[list[Tensor]] = [[] for _ in inputs]
    n = inputs[0].shape[0]
    bounds = [round(i * n / micro_acc_steps) for i in range(micro_acc_steps + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        with torch.set_grad_enabled(backward):
            out = coders(
                [x[lo:hi] for x in inputs], [y[lo:hi] for y in outputs], variances, dead_masks
            )
        loss = out.fvu.sum()
        if out.auxk_loss is not None:
            loss = loss + auxk_alpha * out.auxk_loss.sum()
            auxk += float(out.auxk_loss.detach().sum())
        if out.multi_topk_fvu is not None:
            loss = loss + out.multi_topk_fvu.sum() / 8
        if backward:
            loss.mul(scale).backward()
            if isinstance(coders, ShardedCLT):
                coders.finish_backward()  # the encoders' share, through the processes
        fvu += out.fvu.detach().float().cpu()
        for p, (acts, idx) in enumerate(zip(out.latent_acts, out.latent_indices, strict=True)):
            indices[p].append(idx.detach())
            # with multi_topk stock sparsify returns the top 4k; the coder's own L0 is of its k
            firing = (acts.detach() > 0).sum(-1).clamp(max=coders.cfg.k)
            active[p] += float(firing.sum())
    return fvu, [torch.cat(idx) for idx in indices], (active / max(n, 1)).tolist(), auxk


@contextmanager
def eval_weights(optimizers: list[Any]) -> Iterator[None]:
    """Coders at schedule-free's averaged point (what users load), restored bit for bit after."""
    sf = [opt for opt in optimizers if isinstance(opt, ScheduleFreeWrapper) and opt.train_mode]
    saved = [[p.detach().clone() for g in opt.param_groups for p in g["params"]] for opt in sf]
    for opt in sf:
        opt.eval()
    try:
        yield
    finally:
        for opt, copies in zip(sf, saved, strict=True):
            params = [p for g in opt.param_groups for p in g["params"]]
            with torch.no_grad():
                for p, copy in zip(params, copies, strict=True):
                    p.copy_(copy)
            opt.train_mode = True


@dataclass
class Trainer:
    """Drives the loop over a stream of batches; checkpoints through a callback."""

    model: PreTrainedModel
    coders: CoderSet
    cfg: TrainConfig
    optimizers: list[Any]
    schedulers: list[Any]
    state: TrainingState = field(default_factory=TrainingState)
    checkpoint: Callable[[Trainer], None] | None = None
    """`checkpoint(trainer)` writes a checkpoint; called every `save_every` steps (at the first
    optimizer step from there, with `grad_acc_steps` > 1) and at the end (at the last optimizer
    step: batches accumulated after it are dropped, `_end_at_optimizer_step`)."""
    on_step: Callable[[Trainer, dict[str, Any]], None] | None = None
    """`on_step(trainer, metrics)` after every step that trained (W&B logging)."""
    saved_step: int | None = None
    """The step of the last checkpoint on disk (None: none yet); set by `fit` and on resume."""
    check_update: bool = False
    """Set by `fit` before a step whose weights it will save: the step's update is checked on
    its own batch first (a finite loss before an update that diverged is not enough)."""
    dropped_batches: int = 0
    """Set by `fit`: the batches trained after the last optimizer step when the run ended
    mid-accumulation (`grad_acc_steps` > 1); the state went back to that step (`StepMark`)."""
    _in_step: bool = field(default=False, init=False, repr=False)
    """Inside a step: Ctrl-C that stops the run there (a second one) leaves nothing to save."""
    _step_mark: StepMark | None = field(default=None, init=False, repr=False)
    _fired: list[Tensor] | None = field(default=None, init=False, repr=False)
    """Per source, the latents that fired in the batches since the last optimizer step."""
    _tokens_in_step: int = field(default=0, init=False, repr=False)
    _replacement: ReplacementModel | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_end_to_end(
            self.cfg.loss_fn,
            self.cfg.micro_acc_steps,
            self.coders.transcode,
            self.cfg.auxk_alpha > 0 or self.cfg.sae.multi_topk,
        )
        if not self.state.tokens_since_fired:
            device = next(self.coders.parameters()).device
            latents = coder_modules(self.coders)[0].encoder.weight.shape[0]
            self.state.tokens_since_fired = [
                torch.zeros(latents, dtype=torch.long, device=device)
                for _ in self.coders.hookpoints
            ]

    def _checkpoint_note(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"the checkpoint of step {self.saved_step} is untouched (--resume continues it)"

    def _non_finite_hint(self) -> str:
        """What to do after a NaN stop (--resume keeps the saved --lr, so it is not that);
        --dtype float32 only for a model in a lower precision."""
        dtype = getattr(self.model, "dtype", torch.float32)
        change = "a lower --lr" + (" or --dtype float32" if dtype != torch.float32 else "")
        if self.saved_step is None:
            return f"Start again with {change}."
        return (
            f"To go on with {change}, start a new run from that checkpoint: "
            "--finetune RUN_FOLDER --run_name NEW_NAME."
        )

    def _check_updated_loss(
        self, inputs: list[Tensor], outputs: list[Tensor], variances: list[Tensor]
    ) -> None:
        """The FVU of the weights just updated, on the batch that updated them: NaN or infinite
        means they diverged, and the checkpoint about to be written would hold them. (No state
        changes: a run with the check trains bit for bit as one without.)"""
        fvu, *_ = loss_per_target(
            self.coders, inputs, outputs, variances, self.cfg.micro_acc_steps, backward=False
        )
        fvu = _all_sum(fvu)
        if not torch.isfinite(fvu).all():
            raise NonFiniteLossError(
                f"the update to step {self.state.global_step + 1} made the FVU non-finite on its "
                f"own batch, not saved; {self._checkpoint_note()}. {self._non_finite_hint()}"
            )

    def _check_finite_weights(self) -> None:
        """Before a checkpoint: an update that made a weight NaN or infinite is never written
        over the last good checkpoint (every process checks, so all stop together)."""
        bad = [n for n, p in self.coders.named_parameters() if not bool(torch.isfinite(p).all())]
        device = next(self.coders.parameters()).device
        if float(_all_sum(torch.tensor(float(len(bad)), device=device))) == 0:
            return
        shown = f" ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else ""
        raise NonFiniteLossError(
            f"non-finite coder weights after step {self.state.global_step}{shown}, not saved; "
            f"{self._checkpoint_note()}. {self._non_finite_hint()}"
        )

    def _positions_hint(self, outcome: str = "leave none") -> str:
        """Which flags choose the training positions, with their values."""
        cfg = self.cfg
        tokens, ctx_len = getattr(cfg, "tokens", "all"), getattr(cfg, "ctx_len", None)
        return (
            f"--tokens {tokens} (image: the positions of the recipe's image token; text: the "
            f"--ctx_len {ctx_len} text tokens kept per example) less --exclude_tokens "
            f"{list(cfg.exclude_tokens)} {outcome}"
        )

    def _check_positions_vary(self, batch: dict[str, Any], device: torch.device) -> None:
        """At the first step: training positions that all lie in the prompt's shared start (the
        same tokens in every example, before the image) would train the coders on one constant
        activation per position, with an FVU that divides by almost nothing."""
        prefix, varying = 0, 0
        if "inputs" in batch:
            input_ids, mask = batch["inputs"]["input_ids"], batch["token_mask"]
            prefix = shared_prefix_length(input_ids, batch.get("image_mask"))
            varying = int(mask[:, prefix:].sum())
        if int(_all_sum(torch.tensor(varying, device=device)).item()) > 0:
            return
        raise NoTrainingDataError(
            f"batch {self.state.batches_seen - 1}'s training positions all lie in the first "
            f"{prefix} tokens of its prompts, which are the same in every example (the prompt "
            "template before the image): the coders would learn that template, not the data; "
            f"{self._positions_hint('keep no other position')}: raise --ctx_len or choose "
            "other --tokens"
        )

    def _check_targets_vary(self, variances: list[Tensor], n_tokens: int) -> None:
        """Outputs without variance over the batch's training positions (a single position,
        or one constant output) leave the FVU, which divides by that variance, undefined."""
        zero = torch.stack(variances).eq(0).tolist()  # one device sync for all hookpoints
        flat = [h for h, z in zip(self.coders.hookpoints, zero, strict=True) if z]
        if not flat:
            return
        cfg = self.cfg
        raise NoTrainingDataError(
            f"batch {self.state.batches_seen - 1}'s outputs at {flat} are the same at all its "
            f"{n_tokens} training positions, so their FVU (which divides by their variance) is "
            f"undefined; {self._checkpoint_note()}. Train on more positions: a larger "
            f"--batch_size, or --tokens, --ctx_len and --exclude_tokens that keep more (now "
            f"--tokens {getattr(cfg, 'tokens', 'all')}, --ctx_len {getattr(cfg, 'ctx_len', None)}, "
            f"--exclude_tokens {list(cfg.exclude_tokens)})"
        )

    def current_k(self) -> int:
        """sparsify.Trainer's k for this batch: linear from min(latents, 10 d) to --k over
        `k_decay_steps` batches, set at each optimizer step from the count of batches before the
        one that stepped (so batches 0 and 1 both use the initial k)."""
        cfg, acc = self.cfg, self.cfg.grad_acc_steps
        step = max(self.state.global_step // acc * acc - 1, 0)
        if step >= cfg.k_decay_steps:
            return cfg.sae.k
        latents, d_in = coder_modules(self.coders)[0].encoder.weight.shape
        initial = min(latents, d_in * 10)
        progress = step / cfg.k_decay_steps
        return round(initial * (1 - progress) + cfg.sae.k * progress)

    def train_on_batch(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """One batch: activations -> loss per target -> bookkeeping, and the optimizer step every
        `grad_acc_steps` batches; returns the step's metrics (None: nothing trained)."""
        if "error" in batch:  # a user error in a DataLoader worker (BatchStream), as raised
            raise batch["error"]
        state = self.state
        state.batches_seen += 1
        state.examples_seen += batch.get("n_examples", 0)  # BatchStream's; tests' batches lack it
        state.skipped.extend(batch.get("skipped", []))
        if "inputs" not in batch and not dist.is_initialized():
            return None
        device = next(self.coders.parameters()).device
        acts = self._activations(batch, device)
        n_local = acts.inputs[0].shape[0]
        n_tokens = int(_all_sum(torch.tensor(n_local, device=device)).item())
        if n_tokens == 0:
            if "inputs" in batch and state.global_step == 0:
                raise NoTrainingDataError(
                    f"batch {state.batches_seen - 1} has examples but no training positions: "
                    f"{self._positions_hint()}"
                )
            return None
        if state.global_step == 0:
            self._check_positions_vary(batch, device)
        self.coders.cfg.k = self.current_k()
        if state.global_step == 0 and not self.cfg.finetune:
            self.coders.init_biases(acts.inputs, acts.outputs, global_mean_reducer(n_local, device))
        self.coders.before_batch()
        variances = total_variances(acts.outputs)
        self._check_targets_vary(variances, n_tokens)
        fvu, indices, l0, metrics = self._losses(acts, variances)
        state.tokens_seen += n_tokens
        self._note_fired(indices, n_tokens)
        state.fvu_history.append(fvu.tolist())
        state.l0_history.append(l0)
        stepped = (state.global_step + 1) % self.cfg.grad_acc_steps == 0
        if stepped:
            self._optimizer_step(acts, variances)
            self._update_dead_counts()
        state.global_step += 1
        if stepped and self.cfg.grad_acc_steps > 1:
            self._step_mark = StepMark.of(state)
        # the progress bar's figure: per-hookpoint FVUs are ~1 at the start, their sum is not
        return {"mean_fvu": fvu.mean().item(), **metrics}

    def _activations(self, batch: dict[str, Any], device: torch.device) -> Activations:
        """The batch's activations at every hookpoint (with the logits for `--loss_fn kl`)."""
        if "inputs" not in batch:
            # no examples for this rank (a run's last, short batch, or all its images
            # unreadable): the other ranks' collectives still need it, with no tokens
            d = self.model.config.get_text_config().hidden_size
            empty = [torch.empty(0, d, device=device, dtype=self.model.dtype)] * len(
                self.coders.hookpoints
            )
            return Activations(empty, empty)
        model_inputs, mask = self._to_device(batch, device)
        if self.cfg.loss_fn == "kl":
            inputs, outputs, clean_logits = collect_activations_and_logits(
                self.model, self.coders.hookpoints, model_inputs, mask
            )
            return Activations(inputs, outputs, model_inputs, mask, clean_logits)
        inputs, outputs = collect_activations(
            self.model, self.coders.hookpoints, model_inputs, mask
        )
        return Activations(inputs, outputs, model_inputs, mask)

    def _losses(
        self, acts: Activations, variances: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[float], dict[str, Any]]:
        """Forward and backward of the step's losses (FVU, AuxK, the end-to-end loss); returns
        the global FVU per target (checked finite), active indices and L0 per source, and the
        metrics besides the FVU."""
        loss_fn, acc_steps = self.cfg.loss_fn, self.cfg.grad_acc_steps
        dead_masks = None
        if self.cfg.auxk_alpha > 0:
            threshold = self.cfg.dead_feature_threshold
            dead_masks = [counts > threshold for counts in self.state.tokens_since_fired]
        fvu, indices, l0, auxk = loss_per_target(
            self.coders,
            acts.inputs,
            acts.outputs,
            variances,
            self.cfg.micro_acc_steps,
            1 / acc_steps,
            backward=loss_fn == "fvu",  # end to end: FVU is only reported
            dead_masks=dead_masks,
            auxk_alpha=self.cfg.auxk_alpha,
        )
        metrics: dict[str, Any] = {}
        if dead_masks is not None:
            metrics["auxk"] = float(_all_sum(torch.tensor(auxk)))
        if loss_fn != "fvu":
            metrics[loss_fn] = self._end_to_end_step(
                acts.model_inputs, acts.mask, acts.clean_logits, acc_steps
            )
        fvu = _all_sum(fvu)  # each rank holds its share of the global FVU
        self._check_finite_fvu(fvu)
        return fvu, indices, l0, metrics

    def _check_finite_fvu(self, fvu: Tensor) -> None:
        if torch.isfinite(fvu).all():
            return
        bad = [
            h
            for h, v in zip(self.coders.hookpoints, fvu.tolist(), strict=True)
            if not math.isfinite(v)
        ]
        raise NonFiniteLossError(
            f"non-finite FVU at step {self.state.global_step} (batch {self.state.batches_seen - 1}) "
            f"for {bad}; {self._checkpoint_note()}. {self._non_finite_hint()}"
        )

    def _note_fired(self, indices: list[Tensor], n_tokens: int) -> None:
        """Remember which latents fired in this batch, and its tokens, until the optimizer step."""
        if self._fired is None:
            self._fired = [
                torch.zeros_like(counts, dtype=torch.bool)
                for counts in self.state.tokens_since_fired
            ]
        for fired, idx in zip(self._fired, indices, strict=True):
            fired[idx.flatten()] = True
        self._tokens_in_step += n_tokens

    def _update_dead_counts(self) -> None:
        """At an optimizer step, as sparsify.Trainer: tokens since each latent last fired grow by
        the step's tokens (all its `grad_acc_steps` batches) and restart where it fired in any of
        them on any rank; the dead masks of AuxK change only here."""
        assert self._fired is not None
        for counts, fired in zip(self.state.tokens_since_fired, self._fired, strict=True):
            if dist.is_initialized():
                fired_int = fired.int()
                dist.all_reduce(fired_int, op=dist.ReduceOp.MAX)
                fired = fired_int.bool()
            counts += self._tokens_in_step
            counts[fired] = 0
        self._fired, self._tokens_in_step = None, 0

    def _optimizer_step(self, acts: Activations, variances: list[Tensor]) -> None:
        """Sum the gradients over ranks and step every optimizer and scheduler; then, with
        `check_update`, check the updated weights on the batch that updated them (`acts`)."""
        sum_gradients(self.coders)
        self.coders.before_optimizer_step()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad()
        for scheduler in self.schedulers:
            scheduler.step()
        if self.check_update:
            self._check_updated_loss(acts.inputs, acts.outputs, variances)

    @staticmethod
    def _to_device(batch: dict[str, Any], device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
        """Model inputs and token mask, copied asynchronously from pinned batches (batch_loader
        pins them on a GPU)."""
        model_inputs = {k: v.to(device, non_blocking=True) for k, v in batch["inputs"].items()}
        return model_inputs, batch["token_mask"].to(device, non_blocking=True)

    def _end_to_end_step(
        self,
        model_inputs: dict[str, Tensor] | None,
        mask: Tensor | None,
        clean_logits: Tensor | None,
        acc_steps: int,
    ) -> float:
        """Backward of the end-to-end loss (docs: end_to_end.py); returns its global mean
        (`model_inputs` None: this rank has no examples this step and only joins the sums)."""
        if self._replacement is None:
            # training sends gradients into the coders' own weights: no inference copies (and
            # whole coders: sparsify's TrainConfig refuses --distribute_modules with kl / ce)
            self._replacement = ReplacementModel(
                self.model, whole_coders(self.coders), mode="open-loop", decoder="per-target"
            )
        if model_inputs is None or mask is None:
            device = next(self.coders.parameters()).device
            total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        else:
            total, count = end_to_end_sum(
                self.cfg.loss_fn, self._replacement, model_inputs, mask, clean_logits
            )
        n = _all_sum(count.float())
        loss = total / n.clamp_min(1)
        value = float(_all_sum(loss.detach().clone()))
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite end-to-end {self.cfg.loss_fn} at step {self.state.global_step} "
                f"(batch {self.state.batches_seen - 1}); {self._checkpoint_note()}. "
                f"{self._non_finite_hint()}"
            )
        if loss.requires_grad:
            loss.div(acc_steps).backward()
        self.state.loss_history.append(value)
        return value

    def fit(self, batches: Iterable[dict[str, Any]], total: int | None = None) -> None:
        rank_zero = not dist.is_initialized() or dist.get_rank() == 0
        self.model.requires_grad_(False)
        pbar = tqdm(
            desc="Training", total=total, initial=self.state.batches_seen, disable=not rank_zero
        )
        if self.cfg.grad_acc_steps > 1:
            self._step_mark = StepMark.of(self.state)
        self._in_step = False
        try:
            self._fit_loop(batches, pbar, total)
        except KeyboardInterrupt:
            pbar.close()  # ends the bar's line: Ctrl-C's note is printed on its own
            self._save_interrupted()
            raise
        finally:  # ends the bar's line: an error is printed on its own
            pbar.close()
        self.dropped_batches = self._end_at_optimizer_step()
        if self.state.global_step == 0 and self.dropped_batches:
            raise NoTrainingDataError(
                f"the run ended after {self.dropped_batches} batches, fewer than --grad_acc_steps "
                f"{self.cfg.grad_acc_steps}: no optimizer step, nothing saved; pass a larger "
                "--max_examples or a smaller --grad_acc_steps"
            )
        if self.state.global_step == 0:
            skipped = len(self.state.skipped)
            raise NoTrainingDataError(
                f"nothing to train on: {self.state.batches_seen} batches"
                + (
                    f", {skipped} examples skipped (missing or unreadable images)"
                    if skipped
                    else ""
                )
                + "; check DATASET, --max_examples and --tokens"
            )
        if self.checkpoint:
            self._save()

    def _end_at_optimizer_step(self) -> int:
        """A run that ends mid-accumulation: the batches since the last optimizer step updated
        nothing (as in stock sparsify, their partial gradient is not applied). The state goes
        back to that step, which the weights are at, so the final checkpoint counts only what
        was optimized and `--resume` with a larger --max_examples trains those batches again,
        bit for bit as one longer run. Returns how many trained batches were dropped."""
        mark = self._step_mark
        if mark is None or mark.global_step == self.state.global_step:
            return 0
        dropped = self.state.global_step - mark.global_step
        mark.restore(self.state)
        self._fired, self._tokens_in_step = None, 0
        for opt in self.optimizers:
            opt.zero_grad()
        return dropped

    def _fit_loop(self, batches: Iterable[dict[str, Any]], pbar: Any, total: int | None) -> None:
        """`fit`'s steps, with a checkpoint every `save_every` steps at an optimizer step."""
        save_due = False
        for batch in batches:
            upcoming = self.state.global_step + 1  # if this batch trains
            last = total is not None and self.state.batches_seen + 1 >= total
            self.check_update = bool(self.checkpoint) and upcoming % self.cfg.grad_acc_steps == 0
            self.check_update &= save_due or upcoming % self.cfg.save_every == 0 or last
            # Ctrl-C or SIGTERM in a step stops the run after it (a second one at once), so
            # that `fit` can save where it stopped (`_save_interrupted`)
            self._in_step = True
            with interrupts_deferred(f"step {upcoming}", second_stops=True):
                metrics = self.train_on_batch(batch)
                pbar.update()
                if metrics:
                    pbar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
                if self.on_step and metrics:
                    self.on_step(self, metrics)
                self._in_step = False  # a deferred Ctrl-C comes as the block ends, after this
            step = self.state.global_step
            if not (self.checkpoint and metrics):
                continue
            save_due = save_due or step % self.cfg.save_every == 0
            # mid-accumulation, part of the gradient sits in .grad, which a checkpoint does not
            # hold: a due save waits for the optimizer step (a resumed run then matches bit for bit)
            if save_due and step % self.cfg.grad_acc_steps == 0:
                self._save()
                save_due = False

    def _save_interrupted(self) -> None:
        """Ctrl-C or SIGTERM came between two steps (`_fit_loop` defers it to the end of a
        step): a single process saves a checkpoint there, at the last optimizer step
        (`_end_at_optimizer_step`), so that --resume goes on where the run stopped, bit for bit
        as one uninterrupted run. Not after a second Ctrl-C that stopped a step half-way, nor
        across processes (they would have to agree on the step), where the last periodic
        checkpoint stays the one to resume."""
        if self._in_step or self.checkpoint is None:
            return
        if dist.is_initialized() and dist.get_world_size() > 1:
            return
        self.dropped_batches = self._end_at_optimizer_step()
        if self.state.global_step not in (0, self.saved_step):
            self._save()

    def _save(self) -> None:
        """A checkpoint, written whole: Ctrl-C or SIGTERM during it (its copy to RUN-best
        included) stops the run once it is on disk, so what the run says it saved is."""
        assert self.checkpoint is not None
        self._check_finite_weights()
        with interrupts_deferred(f"the checkpoint of step {self.state.global_step} is written"):
            self.checkpoint(self)
            self.saved_step = self.state.global_step

    def summary(self, window: int = 20) -> list[dict[str, Any]]:
        """Per hookpoint: FVU and L0 averaged over the last `window` steps; dead % (latents that
        did not fire in the last `dead_feature_threshold` tokens, or the whole run if shorter)
        and never-fired % (no firing in the whole run, comparable between thresholds)."""
        state = self.state
        recent_fvu = state.fvu_history[-window:]
        recent_l0 = state.l0_history[-window:]
        horizon = min(self.cfg.dead_feature_threshold, state.tokens_seen)
        rows = []
        for i, hookpoint in enumerate(self.coders.hookpoints):
            counts = state.tokens_since_fired[i]
            rows.append(
                {
                    "hookpoint": hookpoint,
                    "n_targets": self.coders.n_targets(i),
                    "fvu": sum(r[i] for r in recent_fvu) / max(len(recent_fvu), 1),
                    "l0": sum(r[i] for r in recent_l0) / max(len(recent_l0), 1),
                    "dead_pct": 100.0 * float((counts >= max(horizon, 1)).float().mean()),
                    "never_fired_pct": 100.0
                    * float((counts >= max(state.tokens_seen, 1)).float().mean()),
                }
            )
        return rows

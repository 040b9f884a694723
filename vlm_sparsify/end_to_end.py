"""End-to-end losses (`--loss_fn kl` / `--loss_fn ce`): train the coders through the replacement.

sparsify's two end-to-end options, for transcoders (PLT or CLT) on a VLM:

- `kl`: KL divergence from the original model's next-token distribution to the replaced model's,
  summed over the vocabulary, averaged over the batch's training positions (its token mask);
- `ce`: next-token cross-entropy of the replaced model, averaged over the positions whose next
  token is text (not an image token, not padding).

"Replaced" is exactly `ReplacementModel(mode="open-loop")`: every hookpoint's MLP output is the
coders' prediction at every position, and a CLT's target t sums the sources reaching it, each
encoded from the replaced stream. Gradients flow through the frozen model into every coder, so
what is trained is what fidelity measures and discovery runs. Dividing by the global number of
positions makes data-parallel gradients add up to the global mean, as with FVU.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm_sparsify.replacement import ReplacementModel

LossFn = Literal["fvu", "kl", "ce"]
END_TO_END: tuple[LossFn, ...] = ("kl", "ce")


def check_end_to_end(
    loss_fn: str,
    micro_acc_steps: int,
    transcode: bool | None = None,
    local_terms: bool = False,
) -> None:
    """Clear errors for settings the end-to-end losses do not support (transcode None: unknown
    yet, e.g. before a recipe's defaults apply; local_terms: --auxk_alpha or --multi_topk)."""
    if loss_fn not in ("fvu", *END_TO_END):
        raise ValueError(f"unknown --loss_fn '{loss_fn}'; choose fvu, kl or ce")
    if loss_fn == "fvu":
        return
    if transcode is False:
        raise ValueError(
            f"--loss_fn {loss_fn} trains transcoders (per-layer or --cross_layer) through the "
            "replacement model; sparse autoencoders train with --loss_fn fvu here"
        )
    if local_terms:
        raise ValueError(
            f"--auxk_alpha and --multi_topk add to the local FVU loss; --loss_fn {loss_fn} "
            "trains on the replacement model's output only"
        )
    if micro_acc_steps > 1:
        raise ValueError(
            f"--micro_acc_steps {micro_acc_steps} does not apply to --loss_fn {loss_fn} (one "
            "forward through the whole model per batch); use --grad_acc_steps instead"
        )


def replaced_logits(replacement: ReplacementModel, inputs: dict[str, Tensor]) -> Tensor:
    """Logits of the model with every hookpoint replaced (open loop), with gradients."""
    with replacement:
        return replacement.model(**inputs).logits


def kl_sum(logits: Tensor, clean_logits: Tensor, mask: Tensor) -> Tensor:
    """Sum over the masked positions of KL(original || replaced), in float32."""
    log_p = clean_logits[mask].float().log_softmax(-1)
    log_q = logits[mask].float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def next_text_positions(input_ids: Tensor, attention_mask: Tensor, image_id: int | None) -> Tensor:
    """[batch, seq - 1]: positions whose next token is a real text token."""
    positions = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if image_id is not None:
        positions &= input_ids[:, 1:] != image_id
    return positions


def ce_sum(logits: Tensor, input_ids: Tensor, positions: Tensor) -> Tensor:
    """Summed next-token cross-entropy over `positions` ([batch, seq - 1]), in float32."""
    predicted = logits[:, :-1][positions].float()
    return F.cross_entropy(predicted, input_ids[:, 1:][positions], reduction="sum")


def end_to_end_sum(
    loss_fn: LossFn,
    replacement: ReplacementModel,
    inputs: dict[str, Tensor],
    mask: Tensor,
    clean_logits: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(summed loss with gradients, number of positions it sums over) for one local batch."""
    logits = replaced_logits(replacement, inputs)
    if loss_fn == "kl":
        assert clean_logits is not None
        return kl_sum(logits, clean_logits, mask), mask.sum()
    input_ids = inputs["input_ids"]
    attention = inputs.get("attention_mask", torch.ones_like(input_ids))
    positions = next_text_positions(input_ids, attention, replacement.image_token_id)
    return ce_sum(logits, input_ids, positions), positions.sum()

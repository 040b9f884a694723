"""Schedule-free SignSGD (`--optimizer signum`) without schedulefree's buffer swaps.

Stock `ScheduleFreeWrapper.step` swaps each parameter with its `z` buffer (three in-place XORs of
uint8 views) before and after the base optimizer's step, so that the base steps `z` through the
parameter. On an H200 a CLT with 392 bf16 decoders of 8192 x 4096 spent ~137 ms per step in those
six XORs per parameter and the lerps: about 32 passes over the parameters where the arithmetic
needs about 14. `ScheduleFreeSignSGD` applies SignSGD's update to `z` itself, with the same ops in
the same dtypes, so its parameters, `z` and group entries are bit for bit the stock wrapper's; its
state dict is the base's, as stock's is, so checkpoints load in either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from schedulefree import ScheduleFreeWrapper
from sparsify.sign_sgd import SignSGD


class ScheduleFreeSignSGD(ScheduleFreeWrapper):
    """`ScheduleFreeWrapper(SignSGD(...))` whose step updates `z` in place instead of swapping
    it into the parameter; `train()`, `eval()` and the state dict are the stock wrapper's."""

    def __init__(
        self,
        base: SignSGD,
        weight_decay_at_y: float = 0.0,
        momentum: float = 0.9,
        weight_lr_power: float = 2,
        r: float = 0,
    ) -> None:
        # exactly SignSGD: a subclass could change the update that step() writes out here
        if type(base) is not SignSGD:
            raise TypeError(
                f"ScheduleFreeSignSGD applies sparsify's SignSGD update itself, got a base "
                f"{type(base).__name__}; wrap other optimizers in schedulefree.ScheduleFreeWrapper"
            )
        super().__init__(base, weight_decay_at_y, momentum, weight_lr_power, r)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if not self.train_mode:
            raise RuntimeError(
                "ScheduleFreeSignSGD.step called outside train mode; call .train() before "
                "training steps and .eval() before evaluating"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            # the stock wrapper's averaging weight, computed from the same floats in the same order
            lr = group["lr"]
            k = group.get("k", 0)
            lr_max = group["lr_max"] = max(lr * group.get("d", 1.0), group.get("lr_max", 0))
            weight = ((k + 1) ** self.r) * (lr_max**self.weight_lr_power)
            weight_sum = group["weight_sum"] = group.get("weight_sum", 0.0) + weight
            ckp1 = weight / weight_sum

            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                z = state["z"]

                if self.weight_decay_at_y != 0.0:
                    z.sub_(p, alpha=lr * self.weight_decay_at_y)
                    p.sub_(p, alpha=lr * self.weight_decay_at_y * (1 - self.momentum))
                p.lerp_(end=z, weight=1 - 1 / self.momentum)  # y -> x
                z.add_(p.grad.sign(), alpha=-lr)  # SignSGD.step, applied to z
                p.lerp_(end=z, weight=ckp1)  # x towards z
                p.lerp_(end=z, weight=1 - self.momentum)  # x -> y

            group["k"] = k + 1

        return loss

"""Weights & Biases logging of a training run, as `python -m sparsify` does it.

`--log_to_wandb` (on by default, as in sparsify) and `--wandb_log_frequency N`: on rank 0,
every N steps, `fvu/<hookpoint>` and `l0/<hookpoint>` averaged over those steps,
`dead_pct/<hookpoint>` (latents that did not fire in the last `--dead_feature_threshold`
tokens), `auxk` (with `--auxk_alpha`), the end-to-end loss (`kl_loss` / `ce_loss`) and `k`.
Project and entity come from `WANDB_PROJECT` (default `vlm_sparsify`) and `WANDB_ENTITY`, the
run's name from `--run_name`, its config is the run's `config.json` (never the token; the command
line that W&B records with the run shows it as `***`). Without wandb installed it says so and the
run goes on.
"""

from __future__ import annotations

import os
from typing import Any

END_TO_END_KEYS = {"kl": "kl_loss", "ce": "ce_loss"}


class WandbLog:
    """`trainer.on_step`: collects each step's figures and logs their means every `frequency`."""

    def __init__(self, run: Any, frequency: int):
        self.run = run
        self.frequency = max(frequency, 1)
        self._steps: list[tuple[list[float], list[float], dict[str, Any]]] = []

    @classmethod
    def start(cls, name: str, config: dict[str, Any], frequency: int) -> WandbLog | None:
        try:
            import wandb

            run = wandb.init(
                entity=os.environ.get("WANDB_ENTITY"),
                project=os.environ.get("WANDB_PROJECT", "vlm_sparsify"),
                name=name,
                config=config,
            )
        except (AttributeError, ImportError):
            print("Weights & Biases not available, skipping logging (pip install wandb to log).")
            return None
        return cls(run, frequency)

    def __call__(self, trainer: Any, metrics: dict[str, Any]) -> None:
        state = trainer.state
        self._steps.append((state.fvu_history[-1], state.l0_history[-1], metrics))
        if state.global_step % self.frequency:
            return
        n = len(self._steps)
        threshold = trainer.cfg.dead_feature_threshold
        info: dict[str, float] = {}
        for i, hookpoint in enumerate(trainer.coders.hookpoints):
            info[f"fvu/{hookpoint}"] = sum(fvu[i] for fvu, _, _ in self._steps) / n
            info[f"l0/{hookpoint}"] = sum(l0[i] for _, l0, _ in self._steps) / n
            dead = state.tokens_since_fired[i] > threshold
            info[f"dead_pct/{hookpoint}"] = float(dead.float().mean())
        for key, name in {"auxk": "auxk", **END_TO_END_KEYS}.items():
            values = [m[key] for _, _, m in self._steps if key in m]
            if values:
                info[name] = sum(values) / len(values)
        info["k"] = trainer.current_k()
        self.run.log(info, step=state.global_step)
        self._steps.clear()

    def finish(self) -> None:
        self.run.finish()

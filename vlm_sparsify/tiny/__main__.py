"""`python -m vlm_sparsify.tiny [--out DIR] [--seed N] [--steps N] [--patch_size N] ...`.

Retrains the tiny LLaVA: training flags are `TrainConfig`'s, architecture flags `TinyShape`'s
(defaults: the shipped model).
"""

from __future__ import annotations

from simple_parsing import ArgumentParser

from vlm_sparsify.tiny.build import TinyShape
from vlm_sparsify.tiny.train import TrainConfig, train


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, TinyShape]:
    parser = ArgumentParser(prog="python -m vlm_sparsify.tiny", description=__doc__)
    parser.add_arguments(TrainConfig, dest="config")
    parser.add_arguments(TinyShape, dest="shape")
    args = parser.parse_args(argv)
    return args.config, args.shape


def run(argv: list[str] | None = None) -> None:
    config, shape = parse_args(argv)
    train(config, shape)
    print(
        f"Saved to {config.out}. Evaluate: python -m vlm_sparsify.tiny.evaluate {config.out}; "
        f"use it elsewhere with --model {config.out} --recipe tiny_llava"
    )


if __name__ == "__main__":
    run()

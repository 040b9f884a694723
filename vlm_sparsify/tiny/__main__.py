"""`python -m vlm_sparsify.tiny [--out DIR] [--seed N] [--steps N] ...`: retrain the tiny LLaVA."""

from simple_parsing import parse

from vlm_sparsify.tiny.train import TrainConfig, train


def run() -> None:
    config = parse(TrainConfig)
    train(config)
    print(
        f"Saved to {config.out}. Evaluate: python -m vlm_sparsify.tiny.evaluate {config.out}; "
        f"use it elsewhere with --model {config.out} --recipe tiny_llava"
    )


if __name__ == "__main__":
    run()

"""`python -m vlm_sparsify.tiny [--out DIR] [--seed N] [--steps N] ...`: retrain the tiny LLaVA."""

from simple_parsing import parse

from vlm_sparsify.tiny.train import TrainConfig, train


def run() -> None:
    train(parse(TrainConfig))


if __name__ == "__main__":
    run()

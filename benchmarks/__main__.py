"""`python -m benchmarks BENCHMARK STAGE [flags]`.

A stage is `benchmarks/<benchmark>/<stage>.py` when the benchmark has its own (e.g. `score`),
otherwise the shared `benchmarks/stages/<stage>.py`. Each exposes `main(argv, benchmark) -> None`.
"""

import sys

from benchmarks import BENCHMARKS, STAGES
from benchmarks.stages import stage_module
from vlm_sparsify.cli import USER_ERRORS, how_stopped, reported_interrupt, run_cli

STAGE_HELP = {
    "capture": "generate the responses (and, with --coders RUN, store the coders' features)",
    "score": "the benchmark's official metrics of the responses",
    "classify": "label each sample GOOD / BAD",
    "attribute": "activation x gradient of each feature on the answer (needs the store)",
    "analyze": "features that tell GOOD from BAD samples, with FDR control",
    "plot": "PNG charts of analyze's features",
    "examples": "each feature's top samples: an HTML page with image patches and tokens",
    "map": "each feature's MLP neurons, checked on the model",
    "steer": "scale or clamp features (scale neurons) on held-out samples, with random controls",
    "all": "every stage above in order (trains a small CLT first without --coders)",
}


RESUMABLE = ("capture", "steer", "all")
"""Stages whose rerun goes on from what an interrupted run wrote (capture's batches, steer's
conditions, all's stages and CLT checkpoints); the others start over."""


def run(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m benchmarks {{{','.join(BENCHMARKS)}}} {{{','.join(STAGES)}}} [flags]"
    if any(arg in ("-h", "--help") for arg in argv[:2]) and (
        len(argv) < 2 or argv[1] not in STAGES
    ):  # `--help` before a stage: what the stages are (a stage's own `--help` gives its flags)
        width = max(map(len, STAGES))
        stages = "\n".join(f"  {stage:<{width}}  {STAGE_HELP[stage]}" for stage in STAGES)
        print(
            f"{usage}\n\nstages, in the order they run:\n{stages}\n\n"
            "flags: python -m benchmarks BENCH STAGE --help; details: docs/benchmarks.md"
        )
        raise SystemExit(0)
    if len(argv) < 2:
        raise SystemExit(usage)
    benchmark, stage, rest = argv[0], argv[1], argv[2:]
    if benchmark not in BENCHMARKS:
        raise SystemExit(
            f"unknown benchmark '{benchmark}'; known: {', '.join(BENCHMARKS)}\n{usage}"
        )
    if stage not in STAGES:
        raise SystemExit(f"unknown stage '{stage}'; known: {', '.join(STAGES)}\n{usage}")
    module = stage_module(benchmark, stage)
    try:
        module.main(rest, benchmark=benchmark)
    except USER_ERRORS as err:  # bad input or a missing earlier stage: one line, no traceback
        raise SystemExit(f"{benchmark} {stage}: {err}") from None
    except KeyboardInterrupt as err:
        if stage not in RESUMABLE:
            raise
        print(
            f"\n{benchmark} {stage}: {how_stopped(err)}; what it wrote is kept: rerun the same "
            "command to go on from there",
            file=sys.stderr,
        )
        raise reported_interrupt(err) from None


if __name__ == "__main__":
    run_cli(run)  # Ctrl-C: no traceback (a stage's work so far is kept; rerun it to resume)

"""Benchmark-independent stages: each module exposes `main(argv, benchmark)`."""

from __future__ import annotations

import importlib
from types import ModuleType


def stage_module(benchmark: str, stage: str) -> ModuleType:
    """`benchmarks/<benchmark>/<stage>.py` when the benchmark has its own, else the shared
    `benchmarks/stages/<stage>.py`."""
    for name in (f"benchmarks.{benchmark}.{stage}", f"benchmarks.stages.{stage}"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
    raise SystemExit(f"stage '{stage}' is not implemented for '{benchmark}'")

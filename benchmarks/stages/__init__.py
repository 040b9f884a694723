"""Benchmark-independent stages: each module exposes `main(argv, benchmark)`."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, TypeVar

from simple_parsing import DashVariant

from vlm_sparsify.cli import ArgumentParser

ConfigT = TypeVar("ConfigT")


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


def check_limit(limit: int | None) -> None:
    """`--limit N` takes the first N items: N must be positive (a negative N would slice from
    the end, silently dropping the last items instead)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: give a positive number of items, or leave it out")


def stage_parser(
    benchmark: str, stage: str, config_class: type, default: Any = None, **groups: type
) -> ArgumentParser:
    """The flags of `python -m benchmarks BENCHMARK STAGE`: `config_class`'s fields (parsed into
    `.config`; `default` replaces their defaults), then each of `groups` under its name; every
    flag is spelt with dashes or underscores."""
    parser = ArgumentParser(
        prog=f"python -m benchmarks {benchmark} {stage}",
        add_option_string_dash_variants=DashVariant.UNDERSCORE_AND_DASH,
    )
    parser.add_arguments(config_class, dest="config", default=default)
    for dest, group in groups.items():
        parser.add_arguments(group, dest=dest)
    return parser


def parse_stage(
    argv: list[str], benchmark: str, stage: str, config_class: type[ConfigT]
) -> ConfigT:
    """A stage's config from its command line (`stage_parser`)."""
    return stage_parser(benchmark, stage, config_class).parse_args(argv).config

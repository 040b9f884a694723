"""Tests of the benchmark modules; data files come from `shared/data` beside the repository."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under shared/data, skipping the test when the folder is not checked out beside the repo."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"benchmark data {path} absent: clone the shared/ data folder beside the repository"
        )
    return path

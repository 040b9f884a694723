"""The type-checking gate: mypy (pinned in the `test` extra, configured in pyproject.toml's
[tool.mypy]) finds no error in `vlm_sparsify` and `benchmarks`.

mypy's cache is the repository's `.mypy_cache` (as `make lint` leaves it): the first run reads
torch and transformers (a minute or two), later runs only what changed (seconds).
"""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm_sparsify", "benchmarks")


def test_mypy_finds_no_type_errors() -> None:
    api = pytest.importorskip(
        "mypy.api", reason="mypy is not installed: pip install -e '.[test]' (it pins mypy)"
    )
    from mypy.version import __version__ as mypy_version

    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(REPO / ".mypy_cache"),
            *(str(REPO / package) for package in PACKAGES),
        ]
    )
    assert status == 0, f"mypy {mypy_version} (exit status {status}):\n{stdout}{stderr}"

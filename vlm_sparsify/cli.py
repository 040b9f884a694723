"""How the command-line tools end on bad input: one line saying what is wrong, no traceback."""

from __future__ import annotations

from collections.abc import Callable

USER_ERRORS = (ValueError, FileNotFoundError, OSError)
"""What bad input raises (a wrong path, a corrupt file, a setting that cannot work)."""


def run_cli(main: Callable[[], object], *errors: type[Exception]) -> None:
    """Run a tool's `main`; a user error (or one of the tool's own `errors`) ends it with one
    line (exit status 1), Ctrl-C with status 130; no traceback."""
    try:
        main()
    except (*USER_ERRORS, *errors) as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None

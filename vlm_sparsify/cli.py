"""How the command-line tools end on bad input: one line saying what is wrong, no traceback."""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from difflib import get_close_matches
from typing import Any, NoReturn, TypeVar

import simple_parsing

USER_ERRORS = (ValueError, OSError)
"""What bad input raises (a wrong path, a corrupt file, a setting that cannot work). Every OSError
counts (FileNotFoundError, PermissionError, IsADirectoryError, a full disk, a network error
downloading from the Hub): each names the path or address at fault, which the user fixes."""


ConfigT = TypeVar("ConfigT")


def run_cli(main: Callable[[], object], *errors: type[Exception]) -> None:
    """Run a tool's `main`; a user error (or one of the tool's own `errors`) ends it with one
    line (exit status 1), Ctrl-C with status 130 and one line (unless the tool said where its
    work is already: `reported_interrupt`), SIGTERM as Ctrl-C but with status 143; no traceback.
    Warnings print as one line each (`warning: ...`) instead of Python's two with a source
    line."""
    formatted = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    caught: tuple[type[Exception], ...] = (*USER_ERRORS, *errors)
    try:
        with sigterm_as_interrupt():
            main()
    except caught as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt as err:
        if not getattr(err, "reported", False):
            print(f"\n{how_stopped(err)}", file=sys.stderr)
        raise SystemExit(143 if isinstance(err, Terminated) else 130) from None
    finally:
        warnings.formatwarning = formatted


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, such as SLURM at its time limit, or `kill`), raised
    where Ctrl-C would be: the same cleanup (a checkpoint being written is removed, the last one
    kept) and the same note on where the work is."""


def how_stopped(err: KeyboardInterrupt) -> str:
    """'terminated (SIGTERM)' or 'interrupted (Ctrl-C)', for the line a tool ends with."""
    return "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread instead of ending the
    process at once (silently, leaving a half-written checkpoint's temporary folder)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_deferred(what: str, second_stops: bool = False) -> Iterator[None]:
    """Ctrl-C and SIGTERM take effect when the block ends, not inside it (`what`: the work it
    does, named when one comes); the block runs in full unless it fails. With `second_stops`,
    a second one takes effect at once (a block that may hang, such as a training step waiting
    on other processes, can still be stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def defer(signum: int, frame: object) -> None:
        if not caught:
            again = " (again to stop at once)" if second_stops else ""
            print(
                f"\n{signal.Signals(signum).name}: stopping once {what} is done{again}",
                file=sys.stderr,
            )
        elif second_stops:
            signal.signal(signum, previous[signal.Signals(signum)])
            signal.raise_signal(signum)
        caught.append(signum)

    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, defer) for s in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:  # to the handlers the block replaced: KeyboardInterrupt, Terminated or an exit
        signal.raise_signal(caught[0])


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    return f"warning: {message}\n"


def reported_interrupt(err: KeyboardInterrupt) -> KeyboardInterrupt:
    """Mark Ctrl-C as told to the user (the tool printed its own line): `run_cli` adds none."""
    # a flag on this instance (KeyboardInterrupt declares no such field), read with getattr
    err.reported = True  # type: ignore[attr-defined]
    return err


class ArgumentParser(simple_parsing.ArgumentParser):
    """simple-parsing's parser; a mistyped flag is one line with the closest flag, not the whole
    usage (tens of lines) followed by argparse's bare `unrecognized arguments`.

    `not_taken` maps flags of another tool this one refuses (stock sparsify's) to what to use
    instead, said in place of the closest flag. Abbreviated flags are not taken (argparse would
    read `steer --factor 2` as `--factors 2`): they get the closest flag too."""

    def __init__(self, *args: Any, not_taken: dict[str, str] | None = None, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.not_taken = not_taken or {}

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            super().error(message)
        flags = [o for action in self._actions for o in action.option_strings]
        unknown = message[len(prefix) :].split()
        hints = []
        secret = False  # the value of a mistyped token flag is never printed
        for arg in unknown:
            if secret and not arg.startswith("-"):
                hints.append("***")
                secret = False
                continue
            name, eq, _ = arg.partition("=")
            secret = "token" in name.lower() and arg.startswith("-")
            shown = f"{name}=***" if secret and eq else arg
            secret = secret and not eq
            close = get_close_matches(name, flags, n=1, cutoff=0.75)
            if name in self.not_taken:
                hints.append(
                    f"{shown} (stock sparsify's flag, not taken here: {self.not_taken[name]})"
                )
            elif close:
                hints.append(f"{shown} (did you mean {close[0]}?)")
            elif arg[1:2].isdigit():  # argparse reads `--edit -1:3:zero` as two flags
                hints.append(f"{shown} (a value that starts with '-' is given as --FLAG=VALUE)")
            else:
                hints.append(shown)
        self.exit(
            2,
            f"{self.prog}: error: unknown flag{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(hints)}; `{self.prog} --help` lists them\n",
        )


def parse_config(config_class: type[ConfigT], argv: list[str] | None, prog: str) -> ConfigT:
    """A tool's `config_class` from `argv` (`sys.argv[1:]` when None) with `ArgumentParser`: flags
    spelt with dashes or underscores, none abbreviated, the closest flag for a mistyped one; the
    class's docstring is the description."""
    parser = ArgumentParser(
        prog=prog,
        description=config_class.__doc__,
        add_option_string_dash_variants=simple_parsing.DashVariant.UNDERSCORE_AND_DASH,
    )
    dataclass: type = config_class  # simple-parsing types it as a dataclass, not any ConfigT
    parser.add_arguments(dataclass, dest="config")
    return parser.parse_args(sys.argv[1:] if argv is None else argv).config

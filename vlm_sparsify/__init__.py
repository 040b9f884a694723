"""vlm_sparsify: sparsify coders (SAEs, PLTs, CLTs) on vision-language models."""

import contextlib
import io
import signal
import sys
from types import FrameType


def _stop_while_loading(signum: int, frame: FrameType | None) -> None:
    print("\ninterrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130)


# `python -m vlm_sparsify...` / `python -m benchmarks ...` import this package while runpy still
# holds "-m" in sys.argv[0]: Ctrl-C in the seconds torch and sparsify take to load ends the tool
# as Ctrl-C later does (one line, status 130), not with a traceback through the import machinery
_TOOL_STARTING = sys.argv[:1] == ["-m"]
_handler = signal.signal(signal.SIGINT, _stop_while_loading) if _TOOL_STARTING else None

import torch  # noqa: E402

# sparsify announces its decoder kernel on stdout at import: to stderr (stdout carries our JSON
# output), and not at all without a GPU, where Triton's absence changes nothing
with contextlib.redirect_stdout(sys.stderr if torch.cuda.is_available() else io.StringIO()):
    import sparsify  # noqa: F401

if _TOOL_STARTING:
    signal.signal(signal.SIGINT, _handler)

__version__ = "0.1.0"

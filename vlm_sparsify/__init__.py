"""vlm_sparsify: sparsify coders (SAEs, PLTs, CLTs) on vision-language models."""

import contextlib
import sys

# sparsify announces its decoder kernel on stdout at import; keep stdout for our JSON output
with contextlib.redirect_stdout(sys.stderr):
    import sparsify  # noqa: F401

__version__ = "0.1.0"

"""vlm_sparsify: sparsify coders (SAEs, PLTs, CLTs) on vision-language models."""

import contextlib
import io
import sys

import torch

# sparsify announces its decoder kernel on stdout at import: to stderr (stdout carries our JSON
# output), and not at all without a GPU, where Triton's absence changes nothing
with contextlib.redirect_stdout(sys.stderr if torch.cuda.is_available() else io.StringIO()):
    import sparsify  # noqa: F401

__version__ = "0.1.0"

"""vlm_sparsify: sparsify coders (SAEs, PLTs, CLTs) on vision-language models."""

__version__ = "0.1.0"

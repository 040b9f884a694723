"""Benchmark-independent stages: each module exposes `main(argv, benchmark)`."""

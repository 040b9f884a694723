"""Hallucination benchmarks (POPE, AMBER, easy-VQA) on top of vlm_sparsify."""

BENCHMARKS = ("pope", "amber", "easyvqa")
STAGES = (
    "capture", "score", "classify", "attribute", "analyze", "plot", "examples", "map", "steer",
    "all",
)  # fmt: skip

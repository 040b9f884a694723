"""`--save_best`: RUN-best holds the coders of this run only."""

from pathlib import Path

from sparsify import SparseCoderConfig

from vlm_sparsify.best_checkpoint import best_dir, keep_best
from vlm_sparsify.coder_io import load_coders, save_coders
from vlm_sparsify.per_layer import PerLayerCoders

HOOKS = [f"model.language_model.layers.{i}.mlp" for i in range(4)]


def test_a_new_run_s_first_best_leaves_nothing_of_an_earlier_run_of_that_name(
    tmp_path: Path,
) -> None:
    cfg = SparseCoderConfig(num_latents=16, k=2, transcode=True)
    run_dir = tmp_path / "run"
    save_coders(PerLayerCoders(HOOKS, 8, cfg), best_dir(run_dir), config={"run": "old"})
    # `--overwrite true --layers 0 1`: the new run's first check finds every hookpoint improved
    save_coders(PerLayerCoders(HOOKS[:2], 8, cfg), run_dir, config={"run": "new"})
    keep_best(run_dir, HOOKS[:2], HOOKS[:2])
    assert load_coders(best_dir(run_dir)).hookpoints == HOOKS[:2]
    # later checks still replace the hookpoints that improved alone
    keep_best(run_dir, HOOKS[:2], HOOKS[1:2])
    assert load_coders(best_dir(run_dir)).hookpoints == HOOKS[:2]

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


def test_what_a_killed_write_left_of_run_best_is_put_back_when_the_run_starts_again(
    tmp_path: Path,
) -> None:
    from vlm_sparsify.best_checkpoint import clean_after_kill

    cfg = SparseCoderConfig(num_latents=16, k=2, transcode=True)
    run_dir = tmp_path / "run"
    save_coders(PerLayerCoders(HOOKS, 8, cfg), run_dir)
    save_coders(PerLayerCoders(HOOKS, 8, cfg), best_dir(run_dir))
    dead = 2**22 + 1  # above Linux's pid_max: no such process
    # a whole RUN-best write killed between its two renames: RUN-best waits at .run-best.old
    best_dir(run_dir).rename(tmp_path / f".run-best.old-{dead}")
    notes = clean_after_kill(run_dir)
    assert notes == [
        f"restored {best_dir(run_dir)} from .run-best.old-{dead} (a checkpoint write was killed)"
    ]
    assert load_coders(best_dir(run_dir)).hookpoints == HOOKS


def test_an_end_to_end_run_compares_its_mean_loss_since_the_last_check() -> None:
    from types import SimpleNamespace

    from vlm_sparsify.best_checkpoint import improved_since_last_check
    from vlm_sparsify.training import TrainingState

    # steps 2 and 3 since the check at step 1: their mean (3.0), not step 1's 9.0 with them
    state = TrainingState(global_step=3, best_checked_step=1, loss_history=[9.0, 2.0, 4.0])
    trainer = SimpleNamespace(state=state, cfg=SimpleNamespace(loss_fn="kl"))
    assert improved_since_last_check(trainer) == [""]  # type: ignore[arg-type]
    assert state.best_loss == {"": 3.0} and state.best_checked_step == 3
    state.global_step, state.loss_history = 4, [*state.loss_history, 3.0]
    assert improved_since_last_check(trainer) == []  # type: ignore[arg-type]  # 3.0 is no lower
    state.global_step, state.loss_history = 5, [*state.loss_history, 2.5]
    assert improved_since_last_check(trainer) == [""]  # type: ignore[arg-type]
    assert state.best_loss == {"": 2.5}

"""The training CLI end to end: checkpoints load upstream, resume is exact, NaN stops cleanly."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sparsify import SparseCoder

import vlm_sparsify.training as training
from tests.conftest import REPO
from vlm_sparsify.__main__ import main, run
from vlm_sparsify.coder_io import CheckpointError, load_coders

HOOKS = [f"model.language_model.layers.{i}.mlp" for i in range(3)]


def cli(folder, save_dir, run_name, *extra: str) -> list[str]:
    return [
        str(folder), "easyvqa", "--recipe", "llava", "--save_dir", str(save_dir),
        "--run_name", run_name, "--max_examples", "48", "--batch_size", "8",
        "--num_latents", "64", "--k", "4", "--num_workers", "0", "--log_to_wandb", "false",
        "--lr", "1e-3", *extra,
    ]  # fmt: skip


def weights(run_dir):
    return {h: load_file(run_dir / h / "sae.safetensors") for h in HOOKS}


def interrupt_at_batch(monkeypatch, n: int):
    """Make the n-th `Trainer.train_on_batch` call raise KeyboardInterrupt (Ctrl-C); returns the
    original method, to put back."""
    original = training.Trainer.train_on_batch
    calls = {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(training.Trainer, "train_on_batch", interrupted)
    return original


@pytest.mark.parametrize(
    ("cross_layer", "loss_fn"),
    [("0", "fvu"), ("3", "fvu"), ("3", "kl")],
    ids=["plt", "clt", "clt-kl"],
)
def test_checkpoints_load_and_resume_is_exact(
    tmp_path, tiny_llava_dir, monkeypatch, capsys, cross_layer, loss_fn
):
    extra = ("--transcode", "true", "--cross_layer", cross_layer, "--save_every", "3",
             "--loss_fn", loss_fn)  # fmt: skip
    run(cli(tiny_llava_dir, tmp_path, "whole", *extra))
    whole = tmp_path / "whole"
    assert (whole / "summary.json").is_file() and (whole / "config.json").is_file()
    assert (whole / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    original = interrupt_at_batch(monkeypatch, 5)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run(cli(tiny_llava_dir, tmp_path, "split", *extra))
    note = capsys.readouterr().err
    assert f"interrupted at step 4: the checkpoint of step 3 is in {tmp_path / 'split'}" in note
    assert "--run_name split --resume" in note
    monkeypatch.setattr(training.Trainer, "train_on_batch", original)
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["global_step"] == 3  # the checkpoint of step 3 survived the interruption

    run(cli(tiny_llava_dir, tmp_path, "split", *extra, "--resume", "true"))
    for hook, tensors in weights(tmp_path / "split").items():
        for key, value in tensors.items():
            assert torch.equal(value, weights(whole)[hook][key]), (hook, key)

    ours = load_coders(whole)
    x = torch.randn(5, 32)
    if cross_layer == "0":
        for hook in HOOKS:
            stock = SparseCoder.load_from_disk(whole / hook)
            torch.testing.assert_close(stock(x).sae_out, ours[hook](x).sae_out, rtol=0, atol=0)
    else:
        assert [ours.n_targets(p) for p in range(3)] == [3, 2, 1]


def signal_at_batch(monkeypatch, n: int, times: int = 1):
    """Make the n-th `Trainer.train_on_batch` call send this process SIGINT `times` times as it
    starts (a real Ctrl-C inside a step); returns the original method, to put back."""
    import signal

    original = training.Trainer.train_on_batch
    calls = {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == n:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch)

    monkeypatch.setattr(training.Trainer, "train_on_batch", interrupted)
    return original


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt here (pytest started as a shell's background job inherits
    it ignored), and is put back after."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put it back
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("extra", "saved"),
    [
        (("--cross_layer", "3"), 5),
        # mid-accumulation the 5th batch's gradient is dropped: step 4 is saved, resume redoes 5
        (("--grad_acc_steps", "2"), 4),
    ],
    ids=["clt", "grad-acc"],
)
def test_ctrl_c_in_a_step_saves_where_the_run_stopped_and_resume_is_exact(
    tmp_path, tiny_llava_dir, monkeypatch, capsys, ctrl_c_raises, extra, saved
):
    # sparsify's --save_every 1000 never comes in 6 steps: without the save on Ctrl-C the
    # interrupted run kept nothing and --resume started over
    extra = ("--transcode", "true", *extra)
    run(cli(tiny_llava_dir, tmp_path, "whole", *extra))
    original = signal_at_batch(monkeypatch, 5)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run(cli(tiny_llava_dir, tmp_path, "split", *extra))
    err = capsys.readouterr().err
    assert "SIGINT: stopping once step 5 is done (again to stop at once)" in err
    split = tmp_path / "split"
    assert f"interrupted at step {saved}: the checkpoint of step {saved} is in {split}" in err
    assert torch.load(split / "state.pt", weights_only=True)["global_step"] == saved
    monkeypatch.setattr(training.Trainer, "train_on_batch", original)
    run(cli(tiny_llava_dir, tmp_path, "split", *extra, "--resume", "true"))
    whole = weights(tmp_path / "whole")
    for hook, tensors in weights(split).items():
        for key, value in tensors.items():
            assert torch.equal(value, whole[hook][key]), (hook, key)


def test_a_second_ctrl_c_stops_the_step_at_once_and_saves_nothing_half_done(
    tmp_path, tiny_llava_dir, monkeypatch, capsys, ctrl_c_raises
):
    signal_at_batch(monkeypatch, 5, times=2)
    with pytest.raises(KeyboardInterrupt):
        run(cli(tiny_llava_dir, tmp_path, "run", "--transcode", "true", "--save_every", "3"))
    err = capsys.readouterr().err
    assert "SIGINT: stopping once step 5 is done (again to stop at once)" in err
    # step 5 did not finish: the periodic checkpoint of step 3 stays the one to resume
    assert f"interrupted at step 4: the checkpoint of step 3 is in {tmp_path / 'run'}" in err
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["global_step"] == 3


def test_checkpoints_wait_for_the_optimizer_step_so_resume_is_exact(
    tmp_path, tiny_llava_dir, monkeypatch, capsys
):
    # --save_every 3 falls mid-accumulation with --grad_acc_steps 2: the save waits for step 4
    extra = ("--transcode", "true", "--save_every", "3", "--grad_acc_steps", "2")
    run(cli(tiny_llava_dir, tmp_path, "whole", *extra))
    original = interrupt_at_batch(monkeypatch, 6)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run(cli(tiny_llava_dir, tmp_path, "split", *extra))
    assert "interrupted at step 5: the checkpoint of step 4 is in" in capsys.readouterr().err
    monkeypatch.setattr(training.Trainer, "train_on_batch", original)
    assert torch.load(tmp_path / "split" / "state.pt", weights_only=True)["global_step"] == 4
    run(cli(tiny_llava_dir, tmp_path, "split", *extra, "--resume", "true"))
    whole = weights(tmp_path / "whole")
    for hook, tensors in weights(tmp_path / "split").items():
        for key, value in tensors.items():
            assert torch.equal(value, whole[hook][key]), (hook, key)


def test_a_run_ending_mid_accumulation_saves_its_last_optimizer_step_and_resumes_exactly(
    tmp_path, tiny_llava_dir, capsys
):
    # --grad_acc_steps 2 over 5 batches: the 5th batch's gradient is never applied (as in stock
    # sparsify), so the checkpoint is step 4's, counters included, and --resume trains it again
    extra = ("--transcode", "true", "--grad_acc_steps", "2")
    run(cli(tiny_llava_dir, tmp_path, "whole", *extra))  # 48 examples: 6 batches, 3 steps
    run(cli(tiny_llava_dir, tmp_path, "four", *extra, "--max_examples", "32"))
    capsys.readouterr()
    run(cli(tiny_llava_dir, tmp_path, "five", *extra, "--max_examples", "40"))
    out = capsys.readouterr().out
    assert "its last 1 batch(es), fewer than --grad_acc_steps 2, made no optimizer step" in out
    assert "the checkpoint is that of step 4 (4 batches, " in out

    def state(name):
        return torch.load(tmp_path / name / "state.pt", weights_only=True)

    five, four = state("five"), state("four")
    assert (five["global_step"], five["batches_seen"]) == (4, 4)
    assert five["tokens_seen"] == four["tokens_seen"]
    assert five["fvu_history"] == four["fvu_history"]
    assert all(map(torch.equal, five["tokens_since_fired"], four["tokens_since_fired"]))
    for hook, tensors in weights(tmp_path / "five").items():
        for key, value in tensors.items():
            assert torch.equal(value, weights(tmp_path / "four")[hook][key]), (hook, key)

    # the same --max_examples cannot reach another optimizer step: nothing to do
    mtime = (tmp_path / "five" / "state.pt").stat().st_mtime_ns
    run(cli(tiny_llava_dir, tmp_path, "five", *extra, "--max_examples", "40", "--resume", "true"))
    assert "and the 1 more that --max_examples 40 gives are too few" in capsys.readouterr().err
    assert (tmp_path / "five" / "state.pt").stat().st_mtime_ns == mtime

    run(cli(tiny_llava_dir, tmp_path, "five", *extra, "--resume", "true"))  # to 48 examples
    whole = weights(tmp_path / "whole")
    for hook, tensors in weights(tmp_path / "five").items():
        for key, value in tensors.items():
            assert torch.equal(value, whole[hook][key]), (hook, key)
    resumed, uninterrupted = state("five"), state("whole")
    for key in ("global_step", "batches_seen", "examples_seen", "tokens_seen", "fvu_history",
                "l0_history"):  # fmt: skip
        assert resumed[key] == uninterrupted[key], key
    assert all(map(torch.equal, resumed["tokens_since_fired"], uninterrupted["tokens_since_fired"]))


def test_a_run_shorter_than_one_accumulation_says_so_and_saves_nothing(tmp_path, tiny_llava_dir):
    with pytest.raises(training.NoTrainingDataError, match="after 2 batches, fewer than --grad"):
        run(cli(tiny_llava_dir, tmp_path, "short", "--max_examples", "16", "--grad_acc_steps", "3"))
    assert not (tmp_path / "short" / "state.pt").exists()


def test_finetune_loads_by_hookpoint_name_and_names_what_differs(tmp_path, tiny_llava_dir):
    layers02 = ("--transcode", "true", "--layers", "0", "2", "--max_examples", "8")
    run(cli(tiny_llava_dir, tmp_path, "src", *layers02))
    src = str(tmp_path / "src")
    with pytest.raises(CheckpointError, match=r"holds coders for .*0.mlp.*2.mlp'\] but .*1.mlp"):
        run(cli(tiny_llava_dir, tmp_path, "ft", "--transcode", "true", "--layers", "1", "2",
                "--finetune", src))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"it holds num_latents 64 \(this run: 128\);"):
        run(cli(tiny_llava_dir, tmp_path, "ft", *layers02, "--finetune", src, "--num_latents", "128"))  # fmt: skip
    with pytest.raises(CheckpointError, match="kind 'per-layer transcoders' .this run: 'a cross"):
        run(cli(tiny_llava_dir, tmp_path, "ft", *layers02, "--finetune", src, "--cross_layer", "2"))  # fmt: skip
    assert not (tmp_path / "ft").exists()
    # the same hookpoints load (another init seed: the coders start from src's, not their own)
    trainer = run(cli(tiny_llava_dir, tmp_path, "ft", *layers02, "--finetune", src,
                      "--init_seeds", "1", "--lr", "1e-6"))  # fmt: skip
    source = load_coders(src)
    for hook in (HOOKS[0], HOOKS[2]):
        moved = trainer.coders[hook].encoder.weight.detach() - source[hook].encoder.weight
        assert float(moved.abs().max()) < 1e-4, hook


@pytest.mark.parametrize("bad_call", [3, 1])
def test_nan_loss_stops_and_keeps_the_last_checkpoint(
    tmp_path, tiny_llava_dir, monkeypatch, bad_call
):
    real = training.collect_activations
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        inputs, outputs = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == bad_call:
            outputs[1] = outputs[1] * float("nan")
        return inputs, outputs

    monkeypatch.setattr(training, "collect_activations", poisoned)
    argv = cli(tiny_llava_dir, tmp_path, "nan", "--transcode", "true", "--save_every", "2")
    monkeypatch.setattr(sys, "argv", ["vlm_sparsify", *argv])
    note = "the checkpoint of step 2 is untouched" if bad_call == 3 else "no checkpoint was"
    with pytest.raises(SystemExit, match=f"error: non-finite FVU .*layers.1.mlp.*; {note}"):
        main()  # one line, no traceback
    if bad_call == 1:
        assert not (tmp_path / "nan").exists()
        return
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)
    assert state["global_step"] == 2
    for tensors in weights(tmp_path / "nan").values():
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_diverged_weights_are_never_saved_over_the_last_good_checkpoint(
    tmp_path, tiny_llava_dir, monkeypatch
):
    # the update of step 2 overflows the weights; the loss is still finite until step 3's forward
    real_step = training.Trainer.train_on_batch

    def diverging(self, batch):
        metrics = real_step(self, batch)
        if self.state.global_step == 2:
            with torch.no_grad():
                next(self.coders.parameters()).fill_(float("inf"))
        return metrics

    monkeypatch.setattr(training.Trainer, "train_on_batch", diverging)
    argv = cli(tiny_llava_dir, tmp_path, "nan", "--transcode", "true", "--save_every", "1")
    monkeypatch.setattr(sys, "argv", ["vlm_sparsify", *argv])
    with pytest.raises(
        SystemExit,
        match=r"error: non-finite coder weights after step 2 .*, not saved; the checkpoint of "
        r"step 1 is untouched .*--finetune RUN_FOLDER",
    ):
        main()
    assert torch.load(tmp_path / "nan" / "state.pt", weights_only=True)["global_step"] == 1
    for tensors in weights(tmp_path / "nan").values():
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_an_update_that_diverges_is_checked_before_it_is_saved(tmp_path, tiny_llava_dir):
    # --lr 1e30: the first update's weights are finite but huge; the loss was finite before it
    with pytest.raises(
        training.NonFiniteLossError,
        match=r"the update to step 1 made the FVU non-finite on its own batch, not saved; no "
        r"checkpoint was written yet\. Start again with a lower --lr\.$",  # float32: no --dtype
    ):
        run(cli(tiny_llava_dir, tmp_path, "huge", "--save_every", "1", "--lr", "1e30"))
    assert not (tmp_path / "huge").exists()


def test_bad_values_are_named_before_training(tmp_path, tiny_llava_dir):
    for flags, message in [
        (["--k", "0"], "--k must be >= 1, got 0"),
        (["-k", "-3"], "--k must be >= 1, got -3"),
        (["--expansion_factor", "0", "--num_latents", "0"], "--expansion_factor must be >= 1"),
        (["--num_latents", "-4"], "--num_latents must be >= 0, got -4"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--save_every", "0"], "--save_every must be >= 1"),
        (["--grad_acc_steps", "0"], "--grad_acc_steps must be >= 1"),
        (["--micro_acc_steps", "0"], "--micro_acc_steps must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0 and within float32's range .*, got -1"),
        (["--lr", "1e39"], "--lr must be > 0 and within float32's range .at most 3.4e.38., got 1e"),
        (["--max_examples", "-5"], "--max_examples must be >= 1, got -5"),
        (["--max_examples", "0"], "--max_examples must be >= 1, got 0"),
        (["--ctx_len", "0"], "--ctx_len must be >= 1"),
        (["--device", "cuda:99"], "--device cuda:99: torch .* sees \\d+ CUDA GPU"),
        (["--device", "gpu"], "--device 'gpu' is not a torch device"),
        (["--device", "xla"], "--device xla: this torch .* cannot run models on xla devices"),
        (["--device", "meta"], "--device meta: this torch .* cannot run models on meta devices"),
        (["--k", "5000"], "--k 5000 exceeds the coders' 64 latents"),
        (["--k", "20", "--multi_topk", "true"], "--multi_topk decodes the top 4 x k = 80 latents"),
        (
            ["--multi_topk", "true", "--k_decay_steps", "10"],
            r"--multi_topk decodes the top 4 x k = 256 latents .* k starts at min\(64 latents",
        ),
        (["--hookpoints", "model.vision_tower.*.layers.0.mlp"], "outside the language model's"),
        (["--data_args", "foo"], "--data_args 'foo': 'foo' is not arg=value"),
        (["--revision", "v1.0"], "--revision applies to models on the Hub, not to the local"),
        (["--exclude_tokens", "5", "99999"], r"--exclude_tokens \[99999\] are not token ids"),
        (["--dtype", "bfloat16", "--device", "cpu"], "--dtype bfloat16 trains on a GPU only"),
        (["--decoder_dtype", "float16"], "--decoder_dtype float16 sets a cross-layer"),
        (["--cross_layer", "2", "--transcode", "false"], "--transcode false: --cross_layer 2 tr"),
        (
            ["--loss_fn", "ce", "--transcode", "true", "--tokens", "image"],
            "--tokens image: --loss_fn ce is the cross-entropy of every next text token",
        ),
        (["--data_args", "name=x", "--streaming", "true"], "--data_args, --streaming apply to"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(cli(tiny_llava_dir, tmp_path, "bad", *flags))
    assert not (tmp_path / "bad").exists()


def test_a_broken_recipe_is_named(tmp_path, tiny_llava_dir):
    text = (REPO / "recipes" / "llava.toml").read_text()
    for old, new, message in [
        ('mlp = "mlp"', 'mlp = "mlpx"', "mlp = 'mlpx' is not a module of .*layers.0 .*self_attn"),
        ("k = 32", 'k = "four"', "\\[train\\] k = 'four' is not a valid --k .expected int"),
        ("batch_size = 8", "batch_size = 0", r"\[train\] batch_size = 0 is out of range: batch"),
    ]:
        assert old in text
        (tmp_path / "r.toml").write_text(text.replace(old, new))
        args = cli(tiny_llava_dir, tmp_path, "bad", "--recipe", str(tmp_path / "r.toml"))
        for flag in ("--k", "--batch_size"):  # leave the recipe's values in force
            i = args.index(flag)
            del args[i : i + 2]
        with pytest.raises(ValueError, match=message):
            run(args)


def test_a_runs_recipe_file_is_kept_in_the_run_and_read_from_anywhere(
    tmp_path, tiny_llava_dir, monkeypatch, capsys
):
    from vlm_sparsify.fidelity import main as fidelity
    from vlm_sparsify.recipe import run_recipe

    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    text = (REPO / "recipes" / "llava.toml").read_text().replace('name = "llava"', 'name = "mine"')
    (tmp_path / "here" / "mine.toml").write_text(text)
    monkeypatch.chdir(tmp_path / "here")
    args = cli(tiny_llava_dir, tmp_path, "r", "--max_examples", "8")
    args[args.index("--recipe") + 1] = "mine.toml"  # relative, as typed
    run(args)
    assert (tmp_path / "r" / "recipe.toml").read_text() == text
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run_recipe(tmp_path / "r", "mine.toml", str(tiny_llava_dir)).name == "mine"
    resume = ["--save_dir", str(tmp_path), "--run_name", "r", "--resume", "true"]
    assert run([*resume, "--max_examples", "16"]).state.global_step == 2
    assert (tmp_path / "r" / "recipe.toml").read_text() == text
    # fidelity (and export's calibration) read the run's recipe: it failed with "recipe file
    # mine.toml does not exist" here
    fidelity([str(tmp_path / "r"), "--limit", "1", "--max_new_tokens", "1", "--dtype", "float32"])


def test_an_error_in_training_starts_its_own_line(tmp_path, tiny_llava_dir):
    from tests.conftest import make_image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        make_image(images / f"{i}.png", seed=i)
    (images / "9.png").write_bytes(b"not a png")
    rows = [{"file_name": f"{i}.png", "text": "x"} for i in (*range(8), 9)]
    (images / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    args = cli(tiny_llava_dir, tmp_path, "strict", "--strict", "true")
    args[1] = str(images)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "vlm_sparsify", *args, "--device", "cpu", "--num_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 1 and "Training" in done.stderr, done.stderr
    # the progress bar ends its line: the error is on its own (bars redraw with \r, not \n)
    last = done.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and "9.png" in last, done.stderr[-500:]


def test_ctrl_c_outside_training_says_so_in_one_line(capsys):
    from vlm_sparsify.cli import reported_interrupt, run_cli

    def loading():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_cli(loading)
    assert stop.value.code == 130 and capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"

    def reported():
        raise reported_interrupt(KeyboardInterrupt())

    with pytest.raises(SystemExit):
        run_cli(reported)  # the training loop said where its checkpoint is: no second line
    assert capsys.readouterr().err == ""


SIGTERM_AT_BATCH_5 = """
import os, signal, sys
import vlm_sparsify.training as training
from vlm_sparsify.__main__ import main

original, calls = training.Trainer.train_on_batch, [0]

def train_on_batch(self, batch):
    calls[0] += 1
    if calls[0] == 5:  # a scheduler's stop: SLURM signals every process of the job
        os.killpg(0, signal.SIGTERM)
    return original(self, batch)

training.Trainer.train_on_batch = train_on_batch
sys.argv[0] = "vlm_sparsify"
main()
"""


def test_sigterm_to_the_run_and_its_workers_ends_it_as_ctrl_c_does(tmp_path, tiny_llava_dir):
    args = cli(tiny_llava_dir, tmp_path, "run", "--save_every", "3", "--num_workers", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_BATCH_5, *args, "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=REPO, start_new_session=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 143, done.stderr[-800:]
    # the DataLoader worker got it too: it leaves the stop to the training process
    assert "DataLoader worker" not in done.stderr and "Traceback" not in done.stderr
    # it came in step 5: the step ends and is saved (the periodic checkpoint was step 3's)
    assert "SIGTERM: stopping once step 5 is done" in done.stderr
    last = done.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith(
        f"terminated (SIGTERM) at step 5: the checkpoint of step 5 is in {tmp_path / 'run'}"
    ), done.stderr[-800:]
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["global_step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing half-written


def test_ctrl_c_during_a_checkpoint_stops_once_it_is_written_best_copy_included(
    tmp_path, tiny_llava_dir, monkeypatch, capsys
):
    import signal

    import vlm_sparsify.__main__ as cli_main

    # Ctrl-C while the first checkpoint (step 3) is copied to RUN-best: stopping there would
    # leave RUN-best without it while RUN's state records its loss as the best so far
    real_keep_best = cli_main.keep_best

    def interrupted_keep_best(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real_keep_best(*args)

    monkeypatch.setattr(cli_main, "keep_best", interrupted_keep_best)
    # pytest started as a shell's background job inherits SIGINT ignored: Ctrl-C's handler here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cli(tiny_llava_dir, tmp_path, "run", "--save_every", "3", "--save_best", "true"))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "SIGINT: stopping once the checkpoint of step 3 is written" in err
    assert f"interrupted at step 3: the checkpoint of step 3 is in {tmp_path / 'run'}" in err
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["global_step"] == 3 and set(state["best_loss"]) == set(HOOKS)
    for hook, tensors in weights(tmp_path / "run").items():  # RUN-best is that checkpoint
        best = load_file(tmp_path / "run-best" / hook / "sae.safetensors")
        assert all(torch.equal(best[key], value) for key, value in tensors.items()), hook


def test_a_save_dir_that_cannot_be_written_is_named_before_the_model_loads(
    tmp_path, tiny_llava_dir, monkeypatch
):
    import vlm_sparsify.__main__ as cli_main

    def load_model_and_processor(*args, **kwargs):  # minutes for a 7B model, then training
        raise AssertionError("the model loaded: the save_dir was not checked first")

    monkeypatch.setattr(cli_main, "load_model_and_processor", load_model_and_processor)
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(OSError, match=r"cannot write the run folder .*notes/sub/r \(a file stands"):
        run(cli(tiny_llava_dir, tmp_path / "notes" / "sub", "r"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_empty_save_dir(
    tmp_path, tiny_llava_dir, monkeypatch
):
    import vlm_sparsify.__main__ as cli_main

    def load_model_and_processor(*args, **kwargs):
        raise OSError("the model does not load")

    monkeypatch.setattr(cli_main, "load_model_and_processor", load_model_and_processor)
    (tmp_path / "mine").mkdir()
    with pytest.raises(OSError, match="the model does not load"):
        run(cli(tiny_llava_dir, tmp_path / "mine" / "new" / "runs", "r"))
    assert [p.name for p in tmp_path.rglob("*")] == ["mine"]  # the user's own folder stays
    monkeypatch.undo()
    run(cli(tiny_llava_dir, tmp_path / "mine" / "new" / "runs", "r", "--max_examples", "8"))
    assert (tmp_path / "mine" / "new" / "runs" / "r" / "state.pt").is_file()


def test_a_local_dataset_that_cannot_open_is_named_before_the_model_loads(
    tmp_path, tiny_llava_dir, monkeypatch
):
    import vlm_sparsify.__main__ as cli_main

    def load_model_and_processor(*args, **kwargs):  # minutes for a 7B model
        raise AssertionError("the model loaded before the dataset opened")

    monkeypatch.setattr(cli_main, "load_model_and_processor", load_model_and_processor)
    (tmp_path / "images").mkdir()  # no metadata.jsonl
    args = cli(tiny_llava_dir, tmp_path, "r")
    args[1] = str(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl or metadata.csv"):
        run(args)
    args[1] = str(tmp_path / "imgaes") + "/"  # mistyped
    with pytest.raises(FileNotFoundError, match="imgaes/': no such folder"):
        run(args)


def test_resume_refuses_a_dataset_folder_that_changed_size(tmp_path, tiny_llava_dir):
    from tests.conftest import make_image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        make_image(images / f"{i}.png", seed=i)

    def write_metadata(n: int) -> None:
        rows = [{"file_name": f"{i}.png", "text": f"shape {i}"} for i in range(n)]
        (images / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))

    write_metadata(16)
    args = cli(tiny_llava_dir, tmp_path, "run", "--max_examples", "8")
    args[1] = str(images)
    run(args)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["n_examples"] == 16
    write_metadata(24)  # 8 more: the shuffled order of all 24 differs from that of 16
    resume = [*args[:-1], "16", "--resume", "true"]
    with pytest.raises(ValueError, match="holds 24 examples, but 16 when"):
        run(resume)
    write_metadata(16)
    run(resume)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["batches_seen"] == 2


def test_hookpoints_other_than_mlps(tmp_path, tiny_llava_dir):
    attention = "model.language_model.layers.1.self_attn"  # its input comes by keyword
    trainer = run(cli(tiny_llava_dir, tmp_path, "attn", "--transcode", "true",
                      "--hookpoints", attention, "--max_examples", "16"))  # fmt: skip
    assert trainer.coders.hookpoints == [attention] and trainer.state.global_step == 2
    with pytest.raises(training.HookpointError, match=r"layers.0.mlp.down_proj: its input is \["):
        run(cli(tiny_llava_dir, tmp_path, "proj", "--hookpoints", "*.layers.0.mlp.down_proj"))


def test_hookpoints_train_in_the_order_the_forward_runs_them(tmp_path, tiny_llava_dir):
    """A layer's attention runs before its MLP, and layers in index order, however the flags
    name them (the forward stops after the last hookpoint; a CLT's sources precede their
    targets); a layer named twice is one hookpoint."""
    layer = "model.language_model.layers.0"
    mixed = run(cli(tiny_llava_dir, tmp_path, "mixed", "--transcode", "true", "--max_examples", "8",
                    "--hookpoints", f"{layer}.mlp", f"{layer}.self_attn"))  # fmt: skip
    assert mixed.coders.hookpoints == [f"{layer}.self_attn", f"{layer}.mlp"]
    clt = run(cli(tiny_llava_dir, tmp_path, "clt", "--cross_layer", "2", "--max_examples", "8",
                  "--layers", "2", "0", "2"))  # fmt: skip
    assert clt.coders.hookpoints == [HOOKS[0], HOOKS[2]] and clt.state.global_step == 1


def test_a_local_dataset_folder_is_found_when_resumed_from_another_directory(
    tmp_path, tiny_llava_dir, monkeypatch
):
    from tests.conftest import make_image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        make_image(images / f"{i}.png", seed=i)
    rows = [{"file_name": f"{i}.png", "text": "a square"} for i in range(8)]
    (images / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    monkeypatch.chdir(tmp_path)
    args = cli(tiny_llava_dir, tmp_path, "local", "--max_examples", "4", "--batch_size", "4")
    args[1] = "images"  # relative to the directory the run started in
    run(args)
    saved = json.loads((tmp_path / "local" / "config.json").read_text())
    assert saved["dataset"] == str(images.resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resume = ["--save_dir", str(tmp_path), "--run_name", "local", "--resume", "true"]
    trainer = run([*resume, "--max_examples", "8", "--log_to_wandb", "false"])
    assert trainer.state.global_step == 2


def test_a_local_model_folder_is_found_from_another_directory(
    tmp_path, tiny_llava_dir, monkeypatch
):
    """A run keeps a local MODEL folder as its absolute path, as it keeps a dataset folder:
    kept as typed (`tiny`), fidelity and --resume from another directory looked for it on the
    Hub."""
    from vlm_sparsify.fidelity import main as fidelity

    shutil.copytree(tiny_llava_dir, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    args = cli("tiny", tmp_path, "rel", "--max_examples", "8")
    run(args)
    saved = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert saved["model"] == str((tmp_path / "tiny").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resume = ["--save_dir", str(tmp_path), "--run_name", "rel", "--resume", "true"]
    assert run([*resume, "--max_examples", "16"]).state.global_step == 2
    fidelity([str(tmp_path / "rel"), "--limit", "1", "--max_new_tokens", "1", "--dtype", "float32"])


def test_the_token_reaches_the_hub_dataset_too(tmp_path, tiny_llava_dir, monkeypatch):
    """--hf_token (or HF_TOKEN) opens a gated or private Hub dataset, as it loads the model."""
    import datasets

    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs.get("token")))
        raise OSError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = cli(tiny_llava_dir, tmp_path, "gated", "--hf_token", "hf_SECRET")
    args[1] = "owner/gated"
    with pytest.raises(OSError, match="offline"):
        run(args)
    assert calls == [("owner/gated", "hf_SECRET")]


def test_a_token_in_data_args_is_refused_unsaved_and_unprinted(tmp_path, tiny_llava_dir):
    """--data_args is saved in config.json (uploaded by --push_to_hub): a token=... there was a
    TypeError traceback (token given twice), and would have been written to disk."""
    args = cli(tiny_llava_dir, tmp_path, "tok", "--data_args", "name=x,token=hf_SECRET")
    args[1] = "owner/gated"
    with pytest.raises(ValueError, match="--data_args token=... would be saved .*HF_TOKEN") as e:
        run(args)
    assert "SECRET" not in str(e.value) and not (tmp_path / "tok").exists()


def test_overwrite_replaces_the_runs_best_folder_too(tmp_path, tiny_llava_dir):
    """RUN-best belongs to the run: the run that replaces RUN replaces it (at its first
    checkpoint, as RUN), and a new run does not mix its coders into an earlier run's."""
    best = tmp_path / "run-best"
    run(cli(tiny_llava_dir, tmp_path, "run", "--save_best", "true", "--max_examples", "8"))
    assert sorted(p.name for p in best.iterdir()) == ["config.json", *HOOKS]
    shutil.rmtree(tmp_path / "run")  # RUN gone, RUN-best left
    with pytest.raises(ValueError, match="run-best holds the best coders of an earlier run"):
        run(cli(tiny_llava_dir, tmp_path, "run", "--layers", "0"))
    again = cli(tiny_llava_dir, tmp_path, "run", "--layers", "0", "--overwrite", "true",
                "--max_examples", "8")  # fmt: skip
    run([*again, "--save_best", "true"])
    assert sorted(p.name for p in best.iterdir()) == ["config.json", HOOKS[0]]
    run([*again, "--save_best", "false"])
    assert not best.exists()


def test_a_model_that_cannot_load_is_one_line(tmp_path, tiny_llava_dir, monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    args = cli(tiny_llava_dir, tmp_path, "hub")
    args[0] = "llava-hf/llava-1.5-7b-hf"
    with pytest.raises(OSError) as err:
        run(args)
    assert "\n" not in str(err.value) and "(no such local folder either)" in str(err.value)


def test_a_file_where_the_run_folder_would_be_is_left_alone(tmp_path, tiny_llava_dir):
    (tmp_path / "notes").write_text("mine")
    for flags in ([], ["--overwrite", "true"]):
        with pytest.raises(ValueError, match="notes is a file, not a run folder"):
            run(cli(tiny_llava_dir, tmp_path, "notes", *flags))
    assert (tmp_path / "notes").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_a_run_name_that_makes_the_run_folder_the_save_dir_is_refused(tmp_path, tiny_llava_dir):
    # `--run_name .` is the save dir itself: a checkpoint replaces its run folder whole, so
    # with --overwrite it deleted every other run there; `..` is the folder above it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cfg.json").write_text("{}")
    for name in (".", "./", "..", "sub/../.."):
        for flags in ([], ["--overwrite", "true"], ["--resume", "true"]):
            with pytest.raises(ValueError, match=r"is the --save_dir .* or a folder above it"):
                run(cli(tiny_llava_dir, tmp_path, name, *flags))
    assert (tmp_path / "other" / "cfg.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_no_training_position_is_an_error_not_an_untrained_run(
    tmp_path, tiny_llava_dir, tiny_llava
):
    from tests.conftest import make_image

    image_id = tiny_llava[1].tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(training.NoTrainingDataError, match="batch 0 has examples but no training"):
        run(cli(tiny_llava_dir, tmp_path, "none", "--tokens", "image", "--exclude_tokens",
                str(image_id)))  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not a png")
    make_image(images / "b.png")
    rows = [{"file_name": "a.png", "text": "x"}, {"file_name": "gone.png", "text": "y"}]
    (images / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    args = cli(tiny_llava_dir, tmp_path, "none", "--strict", "false")
    args[1] = str(images)
    with pytest.raises(training.NoTrainingDataError, match="1 batches, 2 examples skipped"):
        run(args)
    assert not (tmp_path / "none").exists()


def test_positions_only_in_the_prompts_shared_start_are_refused(tmp_path, tiny_llava_dir):
    # --ctx_len 2 keeps "user :" of every prompt, the same tokens before the image each time
    for ctx_len, prefix in (("1", 1), ("2", 2)):
        with pytest.raises(
            training.NoTrainingDataError, match=f"all lie in the first {prefix} tokens of its"
        ):
            run(cli(tiny_llava_dir, tmp_path, "prefix", "--tokens", "text", "--ctx_len", ctx_len))
        assert not (tmp_path / "prefix").exists()
    # one more text token (after the image) and the image tokens themselves vary: trained
    run(cli(tiny_llava_dir, tmp_path, "three", "--tokens", "text", "--ctx_len", "3",
            "--max_examples", "16"))  # fmt: skip
    run(cli(tiny_llava_dir, tmp_path, "one", "--ctx_len", "1", "--max_examples", "16"))
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert all(row["fvu"] < 10 for row in summary)


def test_outputs_without_variance_are_named_not_blamed_on_the_lr(tmp_path, tiny_llava_dir):
    # one example of one text token: one position, no variance, an FVU of x / 0
    with pytest.raises(training.NoTrainingDataError, match="same at all its 1 training positions"):
        run(cli(tiny_llava_dir, tmp_path, "one", "--tokens", "text", "--ctx_len", "1",
                "--batch_size", "1", "--max_examples", "2"))  # fmt: skip
    assert not (tmp_path / "one").exists()


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_process_trains(tmp_path, tiny_llava_dir):
    """One step on the same global batch: same FVU (global denominators), same weights.

    At initialisation the decoder biases equal the target means, so their gradient is zero up
    to rounding and SignSGD takes the sign of rounding noise: biases may differ by 2 * lr.
    """
    extra = ("--transcode", "true", "--cross_layer", "2", "--max_examples", "8")
    run(cli(tiny_llava_dir, tmp_path, "one", *extra))  # in this process: no second start-up
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29533", "-m", "vlm_sparsify",
        *cli(tiny_llava_dir, tmp_path, "two", *extra),
    ]  # fmt: skip
    result = subprocess.run(two, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two")]
    for a, b in zip(*summaries, strict=True):
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-5)
    moved = 0.0
    for hook, tensors in weights(tmp_path / "two").items():
        for key, value in tensors.items():
            reference = weights(tmp_path / "one")[hook][key]
            atol = 2e-3 + 1e-6 if key.startswith("b_decs") else 1e-5
            torch.testing.assert_close(value, reference, atol=atol, rtol=0)
            if key.startswith("W_decs"):
                moved = max(moved, float(reference.abs().max()))
    assert moved > 5e-4  # the decoders took a real step


@pytest.mark.slow
def test_a_rank_without_examples_in_the_last_batch_still_steps(tmp_path, tiny_llava_dir):
    """12 examples in batches of 8 over 2 ranks: the last batch gives rank 1 nothing. It takes
    part in the step's collectives with no tokens (it used to wait in them forever)."""
    extra = ("--transcode", "true", "--cross_layer", "2", "--max_examples", "12",
             "--loss_fn", "kl")  # fmt: skip
    run(cli(tiny_llava_dir, tmp_path, "one", *extra))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29534", "-m", "vlm_sparsify",
        *cli(tiny_llava_dir, tmp_path, "two", *extra),
    ]  # fmt: skip
    result = subprocess.run(two, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(tmp_path / r / "state.pt", weights_only=True) for r in ("one", "two")]
    assert states[0]["global_step"] == states[1]["global_step"] == 2
    assert states[0]["tokens_seen"] == states[1]["tokens_seen"]
    # ranks pad their own batches: the logits differ in the last bits, the KL (~4e-5) by ~1e-4
    assert states[0]["loss_history"][0] == pytest.approx(states[1]["loss_history"][0], rel=1e-3)


def test_hub_copy_loads_with_sparsify_load_many(tmp_path, tiny_llava_dir):
    import shutil

    from vlm_sparsify.hub import hub_files

    run(cli(tiny_llava_dir, tmp_path, "shared", "--transcode", "true"))
    run_dir = tmp_path / "shared"
    files = hub_files(run_dir)
    assert "config.json" in files and "summary.json" in files
    assert not any(f.startswith(("optimizer_", "state.pt", "train_params")) for f in files)
    hub = tmp_path / "hub"
    for name in files:
        (hub / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / name, hub / name)
    loaded = SparseCoder.load_many(str(hub), local=True)
    assert sorted(loaded) == sorted(HOOKS)
    x = torch.randn(3, 32)
    ours = load_coders(run_dir)
    for hook in HOOKS:
        torch.testing.assert_close(loaded[hook](x).sae_out, ours[hook](x).sae_out, rtol=0, atol=0)


def test_a_failed_upload_is_one_line_and_the_run_can_be_pushed_later(
    tmp_path, tiny_llava_dir, monkeypatch, capsys
):
    from huggingface_hub.utils import filter_repo_objects

    import vlm_sparsify.hub as hub

    class Offline:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo, exist_ok=False):
            raise ConnectionError(f"[Errno 101] Network is unreachable (token {self.token})")

    monkeypatch.setattr(hub, "HfApi", Offline)
    argv = cli(tiny_llava_dir, tmp_path, "up", "--max_examples", "8", "--push_to_hub", "me/up",
               "--hf_token", "hf_secret")  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["vlm_sparsify", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    message = str(stop.value.code)
    run_dir = tmp_path / "up"
    assert message.startswith(f"error: the run is saved in {run_dir}, but uploading it to me/up")
    assert f"`python -m vlm_sparsify.hub {run_dir} me/up`" in message
    assert "hf_secret" not in message and "\n" not in message
    assert (run_dir / "state.pt").is_file()
    # the upload command itself does not send the user back to itself
    with pytest.raises(hub.HubUploadError, match=r"^uploading .*up to me/up failed \(.*\); check "
                       "the network and the token .*, then run this command again$"):  # fmt: skip
        hub.main([str(run_dir), "me/up"])

    uploaded = {}

    class Online(Offline):
        def create_repo(self, repo, exist_ok=False):
            uploaded["repo"] = repo

        def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None):
            files = [
                str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()
            ]
            chosen = filter_repo_objects(  # as huggingface_hub filters the folder
                files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
            )
            uploaded.update(folder=folder_path, files=sorted(chosen))

    monkeypatch.setattr(hub, "HfApi", Online)
    assert hub.main([str(run_dir), "me/up"]) == "https://huggingface.co/me/up"
    assert uploaded == {"repo": "me/up", "folder": str(run_dir), "files": hub.hub_files(run_dir)}
    assert "config.json" in uploaded["files"] and "state.pt" not in uploaded["files"]


def test_export_calibrates_on_the_runs_own_model_and_data(tmp_path, tiny_llava_dir):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    from vlm_sparsify.export import main as export

    run(cli(tiny_llava_dir, tmp_path, "clt", "--cross_layer", "2"))
    fidelity = export(
        [
            "circuit-tracer",
            str(tmp_path / "clt"),
            str(tmp_path / "ct"),
            "--calibration_examples",
            "16",
        ]
    )
    assert len(fidelity["fvu_export_vs_topk"]) == 3
    assert all(0 <= v < 1.5 for v in fidelity["fvu_export_vs_topk"])
    clt = load_clt(str(tmp_path / "ct"), device="cpu", dtype=torch.float32, lazy_encoder=False)
    ours = load_coders(tmp_path / "clt")
    assert torch.equal(clt.W_enc[0], ours.sources[0].encoder.weight)


def test_auxk_and_multi_topk_train_a_clt_from_the_cli(tmp_path, tiny_llava_dir, monkeypatch):
    seen = []
    original = training.Trainer.train_on_batch

    def recording(self, batch):
        metrics = original(self, batch)
        seen.append(metrics)
        return metrics

    monkeypatch.setattr(training.Trainer, "train_on_batch", recording)
    trainer = run(cli(tiny_llava_dir, tmp_path, "aux", "--transcode", "true", "--cross_layer", "3",
                      "--auxk_alpha", "0.03125", "--dead_feature_threshold", "40",
                      "--multi_topk", "true"))  # fmt: skip
    assert len(seen) == 6 and all("auxk" in m for m in seen)
    for metrics, fvu in zip(seen, trainer.state.fvu_history, strict=True):  # the progress bar's
        assert metrics["mean_fvu"] == pytest.approx(sum(fvu) / 3)
    assert seen[0]["auxk"] == 0 and max(m["auxk"] for m in seen) > 0  # latents died, AuxK began
    assert load_coders(tmp_path / "aux").n_targets(0) == 3


@pytest.mark.parametrize("cross_layer", ["0", "1"], ids=["plt", "clt"])
def test_l0_with_multi_topk_is_the_coders_k_not_the_4k_it_also_decodes(
    tmp_path, tiny_llava_dir, cross_layer
):
    # stock sparsify returns the top 4k latents with multi_topk; the coder itself fires k
    trainer = run(cli(tiny_llava_dir, tmp_path, "multi", "--transcode", "true", "--multi_topk",
                      "true", "--cross_layer", cross_layer, "--max_examples", "16"))  # fmt: skip
    l0 = [value for step in trainer.state.l0_history for value in step]
    assert max(l0) <= 4 and min(l0) > 3  # --k 4, almost always all positive
    assert all(row["l0"] <= 4 for row in trainer.summary())


def test_summary_separates_recently_dead_from_never_fired(tmp_path, tiny_llava_dir, capsys):
    run(cli(tiny_llava_dir, tmp_path, "dead", "--dead_feature_threshold", "8"))
    assert "dead %  never %" in capsys.readouterr().out
    rows = json.loads((tmp_path / "dead" / "summary.json").read_text())
    state = torch.load(tmp_path / "dead" / "state.pt", weights_only=True)
    for row, counts in zip(rows, state["tokens_since_fired"], strict=True):
        never = 100.0 * float((counts >= state["tokens_seen"]).float().mean())
        recent = 100.0 * float((counts >= 8).float().mean())
        assert row["never_fired_pct"] == pytest.approx(never)
        assert row["dead_pct"] == pytest.approx(recent)
    # latents fire in some batches and not in the last 8 tokens: the two counts differ
    assert any(row["dead_pct"] > row["never_fired_pct"] for row in rows)


def test_several_init_seeds_are_one_run_each(tmp_path, tiny_llava_dir):
    with pytest.raises(ValueError, match="one run per seed"):
        run(cli(tiny_llava_dir, tmp_path, "seeds", "--init_seeds", "0", "1"))


def test_a_clt_too_big_for_the_gpu_stops_before_training(tmp_path, tiny_llava_dir, monkeypatch):
    import vlm_sparsify.__main__ as cli_module

    monkeypatch.setattr(cli_module, "free_memory_bytes", lambda device: 100_000)  # 98 KiB free
    with pytest.raises(
        SystemExit, match="^error: this CLT needs ~0.0 GiB .* cannot fit. --decoder_"
    ):
        run(cli(tiny_llava_dir, tmp_path, "big", "--cross_layer", "3"))
    with pytest.raises(SystemExit, match="it cannot fit. a smaller --cross_layer"):  # bf16 already
        run(cli(tiny_llava_dir, tmp_path, "big", "--cross_layer", "3", "--decoder_dtype", "bfloat16"))  # fmt: skip
    assert not (tmp_path / "big").exists()


def test_wandb_logs_sparsifys_figures_every_n_steps_without_the_token(
    tmp_path, tiny_llava_dir, monkeypatch, capsys
):
    import types

    inits, logged = [], []

    class FakeRun:
        def log(self, info, step):
            logged.append((step, info))

        def finish(self):
            logged.append(("finished", {}))

    fake = types.ModuleType("wandb")
    # wandb.init records sys.argv in the run's metadata
    fake.init = lambda **kwargs: inits.append({**kwargs, "argv": sys.argv[:]}) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "clts")
    extra = ("--cross_layer", "2", "--auxk_alpha", "0.03", "--log_to_wandb", "true",
             "--wandb_log_frequency", "2", "--hf_token", "hf_SECRET")  # fmt: skip
    argv = cli(tiny_llava_dir, tmp_path, "logged", *extra)
    monkeypatch.setattr(sys, "argv", ["vlm_sparsify", *argv])
    trainer = run()
    assert [kw["name"] for kw in inits] == ["logged"] and inits[0]["project"] == "clts"
    assert "hf_SECRET" not in json.dumps(inits[0], default=str)
    assert inits[0]["argv"][-2:] == ["--hf_token", "***"]
    assert [step for step, _ in logged] == [2, 4, 6, "finished"]
    history = trainer.state.fvu_history
    for step, info in logged[:-1]:
        assert info["k"] == 4 and info["auxk"] >= 0
        for i, hook in enumerate(HOOKS):
            mean = (history[step - 2][i] + history[step - 1][i]) / 2
            assert info[f"fvu/{hook}"] == pytest.approx(mean)
            assert 0 <= info[f"dead_pct/{hook}"] <= 1 and info[f"l0/{hook}"] > 0
    # without wandb the run says so and goes on
    monkeypatch.setitem(sys.modules, "wandb", None)
    run(cli(tiny_llava_dir, tmp_path, "unlogged", "--log_to_wandb", "true"))
    assert "Weights & Biases not available" in capsys.readouterr().out
    assert (tmp_path / "unlogged" / "summary.json").is_file()


def test_save_best_replaces_only_the_hookpoints_that_improved(tmp_path, tiny_llava_dir):
    """PLTs keep one best per hookpoint: the mean FVU since the last checkpoint against the
    lowest so far; an improved hookpoint's folder is copied from the checkpoint just written."""
    from vlm_sparsify.best_checkpoint import improved_since_last_check, keep_best
    from vlm_sparsify.coder_io import save_coders

    trainer = run(cli(tiny_llava_dir, tmp_path, "plt", "--transcode", "true", "--max_examples", "16"))  # fmt: skip
    run_dir = tmp_path / "plt"

    def checkpoint(config):
        """The run's checkpoint now (the averaged weights, as the CLI writes them)."""
        with training.eval_weights(trainer.optimizers):
            save_coders(trainer.coders, run_dir, config=config)
        return weights(run_dir)

    state = trainer.state
    state.best_loss, state.best_checked_step = {}, 0
    state.global_step, state.fvu_history = 2, [[1.0, 1.0, 1.0], [0.5, 0.9, 0.7]]
    improved = improved_since_last_check(trainer)
    assert improved == HOOKS  # all beat infinity
    first = checkpoint({"run": "first"})
    keep_best(run_dir, HOOKS, improved)
    with torch.no_grad():
        for p in trainer.coders.parameters():
            p.add_(0.01)
    state.global_step, state.fvu_history = 3, [*state.fvu_history, [0.4, 0.95, 0.7]]
    improved = improved_since_last_check(trainer)
    assert improved == [HOOKS[0], HOOKS[2]]
    assert state.best_loss == {HOOKS[0]: 0.4, HOOKS[1]: 0.95, HOOKS[2]: 0.7}
    second = checkpoint({"run": "second"})
    keep_best(run_dir, HOOKS, improved)
    assert improved_since_last_check(trainer) == []  # no step since: nothing to compare
    best = weights(tmp_path / "plt-best")
    for hook, expected in ((HOOKS[0], second), (HOOKS[1], first), (HOOKS[2], second)):
        assert all(torch.equal(best[hook][k], v) for k, v in expected[hook].items()), hook
    assert not all(torch.equal(first[HOOKS[1]][k], v) for k, v in second[HOOKS[1]].items())
    assert isinstance(load_coders(tmp_path / "plt-best"), training.PerLayerCoders)
    assert json.loads((tmp_path / "plt-best" / "config.json").read_text()) == {"run": "second"}
    assert not (tmp_path / "plt-best" / "state.pt").exists()  # coders and config only


def test_save_best_keeps_a_clt_whole(tmp_path, tiny_llava_dir):
    extra = ("--cross_layer", "2", "--save_best", "true", "--save_every", "3")
    trainer = run(cli(tiny_llava_dir, tmp_path, "clt", *extra))
    history = trainer.state.fvu_history
    means = [sum(map(sum, history[s - 3 : s])) / 3 for s in (3, 6)]
    assert trainer.state.best_loss == {"": pytest.approx(min(means))}
    best = load_coders(tmp_path / "clt-best")
    assert best.hookpoints == HOOKS and best.cross_layer == 2


def test_training_curves_are_trailing_moving_averages():
    import numpy as np

    from vlm_sparsify.training_plot import smooth

    values = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]])
    np.testing.assert_allclose(smooth(values, 2), [[1, 10], [2, 20], [4, 40], [6, 60]])
    np.testing.assert_allclose(smooth(values, 1), values)
    np.testing.assert_allclose(smooth(values[:, 0], 3), [1, 2, 3, 5])


def test_recipe_defaults_yield_to_the_flags_passed():
    from vlm_sparsify.__main__ import apply_recipe_defaults, parse_run_config
    from vlm_sparsify.recipe import find_recipe

    defaults = find_recipe("llava").train_defaults  # sized for LLaVA-1.5-7B
    args, given = parse_run_config(["--cross_layer", "16"])
    apply_recipe_defaults(args, defaults, given)
    assert (args.sae.num_latents, args.sae.k, args.batch_size) == (8192, 32, 8)
    # the width given the other way wins too; -k is --k
    args, given = parse_run_config(["--expansion_factor", "4", "-k", "64"])
    apply_recipe_defaults(args, defaults, given)
    assert (args.sae.num_latents, args.sae.expansion_factor, args.sae.k) == (0, 4, 64)
    args, given = parse_run_config(["--k=64", "--batch_size=2"])
    apply_recipe_defaults(args, defaults, given)
    assert (args.sae.k, args.batch_size) == (64, 2)
    with pytest.raises(ValueError, match="'num_latent', which is not a flag"):
        apply_recipe_defaults(parse_run_config([])[0], {"num_latent": 8}, set())
    # an out-of-range value is the recipe's, not the flag's
    with pytest.raises(ValueError, match=r"^recipe 'r': \[train\] k = -1 is out of range: k must"):
        apply_recipe_defaults(parse_run_config([])[0], {"k": -1}, set(), "r")


def test_a_recipe_files_train_table_errors_name_the_file(tmp_path, tiny_llava_dir):
    from importlib import resources

    text = (resources.files("vlm_sparsify.recipes") / "llava.toml").read_text()
    recipe = tmp_path / "mine.toml"  # a copy that keeps its name 'llava'
    recipe.write_text(text.replace("[train]\n", "[train]\nkk = 16\n", 1))
    argv = cli(tiny_llava_dir, tmp_path, "x")
    argv[argv.index("llava")] = str(recipe)
    with pytest.raises(ValueError, match=f"^recipe '{recipe}': the \\[train\\] table sets 'kk'"):
        run(argv)


def test_resume_takes_the_saved_settings_and_refuses_contradictions(tmp_path, tiny_llava_dir):
    run(cli(tiny_llava_dir, tmp_path, "r", "--cross_layer", "2", "--max_examples", "16"))
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    # only the run's name: the model, --cross_layer, --k, ... come from its config.json;
    # --max_examples may grow (and --num_workers, --log_to_wandb, ... may change)
    resume = ["--save_dir", str(tmp_path), "--run_name", "r", "--resume", "true"]
    trainer = run([*resume, "--max_examples", "24", "--num_workers", "0", "--save_every", "5"])
    assert trainer.state.global_step == 3 and trainer.coders.cross_layer == 2
    resumed = json.loads((tmp_path / "r" / "config.json").read_text())
    changed = {k for k in config if config[k] != resumed[k]}
    assert changed == {"max_examples", "resume", "save_every"}
    with pytest.raises(
        ValueError, match=r"other settings: --batch_size 4 \(saved: 8\); --k 8 \(saved: 4\); leave"
    ):
        run([*resume, "-k", "8", "--batch_size=4"])
    with pytest.raises(ValueError, match=r"--tokens text \(saved: all\)"):
        run([*resume, "--tokens", "text"])
    with pytest.raises(ValueError, match=r"--lr 0.01 \(saved: 0.001\)"):
        run([*resume, "--lr", "0.01"])
    with pytest.raises(ValueError, match=r"--layers select .*0.mlp.*1.mlp'\] but"):
        run([*resume, "--layers", "0", "1"])
    run([*resume, "--layers", "0", "1", "2", "--max_examples", "24"])  # the same hookpoints
    with pytest.raises(ValueError, match=r"MODEL .*other_model \(saved: .*tiny_llava"):
        run([str(tmp_path / "other_model"), *resume])
    with pytest.raises(ValueError, match=r"--split test \(saved: '' \(the default\)\); leave"):
        run([*resume, "--split", "test"])  # saved as '': the recipe's split
    with pytest.raises(FileNotFoundError, match="cannot resume: .*none/config.json does not"):
        run(["--save_dir", str(tmp_path), "--run_name", "none", "--resume", "true"])


def test_resume_never_takes_trust_remote_code_from_disk(tmp_path):
    from vlm_sparsify.__main__ import RunConfig, apply_saved_settings, parse_run_config

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    args, given = parse_run_config(["--save_dir", str(tmp_path), "--run_name", "r"])
    saved = {**json.loads(json.dumps(asdict(args), default=str)), "trust_remote_code": True}
    (run_dir / "config.json").write_text(json.dumps(saved))
    resumed, given = parse_run_config(["--save_dir", str(tmp_path), "--run_name", "r", "--resume"])
    apply_saved_settings(resumed, run_dir, given)
    assert isinstance(resumed, RunConfig) and resumed.trust_remote_code is False
    again, given = parse_run_config(
        ["--save_dir", str(tmp_path), "--run_name", "r", "--resume", "--trust_remote_code", "true"]
    )
    apply_saved_settings(again, run_dir, given)
    assert again.trust_remote_code is True  # the command line still may


def test_resume_ignores_a_setting_this_version_no_longer_has(tmp_path, tiny_llava_dir):
    """Runs saved while --gpu_decoder existed (removed) hold it in config.json: resumable."""
    run(cli(tiny_llava_dir, tmp_path, "r", "--cross_layer", "2", "--max_examples", "16"))
    path = tmp_path / "r" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "gpu_decoder": "triton"}))
    resume = ["--save_dir", str(tmp_path), "--run_name", "r", "--resume", "true"]
    trainer = run([*resume, "--max_examples", "24"])
    assert trainer.state.global_step == 3
    assert "gpu_decoder" not in json.loads(path.read_text())  # saved again without it
    with pytest.raises(SystemExit):  # no longer a flag
        run([*resume, "--gpu_decoder", "sparsify"])


def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, tiny_llava_dir, monkeypatch):
    import shutil

    run(cli(tiny_llava_dir, tmp_path, "good", "--max_examples", "8"))
    for name, damage in [
        ("state.pt", "truncate"),
        ("optimizer_0.pt", "truncate"),
        ("train_params.safetensors", "truncate"),
        ("config.json", "{not json"),
    ]:
        shutil.rmtree(tmp_path / "bad", ignore_errors=True)
        shutil.copytree(tmp_path / "good", tmp_path / "bad")
        path = tmp_path / "bad" / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else damage.encode())
        argv = ["--save_dir", str(tmp_path), "--run_name", "bad", "--resume", "true"]
        monkeypatch.setattr(sys, "argv", ["vlm_sparsify", *argv])
        with pytest.raises(SystemExit) as stop:
            main()
        message = str(stop.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
        assert str(path) in message, message


def test_a_new_run_does_not_replace_an_existing_one_unless_told(tmp_path, tiny_llava_dir, capsys):
    short = ("--max_examples", "8")
    run(cli(tiny_llava_dir, tmp_path, "r", "--max_examples", "16"))
    with pytest.raises(ValueError, match=r"r already holds a run: pass --resume .* --overwrite"):
        run(cli(tiny_llava_dir, tmp_path, "r", *short))
    with pytest.raises(ValueError, match="pass one"):
        run(cli(tiny_llava_dir, tmp_path, "r", "--resume", "true", "--overwrite", "true"))
    stale = tmp_path / ".r.tmp-999999999"  # no such process: a save killed midway
    stale.mkdir()
    run(cli(tiny_llava_dir, tmp_path, "r", *short, "--overwrite", "true"))
    assert f"removed {stale} (left by process 999999999" in capsys.readouterr().out
    assert not stale.exists()
    assert torch.load(tmp_path / "r" / "state.pt", weights_only=True)["global_step"] == 1


def test_default_names_the_embedded_model_and_a_dataset_in_its_place_is_named(tmp_path):
    from vlm_sparsify.__main__ import parse_run_config
    from vlm_sparsify.loading import DEFAULT_MODEL

    assert parse_run_config(["default", "easyvqa"])[0].model == DEFAULT_MODEL
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(
        ValueError, match=f"MODEL '{tmp_path}' looks like a dataset .* default {tmp_path}`"
    ):
        run([str(tmp_path)])


def test_decoder_dtype_auto_is_bf16_on_a_gpu_only(capsys):
    from vlm_sparsify.__main__ import resolve_decoder_dtype

    assert resolve_decoder_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_decoder_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_decoder_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(SystemExit):
        run(["--decoder_dtype", "bf16"])
    assert (
        "error: argument --decoder_dtype: invalid choice: 'bf16' (choose from 'auto', 'float32', "
        "'bfloat16', 'float16')" in capsys.readouterr().err
    )


def test_each_process_takes_its_nodes_gpu(monkeypatch):
    from vlm_sparsify.__main__ import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # e.g. global rank 11 on a second node of 8 GPUs
    monkeypatch.setenv("RANK", "11")
    assert default_device() == "cuda:3"
    monkeypatch.delenv("LOCAL_RANK")
    assert default_device() == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


def test_resume_with_adam_continues_the_learning_rate_warm_up(
    tmp_path, tiny_llava_dir, monkeypatch
):
    # signum has no scheduler: only adam / muon show whether the warm-up restarts on resume
    extra = ("--optimizer", "adam", "--lr_warmup_steps", "4", "--save_every", "3")
    run(cli(tiny_llava_dir, tmp_path, "whole", *extra))
    original = interrupt_at_batch(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(cli(tiny_llava_dir, tmp_path, "split", *extra))
    monkeypatch.setattr(training.Trainer, "train_on_batch", original)
    run(cli(tiny_llava_dir, tmp_path, "split", *extra, "--resume", "true"))
    whole = weights(tmp_path / "whole")
    for hook, tensors in weights(tmp_path / "split").items():
        for key, value in tensors.items():
            assert torch.equal(value, whole[hook][key]), (hook, key)


def test_k_decays_linearly_from_ten_times_the_width_to_k():
    from types import SimpleNamespace

    from sparsify import SparseCoderConfig

    from vlm_sparsify.cross_layer import CrossLayerTranscoder
    from vlm_sparsify.training import Trainer, TrainingState

    cfg = SparseCoderConfig(num_latents=64, k=2, transcode=True)
    clt = CrossLayerTranscoder(["l.0", "l.1"], 4, cfg, 2)
    ks = []
    for acc, step in ((1, 0), (1, 1), (1, 6), (1, 10), (1, 11), (1, 12), (2, 7), (2, 8)):
        train_cfg = SimpleNamespace(k_decay_steps=10, sae=SimpleNamespace(k=2), grad_acc_steps=acc)
        trainer = SimpleNamespace(cfg=train_cfg, coders=clt, state=TrainingState(global_step=step))
        ks.append(Trainer.current_k(trainer))
    # from min(64 latents, 10 x d 4) = 40, linearly to k 2; as in sparsify.Trainer, batch b
    # trains with the k of b - 1 (that of the batch count when the last optimizer step ran)
    assert ks == [40, 40, 21, 6, 2, 2, 21, 13]


def test_resuming_a_run_that_has_seen_its_max_examples_says_so_and_writes_nothing(
    tmp_path, tiny_llava_dir, capsys
):
    run(cli(tiny_llava_dir, tmp_path, "done", "--max_examples", "16"))
    state = tmp_path / "done" / "state.pt"
    before = state.stat().st_mtime_ns, weights(tmp_path / "done")
    capsys.readouterr()
    for max_examples in ("8", "16"):
        trainer = run(cli(tiny_llava_dir, tmp_path, "done", "--max_examples", max_examples,
                          "--resume", "true"))  # fmt: skip
        assert trainer.state.batches_seen == 2
        note = capsys.readouterr().err
        assert (
            f"trained on 16 examples (2 batches) already, all that --max_examples {max_examples} "
            in note
        )
        assert "nothing to do (nothing was written); pass a larger --max_examples" in note
    assert state.stat().st_mtime_ns == before[0]
    after = weights(tmp_path / "done")
    assert all(torch.equal(v, after[h][k]) for h in HOOKS for k, v in before[1][h].items())
    # a larger --max_examples goes on
    trainer = run(cli(tiny_llava_dir, tmp_path, "done", "--max_examples", "24", "--resume", "true"))
    assert trainer.state.batches_seen == 3


def test_resume_with_a_larger_max_examples_trains_the_rest_of_a_short_last_batch(
    tmp_path, tiny_llava_dir, monkeypatch, capsys
):
    from vlm_sparsify.data import BatchStream

    trained = []
    make_batch = BatchStream.make_batch

    def recorded(self, index, chunk):
        trained.append([example.id for example in chunk])
        return make_batch(self, index, chunk)

    monkeypatch.setattr(BatchStream, "make_batch", recorded)
    run(cli(tiny_llava_dir, tmp_path, "whole", "--max_examples", "24"))
    whole, trained[:] = list(trained), []
    run(cli(tiny_llava_dir, tmp_path, "split", "--max_examples", "12"))  # batches of 8 and 4
    # examples 12-15 were never trained: the resumed run trained from example 16 on
    trainer = run(
        cli(tiny_llava_dir, tmp_path, "split", "--max_examples", "24", "--resume", "true")
    )
    assert [len(ids) for ids in trained] == [8, 4, 4, 8]
    assert sum(trained, []) == sum(whole, [])  # each example once, in the same order
    assert (trainer.state.examples_seen, trainer.state.batches_seen) == (24, 4)
    capsys.readouterr()
    run(cli(tiny_llava_dir, tmp_path, "split", "--max_examples", "24", "--resume", "true"))
    assert "trained on 24 examples (4 batches) already, all that" in capsys.readouterr().err


def test_adams_learning_rate_decay_spans_the_rest_of_a_short_batch_on_resume(
    tmp_path, tiny_llava_dir
):
    extra = ("--optimizer", "adam", "--lr_warmup_steps", "0")
    run(cli(tiny_llava_dir, tmp_path, "adam", *extra, "--max_examples", "12"))  # batches: 8, 4
    trainer = run(cli(tiny_llava_dir, tmp_path, "adam", *extra, "--max_examples", "24",
                      "--resume", "true"))  # fmt: skip
    assert trainer.state.global_step == 4  # 8, 4, then the short batch's other 4, then 8
    # fitted to 4 steps: the last one still learns (fitted to 3 batches, its rate was 0)
    decay = trainer.schedulers[0].lr_lambdas[0]
    assert [decay(step) for step in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_a_checkpoint_saved_before_examples_were_counted_resumes_at_its_next_batch(
    tmp_path, tiny_llava_dir
):
    run(cli(tiny_llava_dir, tmp_path, "old", "--max_examples", "16"))
    path = tmp_path / "old" / "state.pt"
    state = torch.load(path, weights_only=True)
    del state["examples_seen"]
    torch.save(state, path)
    trainer = run(cli(tiny_llava_dir, tmp_path, "old", "--max_examples", "24", "--resume", "true"))
    assert (trainer.state.examples_seen, trainer.state.batches_seen) == (24, 3)


def test_finetune_takes_a_run_name_of_the_save_dir_as_resume_does(tmp_path, monkeypatch):
    from vlm_sparsify.__main__ import parse_run_config

    (tmp_path / "runs" / "src").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    args, _ = parse_run_config(["--save_dir", "runs", "--finetune", "src"])
    assert args.finetune == str(Path("runs") / "src")
    args, _ = parse_run_config(["--save_dir", "runs", "--finetune", "runs/src"])
    assert args.finetune == "runs/src"  # a path as given still works
    args, _ = parse_run_config(["--save_dir", "runs", "--finetune", "missing"])
    assert args.finetune == "missing"  # and a missing one is named as given when it loads


def test_a_tilde_the_shell_left_in_a_path_flag_means_the_home_folder(tmp_path, monkeypatch):
    from vlm_sparsify.__main__ import parse_run_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "images").mkdir()
    args, _ = parse_run_config(["default", "~/images", "--save_dir=~/runs", "--finetune=~/run",
                                "--recipe=~/mine.toml"])  # fmt: skip
    assert args.save_dir == str(tmp_path / "runs")
    assert args.dataset == str(tmp_path / "images") and args.finetune == str(tmp_path / "run")
    assert args.recipe == str(tmp_path / "mine.toml")


def test_a_run_of_the_embedded_model_names_it_default_and_resumes_from_that(tmp_path):
    flags = ["--save_dir", str(tmp_path), "--run_name", "d", "--batch_size", "8", "--num_latents",
             "64", "--k", "4", "--num_workers", "0", "--log_to_wandb", "false"]  # fmt: skip
    run(["default", "easyvqa", *flags, "--max_examples", "8"])
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    assert saved["model"] == "default"  # not this machine's path to the package
    trainer = run([*flags, "--max_examples", "16", "--resume", "true"])
    assert trainer.state.batches_seen == 2


def test_a_run_config_json_of_another_shape_is_one_line_naming_it(tmp_path, tiny_llava_dir):
    # a JSON list there ended --resume, fidelity and export in AttributeError / TypeError tracebacks
    from sparsify import SparseCoderConfig

    from vlm_sparsify import export, fidelity
    from vlm_sparsify.coder_io import save_coders
    from vlm_sparsify.per_layer import PerLayerCoders

    coders = PerLayerCoders(HOOKS, 32, SparseCoderConfig(num_latents=16, k=2, transcode=True))
    save_coders(coders, tmp_path / "r", config=[])  # type: ignore[arg-type]
    error = "config.json holds a JSON list where an object is expected"
    with pytest.raises(ValueError, match=error):
        run(cli(tiny_llava_dir, tmp_path, "r", "--resume", "true"))
    with pytest.raises(ValueError, match=error):
        fidelity.main([str(tmp_path / "r")])
    with pytest.raises(ValueError, match=error):
        export.main(["circuit-tracer", str(tmp_path / "r"), str(tmp_path / "ct")])


@pytest.mark.parametrize("change", ["width", "hookpoints"])
def test_resume_names_coders_that_differ_from_the_saved_ones_before_loading(tmp_path, change):
    # the shape and key checks of `read_training_state` (a copied train_params file, or a
    # sharded run resumed with another number of processes), not torch's size-mismatch error
    from types import SimpleNamespace

    from sparsify import SparseCoderConfig

    from vlm_sparsify.per_layer import PerLayerCoders
    from vlm_sparsify.train_state import live_parameters, read_training_state, write_resume_files

    cfg = SparseCoderConfig(num_latents=16, k=2, transcode=True)
    saved = PerLayerCoders(HOOKS, 8, cfg)
    trainer = SimpleNamespace(coders=saved, optimizers=[], schedulers=[])
    write_resume_files(tmp_path, trainer, live_parameters(trainer))
    torch.save(training.TrainingState().to_dict(), tmp_path / "state.pt")
    if change == "width":
        other = PerLayerCoders(HOOKS, 8, SparseCoderConfig(num_latents=32, k=2, transcode=True))
    else:
        other = PerLayerCoders(HOOKS[:2], 8, cfg)
    resumed = SimpleNamespace(
        coders=other, cfg=SimpleNamespace(batch_size=8), optimizers=[], schedulers=[]
    )
    with pytest.raises(ValueError, match="its coders differ from this run's settings"):
        read_training_state(tmp_path, resumed)


def test_summary_counts_latents_at_the_horizon_as_dead_and_averages_the_last_window():
    from types import SimpleNamespace

    from vlm_sparsify.training import Trainer, TrainingState

    state = TrainingState(
        tokens_seen=100,
        tokens_since_fired=[torch.tensor([0, 50, 100, 100])],
        fvu_history=[[9.0], [1.0], [3.0]],
        l0_history=[[9.0], [2.0], [4.0]],
    )
    coders = SimpleNamespace(hookpoints=["h"], n_targets=lambda p: 1)

    def summary(threshold: int) -> dict:
        cfg = SimpleNamespace(dead_feature_threshold=threshold)
        trainer = SimpleNamespace(state=state, coders=coders, cfg=cfg)
        return Trainer.summary(trainer, window=2)[0]  # type: ignore[arg-type]

    row = summary(50)  # 50 tokens without firing is dead; never fired: all 100 tokens
    assert (row["dead_pct"], row["never_fired_pct"]) == (75.0, 50.0)
    assert (row["fvu"], row["l0"]) == (2.0, 3.0)  # the last 2 steps only
    # a threshold above the run's tokens: dead means never fired in the whole run
    assert summary(10**7)["dead_pct"] == 50.0

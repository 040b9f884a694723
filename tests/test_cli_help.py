"""Every command's `--help` prints its flags and exits 0 (a stray `%` in a help text used to crash
`python -m vlm_sparsify.tiny --help`)."""

import json
import re
import runpy
import sys
from dataclasses import asdict

import pytest

from benchmarks import BENCHMARKS, STAGES
from benchmarks.__main__ import run as run_benchmarks
from vlm_sparsify.tiny.__main__ import parse_args
from vlm_sparsify.tiny.evaluate import SHIPPED

MODULES = {
    "vlm_sparsify": "--cross_layer",
    "vlm_sparsify.tiny": "--patch_size",
    "vlm_sparsify.tiny.evaluate": "--blank",
    "vlm_sparsify.fidelity": "--mode",
    "vlm_sparsify.ask": "--edit",
    "vlm_sparsify.bench": "--gpu",
    "vlm_sparsify.export": "circuit-tracer",
    "vlm_sparsify.hub": "REPO",
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_help(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    for name in (module, f"{module}.__main__"):  # run it afresh as __main__
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert MODULES[module] in out
    assert out.startswith(f"usage: python -m {module} ")  # not `usage: evaluate.py`


@pytest.mark.parametrize("benchmark", BENCHMARKS)
@pytest.mark.parametrize("stage", STAGES)
def test_benchmark_stage_help(benchmark, stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_benchmarks([benchmark, stage, "--help"])
    assert exit_.value.code in (0, None)
    assert "--out" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["easyvqa", "--help"], ["pope", "-h"]])
def test_benchmarks_help_without_a_stage(argv, capsys):
    """`python -m benchmarks easyvqa --help` said "unknown stage '--help'" and exited 1."""
    with pytest.raises(SystemExit) as exit_:
        run_benchmarks(argv)
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage: python -m benchmarks" in out and all(stage in out for stage in STAGES)


def test_benchmarks_help_says_what_each_stage_does_and_where_the_flags_are(capsys):
    # `python -m benchmarks --help` printed the usage line alone: stage names, no order, no
    # word of what they do or that each stage has a --help of its own
    with pytest.raises(SystemExit):
        run_benchmarks(["--help"])
    lines = capsys.readouterr().out.splitlines()
    described = [line.split()[0] for line in lines if line.startswith("  ")]
    assert described == list(STAGES)  # one line each, in the order they run
    steer = next(line for line in lines if line.split()[:1] == ["steer"])
    assert "clamp" in steer  # steer --op clamp, not scaling only
    assert any("python -m benchmarks BENCH STAGE --help" in line for line in lines)
    assert any("docs/benchmarks.md" in line for line in lines)


def test_tiny_cli_takes_the_architecture_flags():
    config, shape = parse_args(["--patch_size", "16", "--max_positions", "64", "--seed", "3"])
    assert (shape.patch_size, shape.max_positions, shape.num_image_tokens) == (16, 64, 16)
    assert config.seed == 3


def test_tiny_cli_defaults_are_the_shipped_recipe():
    """docs/tiny_model.md: `--device cpu --threads 1 --save_every 500` + defaults made the model."""
    record = json.loads((SHIPPED / "training.json").read_text())
    config, shape = parse_args(["--device", "cpu", "--threads", "1", "--save_every", "500"])
    assert asdict(shape) == record["shape"]
    assert {**asdict(config), "out": record["config"]["out"]} == record["config"]


def test_training_help_names_the_program_and_the_recipes_defaults(capsys):
    from vlm_sparsify.__main__ import run

    with pytest.raises(SystemExit) as exit_:
        run(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith("usage: python -m vlm_sparsify [-h]") and "[MODEL] [DATASET]" in text
    assert (
        "Batch size measured in sequences. (default: the recipe's [train] value, else 32)" in text
    )
    assert "(default: the recipe's dataset). --recipe" in text  # its default said once
    assert "train a sparse coder for each seed" not in text and " str str" not in text
    # every flag has a help text (sparsify's --log_to_wandb showed a placeholder, --run_name none)
    assert "<__TEMP__>" not in text
    assert "--run_name [str] The run's name: its folder under --save_dir" in text


def test_a_cli_warning_is_one_line_without_python_source():
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "from vlm_sparsify.cli import run_cli\n"
        "run_cli(lambda: warnings.warn('the recipe is guessed; pass --recipe'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stderr == "warning: the recipe is guessed; pass --recipe\n"


@pytest.mark.parametrize("as_tool", [True, False])
def test_ctrl_c_while_a_tool_loads_torch_is_one_line_not_a_traceback(as_tool):
    """Under `python -m` (runpy holds "-m" in sys.argv[0] while it imports the package) Ctrl-C
    during the package's imports ends with status 130 and one line; imported as a library, the
    package leaves Ctrl-C alone (KeyboardInterrupt), and after the imports so does a tool."""
    import subprocess
    import sys

    code = (
        "import builtins, os, signal, sys\n"
        f"sys.argv = {['-m'] if as_tool else ['lib']!r}\n"
        "real = builtins.__import__\n"
        "def ctrl_c_at_torch(name, *args, **kwargs):\n"
        "    if name == 'torch':\n"
        "        builtins.__import__ = real\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = ctrl_c_at_torch\n"
        "try:\n"
        "    import vlm_sparsify\n"
        "except KeyboardInterrupt:\n"
        "    print('KeyboardInterrupt', file=sys.stderr)\n"
        "    sys.exit(3)\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if as_tool:
        assert (done.returncode, done.stderr, done.stdout) == (130, "\ninterrupted (Ctrl-C)\n", "")
    else:
        assert (done.returncode, done.stderr) == (3, "KeyboardInterrupt\n")
    code = "import sys\nsys.argv = ['-m']\nimport signal, vlm_sparsify\n"
    code += "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout == "True\n"


def train(argv: list[str]) -> object:
    from vlm_sparsify.__main__ import run

    return run(argv)


def analyze(argv: list[str]) -> object:
    return run_benchmarks(["easyvqa", "analyze", "--out", "x", *argv])


def steer(argv: list[str]) -> object:
    return run_benchmarks(["easyvqa", "steer", "--out", "x", *argv])


def ask(argv: list[str]) -> object:
    from vlm_sparsify.ask import main

    return main(["run", *argv])


def fidelity(argv: list[str]) -> object:
    from vlm_sparsify.fidelity import main

    return main(["run", *argv])


@pytest.mark.parametrize(
    ("command", "typo", "message"),
    [
        (train, "--max_exampels", "unknown flag --max_exampels (did you mean --max_examples?); "
         "`python -m vlm_sparsify --help` lists them"),
        (analyze, "--target-featuers=4",
         "unknown flag --target-featuers=4 (did you mean --target-features?)"),
        (train, "--zzz", "unknown flag --zzz; `python -m vlm_sparsify --help`"),
        # an abbreviation is a typo too: argparse read `--factor 2` as `--factors 2`
        (steer, "--factor=2", "unknown flag --factor=2 (did you mean --factors?)"),
        (ask, "--qestion=q", "unknown flag --qestion=q (did you mean --question?); "
         "`python -m vlm_sparsify.ask --help` lists them"),
        (fidelity, "--limt=2", "unknown flag --limt=2 (did you mean --limit?)"),
    ],
)  # fmt: skip
def test_a_mistyped_flag_is_one_line_with_the_closest_flag(command, typo, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        command([typo])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    ("flag", "instead"),
    [
        (["--text_column", "caption"], r"recipe's \[dataset\] text_column .*--recipe PATH"),
        (["--load_in_8bit"], "no quantised models: --dtype"),
        (["--data_preprocessing_num_proc=8"], "--num_workers DataLoader workers"),
    ],
)
def test_a_stock_sparsify_flag_not_taken_says_what_to_use_instead(flag, instead, capsys):
    # the README lists these three as refused, each with its replacement; the error said only
    # "unknown flag --text_column", as for a typo, leaving a sparsify user to find out why
    with pytest.raises(SystemExit) as exit_:
        train(flag)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stock sparsify's flag, not taken here" in err, err
    assert re.search(instead, err), err


@pytest.mark.parametrize(
    "argv", [["--hf-token=hf_SECRET"], ["default", "easyvqa", "--hf-token", "hf_SECRET"]]
)
def test_a_mistyped_token_flag_never_echoes_the_token(argv, capsys):
    from vlm_sparsify.__main__ import parse_run_config

    with pytest.raises(SystemExit):
        parse_run_config(argv)
    err = capsys.readouterr().err
    assert "unknown flag" in err and "did you mean --hf_token?" in err
    assert "SECRET" not in err, err


def test_ask_and_fidelity_take_flags_with_dashes_as_the_other_tools_do() -> None:
    from vlm_sparsify.ask import main as ask_main

    # both spellings parse (the run is then missing: the flags were taken)
    for ask_flag, fidelity_flag in (("--max-new-tokens", "--batch-size"),
                                    ("--max_new_tokens", "--batch_size")):  # fmt: skip
        with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
            ask_main(["nowhere", "--image", "i.png", "--question", "q", ask_flag, "3"])
        with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
            fidelity([fidelity_flag, "2"])

"""Every command line the docs show (README.md, BENCHMARKS.md, docs/*.md, patches/README.md: in
shell or untyped fenced blocks, or a whole command in backticks) is one its tool takes: each
`python -m vlm_sparsify...` / `python -m benchmarks ...` runs as `python -m` runs it, with
`parse_args` stopped once it returns, so every documented flag must exist and the parse (its
dataclasses' checks included) must succeed, while no tool runs and no model loads; `make X`
must be a Makefile target. Nothing else checks the docs against the code: a flag renamed there
would stay here. Schematic usage is expanded: `[--flag V]` is given, each of `a|b|c`, `{a,b}`
and `[--x | --y]` is tried, placeholders (RUN, N, ...) get dummy values; a failure names the
doc's file:line."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from transformers import PreTrainedModel

from benchmarks import BENCHMARKS, STAGES

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "BENCHMARKS.md", "patches/README.md"] + sorted(
    str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md")
)
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
OURS = ("vlm_sparsify", "benchmarks")
"""Packages whose `python -m` commands are checked; other modules (`venv`, `spacy`, `nltk`)
are not this project's."""

SKIPPED = {
    "torchrun ... --distribute_modules true": "a flag named in prose with its launcher elided, "
    "not a whole command (README's Train block shows it whole)",
    "python -m benchmarks <pope|amber|easyvqa> capture → score → classify → attribute → analyze "
    "→ plot → examples → map → steer": "README's pipeline diagram: the stages in order, not a "
    "command line",
}
"""Commands not checked (as written in the doc, whitespace collapsed), with why."""

PLACEHOLDERS: dict[str, list[str]] = {
    "N": ["4"],
    "K": ["4"],
    "D": ["cpu"],
    "BENCH": list(BENCHMARKS),
    "STAGE": list(STAGES),
}
"""Values a placeholder stands for (each is tried); any other placeholder (RUN, DIR, IMG, ...)
is a string, which its flag takes as it is."""

TOOL_PLACEHOLDERS = {"BENCH", "STAGE"}
"""A command of only its tool (`python -m vlm_sparsify.fidelity`, `python -m benchmarks BENCH
STAGE`) names the tool in prose: checked with `--help`."""

ELIDED = "..."
"""In a command, the flags left out (`-m benchmarks BENCH capture ...`): a required flag may be
missing; right after a flag (`--recipe ...`), its value left out (given as X)."""


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str  # as written, whitespace collapsed
    common: str = ""  # what `[common flags]` in it stands for


FENCE = "```"


def _fenced_lines(lines: list[str]) -> Iterator[tuple[int, str | None, str]]:
    """(line number, the language of the fence it is in or None outside one, line); a fence's
    own lines come with FENCE."""
    fence: str | None = None
    for number, line in enumerate(lines, 1):
        opening = re.match(r"\s*```\s*([\w-]*)", line)
        if opening:
            fence = opening.group(1).lower() if fence is None else None
            yield number, FENCE, line
        else:
            yield number, fence, line


COMMAND_START = re.compile(r"(?<![\w./-])(?:python3? -m |torchrun |make )")
INLINE_START = re.compile(r"(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3? -m |torchrun |make )")
"""How a code span holding a whole command starts (environment variables may come first)."""


def _block_commands(name: str, lines: list[str]) -> Iterator[Command]:
    """Commands in shell (and untyped) fenced blocks: `\\` continuations joined, and so are the
    indented `[...]` lines that continue a schematic usage."""
    current: tuple[int, str] | None = None
    continued = False
    for number, fence, line in _fenced_lines(lines):
        if fence is None or fence not in SHELL_FENCES:
            if current:
                yield Command(f"{name}:{current[0]}", " ".join(current[1].split()))
            current, continued = None, False
            continue
        stripped = line.strip()
        if current and (continued or stripped.startswith("[")):
            current = (current[0], f"{current[1]} {stripped.removesuffix(chr(92))}")
            continued = stripped.endswith("\\")
            continue
        if current:
            yield Command(f"{name}:{current[0]}", " ".join(current[1].split()))
            current = None
        match = COMMAND_START.search(line)
        if match and (
            match.group().startswith(("python", "torchrun")) or not line[: match.start()].strip()
        ):
            text = line[match.start() :].rstrip()
            continued = text.endswith("\\")
            current = (number, text.removesuffix("\\"))
    if current:
        yield Command(f"{name}:{current[0]}", " ".join(current[1].split()))


def _inline_commands(name: str, lines: list[str]) -> Iterator[Command]:
    """Code spans outside fences that hold a whole command (they may wrap over lines)."""
    prose = "\n".join(line if fence is None else "" for _, fence, line in _fenced_lines(lines))
    for match in re.finditer(r"`([^`]+)`", prose):
        span = match.group(1)
        if "\n\n" in span or not INLINE_START.match(span.lstrip()):
            continue
        number = prose.count("\n", 0, match.start()) + 1
        yield Command(f"{name}:{number}", " ".join(span.split()))


COMMON_FLAGS = re.compile(r"^# common flags:\n((?:#\s+\[.*\n)+)", re.MULTILINE)
"""A block's list of the flags its usages give as `[common flags]` (comment lines)."""


def doc_commands() -> list[Command]:
    commands = []
    for name in DOCS:
        text = (REPO / name).read_text()
        listed = COMMON_FLAGS.search(text)
        common = " ".join(listed.group(1).replace("#", " ").split()) if listed else ""
        lines = text.splitlines()
        commands += [
            Command(c.where, c.text, common if "[common flags]" in c.text else "")
            for c in (*_block_commands(name, lines), *_inline_commands(name, lines))
        ]
    return sorted(commands, key=lambda c: (c.where.split(":")[0], int(c.where.split(":")[1])))


# --- from a documented command to the argument lists it stands for ---------------------------


def _split_shell(text: str) -> list[list[str]]:
    """Tokens of each command of a shell line (`&&`, `;`, `||` separate; a pipe's later
    commands, redirections and comments dropped); a `|` inside `[...]` separates alternatives."""
    commands: list[list[str]] = [[]]
    depth = 0
    tokens = iter(shlex.split(text, comments=True))
    for token in tokens:
        if depth == 0 and token in ("&&", ";", "||"):
            commands.append([])
            continue
        if depth == 0 and token == "|":
            commands.append(["<pipe>"])  # what a pipe feeds is not checked
            continue
        if depth == 0 and re.fullmatch(r"\d?>>?(&\d)?", token):
            if not token.endswith(("&1", "&2")):
                next(tokens, None)  # the file it writes
            continue
        depth += _opens(token) - _closes(token)
        commands[-1].append(token)
    return [c for c in commands if c and c[0] != "<pipe>"]


def _opens(token: str) -> int:
    return len(token) - len(token.lstrip("["))


def _closes(token: str) -> int:
    body = token[_opens(token) :]
    return max(0, body.count("]") - body.count("["))


Tree = list[Any]  # tokens (str) and optional groups (list of alternatives, each a Tree)


def _tree(tokens: list[str]) -> Tree:
    """Tokens with `[...]` groups nested: a group is a list of alternatives (split at `|`)."""
    stack: list[list[Tree]] = [[[]]]
    for token in tokens:
        for _ in range(_opens(token)):
            stack.append([[]])
        closes = _closes(token)
        word = token[_opens(token) : len(token) - closes]
        if word == "|" and len(stack) > 1:
            stack[-1].append([])
        elif word:
            stack[-1][-1].append(word)
        for _ in range(closes):
            group = stack.pop()
            stack[-1][-1].append(group)
    assert len(stack) == 1, f"unbalanced [ ] in {tokens}"
    return stack[0][0]


def _choices(word: str) -> list[str]:
    """The values a word stands for: `a|b`, `{a,b}`, `<a|b>`, a placeholder; `...` none."""
    if word in (ELIDED, "…"):
        return []
    if word in PLACEHOLDERS:
        return PLACEHOLDERS[word]
    braced = re.fullmatch(r"\{(.+)\}", word)
    if braced:
        return braced.group(1).split(",")
    word = re.sub(r"^<(.+)>$", r"\1", word)
    if "|" in word and not word.startswith("-"):
        return word.split("|")
    return [word]


def _width(tree: Tree) -> int:
    """How many argument lists cover every alternative of `tree` (each choice cycles)."""
    widths = [1]
    for item in tree:
        if isinstance(item, str):
            widths.append(len(_choices(item)) or 1)
        else:
            widths += [len(item), *map(_width, item)]
    return max(widths)


def _pick(tree: Tree, i: int) -> list[str]:
    """The `i`th argument list of `tree`: each choice's `i % n`th alternative; a group that
    starts with neither a flag nor a placeholder (`[common flags]`, prose) is left out."""
    argv: list[str] = []
    for item in tree:
        if item in (ELIDED, "…") and argv and argv[-1].startswith("-"):
            argv.append("X")  # `--recipe ...`: the flag's value elided
            continue
        if isinstance(item, str):
            choices = _choices(item)
            argv += [choices[i % len(choices)]] if choices else []
            continue
        alternative = item[i % len(item)]
        first = alternative[0] if alternative else ""
        if isinstance(first, str) and not first.startswith("-") and not first.isupper():
            continue
        argv += _pick(alternative, i)
    return argv


def _without_launcher(tokens: list[str]) -> list[str]:
    """`python -m M ARGS` from `[ENV=1 ...] python -m M ARGS` or `torchrun FLAGS -m M ARGS`."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]
    if tokens[:1] == ["torchrun"]:
        assert "-m" in tokens, f"`{' '.join(tokens)}`: no `-m MODULE`; a fragment goes in SKIPPED"
        tokens = ["python", *tokens[tokens.index("-m") :]]
    return tokens


def argument_lists(text: str, common: str = "") -> list[list[str]]:
    """Each command of `text` (`python -m M ...` or `make ...`) as the argument lists it
    stands for, launcher first (`python -m M` / `make`); `common` replaces `[common flags]`."""
    if common:
        text = text.replace("[common flags]", common)
    lists = []
    for tokens in _split_shell(text):
        tokens = _without_launcher(tokens)
        if tokens[:1] == ["make"] or tokens[:2] in (["python", "-m"], ["python3", "-m"]):
            if tokens[0] != "make" and set(tokens[3:]) <= TOOL_PLACEHOLDERS:
                tokens = [*tokens, "--help"]  # the tool named, not a command line
            tree = _tree(tokens)
            lists += [_pick(tree, i) for i in range(_width(tree))]
    return lists


# --- running a tool's parser -------------------------------------------------------------------


class Parsed(BaseException):
    """Raised by `parse_args` once it has parsed: the tool stops before it does anything (a
    BaseException, so no tool's `except Exception` takes it)."""


def _parse_then_stop(real: Any) -> Any:
    def parse_args(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        raise Parsed(real(self, *args, **kwargs))

    return parse_args


def _no_model(*args: Any, **kwargs: Any) -> NoReturn:
    """`from_pretrained` while a tool parses: it must not load a model."""
    raise AssertionError(f"from_pretrained{args}: a model loads; the check only parses")


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, flags=re.MULTILINE))


def check(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any, elided: bool = False
) -> str | None:
    """None when the tool's parser takes `argv` (`python -m M ...` or `make ...`), else why not;
    with `elided` (the doc left flags out), a missing required flag is not counted."""
    if argv[0] == "make":
        targets = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
        missing = sorted(set(targets) - make_targets())
        return f"no Makefile target {', '.join(missing)}" if missing else None
    module, args = argv[2], argv[3:]
    if not module.startswith(OURS):
        return None  # another package's tool (venv, spacy, nltk)
    with monkeypatch.context() as patch:
        patch.setattr(
            argparse.ArgumentParser,
            "parse_args",
            _parse_then_stop(argparse.ArgumentParser.parse_args),
        )
        patch.setattr(PreTrainedModel, "from_pretrained", _no_model)
        patch.setattr(sys, "argv", [module, *args])
        for name in (module, f"{module}.__main__"):  # run it afresh as __main__
            patch.delitem(sys.modules, name, raising=False)
        capsys.readouterr()  # what an earlier command printed
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except Parsed:
            return None
        except SystemExit as exit_:
            if exit_.code in (0, None):  # --help
                return None
            told = capsys.readouterr().err.strip()
            if elided and "error: the following arguments are required" in told:
                return None
            errors = [line for line in told.splitlines() if "error:" in line]  # not the usage
            return "\n".join(errors) or told or str(exit_.code)
        except Exception as err:  # a value the parsed config refuses (its __post_init__)
            return f"{type(err).__name__}: {err}"
    return "the tool ran to its end without parsing its arguments with argparse"


COMMANDS = doc_commands()


def _ids(commands: list[Command]) -> list[str]:
    """file:line, with `#2`, `#3` for a line's later commands."""
    seen: dict[str, int] = {}
    ids = []
    for c in commands:
        seen[c.where] = seen.get(c.where, 0) + 1
        ids.append(c.where if seen[c.where] == 1 else f"{c.where}#{seen[c.where]}")
    return ids


def test_the_docs_show_commands_of_every_tool() -> None:
    """The extraction finds what the docs show (an extraction that finds nothing passes)."""
    checked = [c for c in COMMANDS if c.text not in SKIPPED]
    shown = {
        argv[2] if argv[0] != "make" else "make"
        for c in checked
        for argv in argument_lists(c.text, c.common)
    }
    assert {
        "vlm_sparsify",
        "vlm_sparsify.fidelity",
        "vlm_sparsify.ask",
        "vlm_sparsify.bench",
        "vlm_sparsify.tiny",
        "benchmarks",
        "make",
    } <= shown
    assert set(SKIPPED) <= {c.text for c in COMMANDS}  # no stale skip


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_documented_command_parses(
    command: Command, monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    if command.text in SKIPPED:
        pytest.skip(SKIPPED[command.text])
    monkeypatch.chdir(tmp_path)  # relative paths in the docs name nothing here
    failures = []
    for argv in argument_lists(command.text, command.common):
        why = check(argv, monkeypatch, capsys, elided=ELIDED in command.text.split())
        if why is not None:
            failures.append(f"`{' '.join(argv)}`: {why}")
    assert not failures, f"{command.where}: `{command.text}`\n" + "\n".join(failures)

"""The README's examples run, and its commands and flags exist, so they can't rot.

The client examples (Python and command line) run against the real server
(tiny model). The shell examples that need a checkpoint, a GPU or Docker
cannot run here; their ``sd-triton*`` command lines are parsed by the real
argument parsers, their ``make`` targets must be in the Makefile, and every
``--flag`` the README names must be an option of one of the project's
commands.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from sd_triton.client import cli, read_infotext
from sd_triton.export import cli as export_cli
from sd_triton.export import tiny
from sd_triton.server import launcher

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# The project's commands, as the README writes them, and their parsers.
PARSERS = {
    "sd-triton": cli.build_parser,
    "sd-triton-export": export_cli.build_parser,
    "sd-triton-server": launcher.build_parser,
}


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def _inline_spans() -> list[str]:
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option of ``parser`` and of its subcommands."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def _tiny_options() -> set[str]:
    """``python -m sd_triton.export.tiny``'s options, from its help (its parser is built in main)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tiny.main(["--help"])
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))


def _commands() -> list[list[str]]:
    """The README's command lines (shell blocks, and inline spans that carry options), split."""
    lines = [line for block in _blocks("sh") for line in block.splitlines()]
    lines += [
        line.removeprefix("$ ") for block in _blocks("console") for line in block.splitlines()
    ]
    lines += [
        s
        for s in _inline_spans()
        if s.startswith("make ") or (s.startswith("sd-triton") and " -" in s)
    ]
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            words.pop(0)
        if words:
            commands.append(words)
    return commands


def test_readme_python_client_example_runs(triton_url, tmp_path, monkeypatch, capsys):
    blocks = [b for b in _blocks("python") if "localhost:8001" in b]
    assert blocks, "the README has no client example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block.replace("localhost:8001", triton_url), str(README), "exec"), {})
    assert read_infotext(tmp_path / "fox.png").startswith("a watercolor fox\n")
    out = capsys.readouterr().out
    assert "[7]" in out  # the seed came back
    assert "(64, 64) (64, 64) (128, 64)" in out  # img2img/inpaint keep the size; outpaint widens


def test_readme_command_line_example_runs(triton_url, tmp_path, monkeypatch):
    commands = [
        line.removeprefix("$ sd-triton ")
        for block in _blocks("console")
        for line in block.splitlines()
        if line.startswith("$ sd-triton ")
    ]
    assert commands
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert (
            cli.main([*shlex.split(command), "--url", triton_url, "--no-progress"]) == cli.EXIT_OK
        )
    assert (tmp_path / "fox.png").exists()
    assert os.path.getsize(tmp_path / "fox.png") > 0


def test_readme_command_lines_parse():
    """Every sd-triton* line parses with that command's parser; every make target exists."""
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    checked = 0
    for words in _commands():
        program, args = Path(words[0]).name, words[1:]
        if program == "make":
            assert set(args) <= targets, f"README: make {' '.join(args)}: no such target"
        elif program in PARSERS and "--help" not in args and "…" not in args:
            try:
                PARSERS[program]().parse_args(args)
            except SystemExit:
                pytest.fail(f"README: {' '.join(words)!r} does not parse")
        else:
            continue
        checked += 1
    assert checked >= 10, f"only {checked} README command lines found"


def test_readme_names_only_options_that_exist():
    known = set().union(*(_option_strings(build()) for build in PARSERS.values()))
    known |= _tiny_options()
    named = {
        flag
        for span in _inline_spans()
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)
    }
    assert len(named) >= 20, named
    assert named <= known, f"README names options no command has: {sorted(named - known)}"

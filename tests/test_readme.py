"""The README's client examples run against the real server (tiny model), so they can't rot."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from sd_triton.client import cli, read_infotext

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.server


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


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

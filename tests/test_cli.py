"""The ``sd-triton`` command line without a server: arguments, and errors as one line with an exit code."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from sd_triton.client import cli


@pytest.fixture
def unused_url() -> str:
    """An address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_size_is_width_x_height():
    args = cli.build_parser().parse_args(["generate", "a cat", "--size", "512x768"])
    assert args.size == (512, 768)
    assert args.output.name == "out.png"


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "x", "--size", "512"],
        ["generate", "x", "--size", "axb"],
        ["generate", "x", "-o", "out.jpg"],
        ["generate", "x", "--steps", "many"],
        ["generate"],
        [],
    ],
)
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == cli.EXIT_INVALID
    assert "Traceback" not in capsys.readouterr().err


def test_every_contract_option_has_a_flag():
    from sd_pipeline import spec as S

    gen = cli.build_parser()._subparsers._group_actions[0].choices["generate"]
    dests = {a.dest for a in gen._actions}
    covered = dests | ({"height", "width"} if "size" in dests else set())
    assert {t.name for t in S.STABLE_DIFFUSION.inputs} - covered == {
        "image",
        "mask_image",
        "strength",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "a cat", "--no-progress"],
        ["generate", "a cat", "--progress"],
        ["health"],
        ["models"],
    ],
)
def test_unreachable_server_is_one_line_and_exit_3(argv, unused_url, tmp_path, capsys):
    output = ["-o", str(tmp_path / "out.png")] if argv[0] == "generate" else []
    code = cli.main([*argv, *output, "--url", unused_url, "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_UNAVAILABLE
    assert "Traceback" not in err
    if argv[0] != "health":
        assert len(err.strip().splitlines()) == 1
        assert err.startswith(f"sd-triton: error: {unused_url}: failed to connect")
    assert not list(tmp_path.iterdir())


def test_the_console_script_exits_with_the_code(unused_url):
    out = subprocess.run(
        [sys.executable, "-m", "sd_triton.client.cli", "generate", "a cat", "--url", unused_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == cli.EXIT_UNAVAILABLE
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_the_admin_key_is_never_a_command_line_value(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["models", "--admin-key", "secret-0123456789"])
    assert info.value.code == cli.EXIT_INVALID
    assert "secret" not in capsys.readouterr().out


def test_an_unreadable_admin_key_file_is_one_line_and_exit_2(tmp_path, unused_url, capsys):
    code = cli.main(["models", "--url", unused_url, "--admin-key-file", str(tmp_path / "nope")])
    assert code == cli.EXIT_INVALID
    assert capsys.readouterr().err.startswith("sd-triton: error: cannot read the admin key file")

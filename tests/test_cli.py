"""The ``sd-triton`` command line without a server: arguments, and errors as one line with an exit code."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from sd_pipeline.controlnet import REQUEST_INPUTS as CONTROLNET_REQUEST_INPUTS
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
    # --control NAME:MAP gives controlnet and control_image; the image inputs are
    # img2img's and inpaint's --image, --mask and --strength.
    covered |= {"control_image"} if "controlnet" in dests else set()
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


def test_new_inputs_flags_give_the_contracts_values():
    argv = [
        "generate",
        "a castle",
        *("--clip-skip", "1", "--guidance-rescale", "0.7", "--prompt-syntax", "diffusers"),
        *("--prompt-2", "oil", "--negative-prompt-2", "blurry"),
        *("--original-size", "2048x1024", "--crops-coords-top-left", "64,32"),
        *("--target-size", "768x512", "--negative-original-size", "512x256"),
        *("--negative-crops-coords-top-left", "0,16", "--negative-target-size", "64x32"),
        *("--aesthetic-score", "7", "--negative-aesthetic-score", "2.5"),
        *("--refiner-switch-at", "0.8", "--enable-hr", "--hr-scale", "1.5"),
        *("--hr-upscaler", "lanczos", "--hr-denoising-strength", "0.5"),
        *("--hr-second-pass-steps", "12"),
    ]
    options = cli._request_options(cli.build_parser().parse_args(argv))
    assert options == {
        "negative_prompt": None,
        "num_inference_steps": None,
        "guidance_scale": None,
        "seed": None,
        "scheduler": None,
        "num_images_per_prompt": None,
        "guidance_rescale": 0.7,
        "clip_skip": 1,
        "prompt_syntax": "diffusers",
        "prompt_2": "oil",
        "negative_prompt_2": "blurry",
        "original_size": (1024, 2048),  # diffusers' (height, width) from WIDTHxHEIGHT
        "crops_coords_top_left": (64, 32),
        "target_size": (512, 768),
        "negative_original_size": (256, 512),
        "negative_crops_coords_top_left": (0, 16),
        "negative_target_size": (32, 64),
        "aesthetic_score": 7.0,
        "negative_aesthetic_score": 2.5,
        "refiner_switch_at": 0.8,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "lanczos",
        "hr_denoising_strength": 0.5,
        "hr_second_pass_steps": 12,
        **dict.fromkeys(CONTROLNET_REQUEST_INPUTS),
    }
    img2img = cli.build_parser().parse_args(
        ["img2img", "x", "--image", "in.png", "--clip-skip", "2"]
    )
    assert cli._request_options(img2img)["clip_skip"] == 2
    assert cli._request_options(img2img)["enable_hr"] is None  # the hires fix is txt2img's


@pytest.mark.parametrize(
    ("flag", "value", "sentence"),
    [
        ("--original-size", "1024", "expected WIDTHxHEIGHT, e.g. 512x768, got '1024'"),
        ("--negative-target-size", "1024x", "expected WIDTHxHEIGHT"),
        ("--crops-coords-top-left", "0x0", "expected TOP,LEFT in pixels, e.g. 0,256, got '0x0'"),
        ("--clip-skip", "two", "invalid int value: 'two'"),
        ("--refiner-switch-at", "most", "invalid float value: 'most'"),
    ],
)
def test_bad_flag_values_are_a_sentence_and_exit_2(flag, value, sentence, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "x", flag, value])
    assert info.value.code == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and sentence in err and "Traceback" not in err

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


@pytest.mark.parametrize(
    ("argv", "sentence"),
    [
        (["load"], "name one model to load, or give --all (not both)"),
        (["load", "unet", "--all"], "name one model to load, or give --all (not both)"),
        (["load", "--all", "--versions", "1"], "--versions pins one model's versions"),
        (["load", "unet", "--prefix", "xl_"], "--prefix chooses the models of --all"),
    ],
)
def test_load_needs_one_model_or_all(argv, sentence, unused_url, capsys):
    """Refused before any call: no server listens at ``unused_url``."""
    assert cli.main([*argv, "--url", unused_url]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith("sd-triton: error: ") and len(err.splitlines()) == 1
    assert sentence in err


def test_a_rollout_loads_components_first_and_pipelines_last():
    from sd_triton.client._core import load_waves

    names = [
        "xl_unet", "stable_diffusion_stream", "unet", "xl_stable_diffusion", "controlnet_canny",
        "stable_diffusion", "refiner_unet", "xl_refiner_unet", "text_encoder", "unet",
        "unet_controlled", "xlr_unet", "xl_text_encoder_2", "xl_controlnet_depth", "bls_probe",
    ]  # fmt: skip
    # The unprefixed export's models only: xl_unet is the xl_ export's, bls_probe nobody's.
    assert load_waves(names) == (
        ["controlnet_canny", "refiner_unet", "text_encoder", "unet", "unet_controlled"],
        ["stable_diffusion", "stable_diffusion_stream"],
    )
    assert load_waves(names, "xl_") == (
        ["xl_controlnet_depth", "xl_refiner_unet", "xl_text_encoder_2", "xl_unet"],
        ["xl_stable_diffusion"],
    )
    assert load_waves(names, "xl") == ([], [])  # xlr_unet is not the r_unet of an "xl" export
    assert load_waves(names, "sd3_") == ([], [])


class _Repository:
    """What ``load --all`` asks of a client: the index, and loads (one of which fails)."""

    def __init__(self, names, failing=None):
        self.names, self.failing, self.loaded = names, failing, []

    def list_models(self, timeout_s=None):
        from sd_triton.client._core import ModelStatus

        return [ModelStatus(n, "1", "UNAVAILABLE") for n in self.names]

    def load_model(self, name, timeout_s=None):
        from sd_triton.client import UnavailableError

        if name == self.failing:
            raise UnavailableError("load failed for model 'unet': no such file", status="x")
        self.loaded.append(name)


def test_a_component_that_fails_to_load_holds_the_pipelines_back(capsys):
    from sd_triton.client import UnavailableError

    names = ["stable_diffusion", "text_encoder", "unet", "stable_diffusion_stream"]
    repository = _Repository(names, failing="unet")
    with pytest.raises(UnavailableError) as info:
        cli._load_all(repository, "", None)
    assert str(info.value) == (
        "loading unet failed: load failed for model 'unet': no such file; the pipelines "
        "(stable_diffusion, stable_diffusion_stream) were not loaded"
    )
    assert repository.loaded == ["text_encoder"] and info.value.status == "x"
    assert capsys.readouterr().out == "loaded text_encoder\n"
    repository = _Repository(names)
    assert cli._load_all(repository, "", None) == cli.EXIT_OK
    assert repository.loaded[2:] == ["stable_diffusion", "stable_diffusion_stream"]
    assert capsys.readouterr().out.splitlines() == [
        "loaded text_encoder",
        "loaded unet",
        "loaded stable_diffusion",
        "loaded stable_diffusion_stream",
    ]


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

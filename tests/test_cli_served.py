"""``sd-triton`` and the examples of docs/client.md against a real tritonserver (tiny model)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from sd_triton.client import cli, read_infotext

pytestmark = pytest.mark.server

DOCS = Path(__file__).resolve().parent.parent / "docs" / "client.md"
PROMPT = "a photo of a cat, sitting"
ARGS = [
    *("--negative", "blurry: bad"),
    *("--steps", "3"),
    *("--guidance", "6"),
    *("--seed", "123"),
    *("--scheduler", "euler_a"),
    *("--size", "64x32"),
    *("--num-images", "2"),
]
EXPECTED_TEXT = (
    "a photo of a cat, sitting\n"
    "Negative prompt: blurry: bad\n"
    "Steps: 3, Sampler: Euler a, CFG scale: 6.0, Seed: 123, Size: 64x32, Model: stable_diffusion, "
    "Batch size: 2, Batch pos: {pos}"
)


@pytest.fixture(scope="module")
def reference(triton_url) -> np.ndarray:
    """The raw contract call for PROMPT and ARGS: images [2, 32, 64, 3]."""
    tensors = [
        ("prompt", "BYTES", np.array([PROMPT.encode()], dtype=object)),
        ("negative_prompt", "BYTES", np.array([b"blurry: bad"], dtype=object)),
        ("num_inference_steps", "INT32", np.array([3], np.int32)),
        ("guidance_scale", "FP32", np.array([6.0], np.float32)),
        ("seed", "INT64", np.array([123], np.int64)),
        ("scheduler", "BYTES", np.array([b"euler_a"], dtype=object)),
        ("width", "INT32", np.array([64], np.int32)),
        ("height", "INT32", np.array([32], np.int32)),
        ("num_images_per_prompt", "INT32", np.array([2], np.int32)),
    ]
    inputs = []
    for name, datatype, data in tensors:
        inputs.append(grpcclient.InferInput(name, [1], datatype))
        inputs[-1].set_data_from_numpy(data)
    with grpcclient.InferenceServerClient(triton_url) as client:
        return client.infer("stable_diffusion", inputs).as_numpy("images")


def has_stream_model(triton_url) -> bool:
    with grpcclient.InferenceServerClient(triton_url) as client:
        return client.is_model_ready("stable_diffusion_stream")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("progress", ["--no-progress", "--progress"])
def test_generate_writes_the_contract_images_with_their_parameters(
    triton_url, reference, tmp_path, capsys, progress
):
    # The exporter always writes the streaming model: a missing one is a failure.
    assert has_stream_model(triton_url)
    out = tmp_path / "out.png"
    code = cli.main(["generate", PROMPT, "-o", str(out), *ARGS, "--url", triton_url, progress])
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    paths = [out, tmp_path / "out-1.png"]
    assert captured.out.splitlines() == [str(p) for p in paths]
    assert sorted(tmp_path.iterdir()) == sorted(paths)
    for pos, path in enumerate(paths):
        assert np.array_equal(pixels(path), reference[pos])
        assert read_infotext(path) == EXPECTED_TEXT.format(pos=pos)
    if progress == "--progress":
        assert re.search(r"\] 3/3 steps", captured.err)


def test_a_bad_request_is_one_line_with_the_servers_message_and_exit_2(
    triton_url, tmp_path, capsys
):
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "-o", str(out), "--steps", "0", "--url", triton_url]
    assert cli.main([*argv, "--no-progress"]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err == "sd-triton: error: num_inference_steps must be at least 1, got 0\n"
    assert not out.exists()


def test_new_flags_reach_the_server_and_the_png(triton_url, tmp_path, capsys):
    # Seed 9: an image the tiny safety checker lets through.
    out, args = tmp_path / "skip.png", ["--steps", "3", "--seed", "9", "--size", "64x32"]
    argv = ["generate", PROMPT, "-o", str(out), *args, "--url", triton_url, "--no-progress"]
    assert cli.main([*argv, "--clip-skip", "1", "--guidance-rescale", "0.5"]) == cli.EXIT_OK
    tensors = [
        ("prompt", "BYTES", np.array([PROMPT.encode()], dtype=object)),
        ("num_inference_steps", "INT32", np.array([3], np.int32)),
        ("seed", "INT64", np.array([9], np.int64)),
        ("width", "INT32", np.array([64], np.int32)),
        ("height", "INT32", np.array([32], np.int32)),
        ("clip_skip", "INT32", np.array([1], np.int32)),
        ("guidance_rescale", "FP32", np.array([0.5], np.float32)),
    ]
    inputs = [grpcclient.InferInput(name, [1], datatype) for name, datatype, _ in tensors]
    for infer_input, (_, _, data) in zip(inputs, tensors, strict=True):
        infer_input.set_data_from_numpy(data)
    with grpcclient.InferenceServerClient(triton_url) as client:
        expected = client.infer("stable_diffusion", inputs)
    assert not expected.as_numpy("nsfw_content_detected")[0]  # not blacked out: a real image
    assert np.array_equal(pixels(out), expected.as_numpy("images")[0])
    assert read_infotext(out).endswith("Clip skip: 2, CFG Rescale: 0.5")


def test_an_sdxl_flag_on_an_sd1_model_is_the_servers_sentence_and_exit_2(
    triton_url, tmp_path, capsys
):
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "-o", str(out), "--url", triton_url, "--no-progress"]
    code = cli.main([*argv, "--prompt-2", "oil", "--original-size", "1024x1024"])
    assert code == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert (
        err == "sd-triton: error: prompt_2, original_size: SDXL inputs; this model is SD 1.x/2.x\n"
    )
    assert not out.exists()


def test_a_timeout_exits_4(triton_url, tmp_path, capsys):
    argv = ["generate", PROMPT, "-o", str(tmp_path / "o.png"), "--steps", "150"]
    code = cli.main([*argv, "--timeout", "0.5", "--url", triton_url, "--no-progress"])
    assert code == cli.EXIT_TIMEOUT
    assert capsys.readouterr().err == "sd-triton: error: Deadline Exceeded\n"


def test_health_and_models(triton_url, capsys):
    assert cli.main(["health", "--url", triton_url]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert f"server {triton_url}: live, ready" in out
    assert "model stable_diffusion: ready" in out
    assert cli.main(["health", "--url", triton_url, "--model", "nope"]) == cli.EXIT_UNAVAILABLE


@pytest.fixture
def locked_args(locked_server, tls_files) -> list[str]:
    """Address and TLS flags of the locked server (admin key required, gRPC over TLS)."""
    return ["--url", locked_server.grpc_url, "--ssl", "--root-certificates", str(tls_files["cert"])]


def test_admin_commands_read_the_key_from_a_file_or_the_environment(
    locked_server, locked_args, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("SD_TRITON_ADMIN_KEY", raising=False)
    monkeypatch.delenv("SD_TRITON_ADMIN_KEY_FILE", raising=False)
    assert cli.main(["models", *locked_args]) == cli.EXIT_PERMISSION
    err = capsys.readouterr().err
    assert err.startswith("sd-triton: error: ") and len(err.splitlines()) == 1
    assert "no admin key was given" in err and "'sd-triton-admin-key'" in err

    key_file = tmp_path / "admin.key"
    key_file.write_text(locked_server.admin_key + "\n")
    assert cli.main(["models", *locked_args, "--admin-key-file", str(key_file)]) == cli.EXIT_OK
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert ["text_encoder", "1", "READY"] in rows

    monkeypatch.setenv("SD_TRITON_ADMIN_KEY_FILE", str(key_file))
    assert cli.main(["unload", "text_encoder", *locked_args]) == cli.EXIT_OK
    assert cli.main(["load", "text_encoder", *locked_args]) == cli.EXIT_OK
    monkeypatch.delenv("SD_TRITON_ADMIN_KEY_FILE")
    monkeypatch.setenv("SD_TRITON_ADMIN_KEY", locked_server.admin_key)
    assert cli.main(["load", "text_encoder", "--versions", "1", *locked_args]) == cli.EXIT_OK
    assert capsys.readouterr().out == (
        "unloaded text_encoder\nloaded text_encoder\nloaded text_encoder versions [1]\n"
    )
    monkeypatch.setenv("SD_TRITON_ADMIN_KEY", "wrong-key-0123456789")
    assert cli.main(["unload", "text_encoder", *locked_args]) == cli.EXIT_PERMISSION
    assert "the admin key given was not accepted" in capsys.readouterr().err
    monkeypatch.setenv("SD_TRITON_ADMIN_KEY", locked_server.admin_key)
    assert cli.main(["load", "text_encoder", *locked_args]) == cli.EXIT_OK


def test_load_all_loads_the_components_then_the_pipelines(
    locked_server, locked_args, monkeypatch, capsys
):
    """A rollout in one command on the locked server, where the VAE encoder and the streaming
    model start unloaded: every model of the unprefixed export loaded, the pipelines last."""
    from sd_triton.client._core import load_waves

    monkeypatch.setenv("SD_TRITON_ADMIN_KEY", locked_server.admin_key)
    assert cli.main(["models", *locked_args]) == cli.EXIT_OK
    index = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    pipelines = ["stable_diffusion", "stable_diffusion_stream"]
    export = {*pipelines, "text_encoder", "unet", "vae_encoder", "vae_decoder", "safety_checker"}
    components, _ = load_waves(index)

    assert cli.main(["load", "--all", *locked_args]) == cli.EXIT_OK
    loaded = [line.removeprefix("loaded ") for line in capsys.readouterr().out.splitlines()]
    assert loaded[-2:] == pipelines and sorted(loaded[:-2]) == components
    assert export <= set(loaded)
    assert cli.main(["models", *locked_args]) == cli.EXIT_OK
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert {name for name, _, state, *_ in rows if state == "READY"} >= set(loaded)

    assert cli.main(["load", "--all", "--prefix", "nope_", *locked_args]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert "has no model of an export with --model-prefix 'nope_'" in err


# --------------------------------------------------------------------------- docs/client.md

# The docs talk to localhost:8001 and show a size for SD 1.x; the tiny model is smaller.
DOC_SUBSTITUTIONS = {"localhost:8001": None, "768x512": "64x32"}


def doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOCS.read_text(), flags=re.S)


def substitute(text: str, url: str) -> str:
    for old, new in DOC_SUBSTITUTIONS.items():
        text = text.replace(old, new or url)
    return text


@contextlib.contextmanager
def working_directory(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def test_docs_python_examples_run(triton_url, tmp_path, capsys):
    blocks = doc_blocks("python")
    assert len(blocks) >= 5
    namespace: dict = {}
    with working_directory(tmp_path):
        for block in blocks:
            exec(compile(substitute(block, triton_url), str(DOCS), "exec"), namespace)
    out = capsys.readouterr().out
    assert "cancelled\ncancelled too\n" in out
    assert "num_inference_steps must be at least 1, got 0\ntoo slow\n" in out
    assert read_infotext(tmp_path / "astronaut.png").startswith(
        "a photo of an astronaut riding a horse\nNegative prompt: blurry\nSteps: 10, Sampler: Euler a"
    )
    assert (tmp_path / "lighthouse.png").exists()
    # The image made again from its PNG's parameters is the same image.
    first, again = namespace["result"], namespace["again"]
    assert again.settings == first.settings
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))


def test_docs_command_line_examples_run(
    triton_url, locked_server, locked_args, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("SD_TRITON_ADMIN_KEY_FILE", raising=False)
    monkeypatch.setenv("SD_TRITON_ADMIN_KEY", locked_server.admin_key)
    commands = [
        line.removeprefix("$ sd-triton ")
        for block in doc_blocks("console")
        for line in block.splitlines()
        if line.startswith("$ sd-triton ")
    ]
    assert len(commands) >= 4
    with working_directory(tmp_path):
        for command in commands:
            argv = shlex.split(substitute(command, triton_url))
            if argv[0] in ("models", "load", "unload"):  # admin calls: the locked server
                argv += locked_args
            elif argv[0] in ("generate", "health"):
                argv += ["--url", triton_url]
            assert cli.main(argv) == cli.EXIT_OK, (command, capsys.readouterr().err)
    assert {p.name for p in tmp_path.iterdir()} == {
        "astronaut.png",
        "lighthouse.png",
        "lighthouse-1.png",
        "skip.png",
    }

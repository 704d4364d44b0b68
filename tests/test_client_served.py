"""The client library against a real tritonserver serving the tiny model (session fixtures in conftest).

The reference for every comparison is a raw ``tritonclient.grpc`` call built
by hand from the contract table, not by the library.
"""

from __future__ import annotations

import asyncio
import glob
import os
import socket
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from sd_triton.client import (
    A1111_SAMPLERS,
    AsyncClient,
    CancelledError,
    Client,
    DeadlineExceededError,
    GenerationResult,
    InvalidRequestError,
    PermissionDeniedError,
    ProgressEvent,
    UnavailableError,
    infotext_options,
    parse_infotext,
    read_infotext,
)

pytestmark = pytest.mark.server

PROMPT = "a photo of a cat"
# Few steps, two images, every option sent: the tiny model runs it in a few seconds.
REQUEST = dict(
    negative_prompt="blurry",
    num_inference_steps=3,
    guidance_scale=6.0,
    seed=123,
    scheduler="euler_a",
    num_images_per_prompt=2,
)
LONG = 150  # the exported model's max_steps: a request that runs long enough to cancel


# --------------------------------------------------------------------------- helpers


def raw_inputs(prompt: str, **options) -> list[grpcclient.InferInput]:
    """The contract's tensors, by hand."""
    types = {
        "negative_prompt": ("BYTES", object),
        "scheduler": ("BYTES", object),
        "num_inference_steps": ("INT32", np.int32),
        "num_images_per_prompt": ("INT32", np.int32),
        "height": ("INT32", np.int32),
        "width": ("INT32", np.int32),
        "guidance_scale": ("FP32", np.float32),
        "seed": ("INT64", np.int64),
        "clip_skip": ("INT32", np.int32),
        "guidance_rescale": ("FP32", np.float32),
    }
    inputs = []
    for name, value in {"prompt": prompt, **options}.items():
        datatype, dtype = types.get(name, ("BYTES", object))
        data = np.array([value.encode() if dtype is object else value], dtype=dtype)
        infer_input = grpcclient.InferInput(name, [1], datatype)
        infer_input.set_data_from_numpy(data)
        inputs.append(infer_input)
    return inputs


@pytest.fixture(scope="module")
def reference(grpc_client_module):
    """The raw contract call's outputs for PROMPT and REQUEST."""
    result = grpc_client_module.infer("stable_diffusion", raw_inputs(PROMPT, **REQUEST))
    return {name: result.as_numpy(name) for name in ("images", "nsfw_content_detected", "seeds")}


@pytest.fixture(scope="module")
def grpc_client_module(triton_url):
    with grpcclient.InferenceServerClient(triton_url) as client:
        yield client


@pytest.fixture(scope="module")
def client(triton_url):
    with Client(triton_url, timeout_s=300) as c:
        c.wait_until_ready(timeout_s=60)
        yield c


@pytest.fixture(scope="module")
def streaming(client):
    """The exporter always writes the streaming model: a missing one is a failure."""
    assert client.health().models[client.stream_model], f"{client.stream_model} is not ready"


@pytest.fixture
def unused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def assert_matches(result: GenerationResult, reference: dict) -> None:
    assert np.array_equal(np.stack([np.asarray(im) for im in result.images]), reference["images"])
    assert result.nsfw_content_detected == reference["nsfw_content_detected"].tolist()
    assert result.seeds == reference["seeds"].tolist()


def unet_requests(grpc_client) -> int:
    """Requests the UNet has executed so far: one per denoising step of any request."""
    stats = grpc_client.get_inference_statistics("unet").model_stats
    return sum(m.inference_stats.success.count + m.inference_stats.fail.count for m in stats)


def finished_requests(grpc_client, model: str) -> int:
    """Requests ``model`` has finished so far (answered, failed or cancelled)."""
    stats = grpc_client.get_inference_statistics(model).model_stats
    return sum(m.inference_stats.success.count + m.inference_stats.fail.count for m in stats)


def wait_until_finished(grpc_client, model: str, count: int, limit_s: float = 120.0) -> None:
    """Poll ``model``'s statistics until it has finished ``count`` requests.

    A request's UNet calls are blocking BLS calls, so once the pipeline request
    has finished, the UNet count holds every step it ran.
    """
    deadline = time.monotonic() + limit_s
    while finished_requests(grpc_client, model) < count:
        assert time.monotonic() < deadline, f"{model} never finished the request"
        time.sleep(0.05)


def wait_for_unet_requests(grpc_client, count: int, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while unet_requests(grpc_client) < count:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)


SHM = "/dev/shm/triton_python_backend_shm_region_*"


def shm_regions(pid: int) -> tuple[set[str], set[str]]:
    """(regions held open by process ``pid``, regions no process holds)."""
    held_by_all, held_by_pid = set(), set()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            links = {os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)}
        except OSError:
            continue
        held_by_all |= links
        if fd_dir == f"/proc/{pid}/fd":
            held_by_pid = links
    regions = set(glob.glob(SHM))
    return regions & held_by_pid, regions - held_by_all


@pytest.fixture
def no_shm_left_behind(triton_server):
    """The server holds the same /dev/shm regions after the test, and no new orphan appears."""
    held, orphans = shm_regions(triton_server.pid)
    assert held, "the server holds no Python-backend shared memory region?"
    yield
    held_after, orphans_after = shm_regions(triton_server.pid)
    assert held_after == held
    assert orphans_after <= orphans


# --------------------------------------------------------------------------- results


def test_generate_equals_the_raw_contract_call(client, reference):
    result = client.generate(PROMPT, **REQUEST)
    assert_matches(result, reference)
    assert (result.model_name, result.model_version) == ("stable_diffusion", "1")
    s = result.settings
    assert (s.prompt, s.negative_prompt, s.num_inference_steps, s.guidance_scale) == (
        PROMPT,
        "blurry",
        3,
        6.0,
    )
    assert (s.seed, s.scheduler, s.num_images_per_prompt) == (123, "euler_a", 2)
    assert (s.height, s.width) == reference["images"].shape[1:3]


def test_async_client_equals_the_sync_client(triton_url, reference):
    async def run():
        async with AsyncClient(triton_url, timeout_s=300) as client:
            await client.wait_until_ready(timeout_s=60)
            return await client.generate(PROMPT, **REQUEST)

    assert_matches(asyncio.run(run()), reference)


def test_async_image_methods_equal_the_sync_clients(client, triton_url):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    options = {"num_inference_steps": 2, "seed": 6, "scheduler": "euler_a"}
    calls = {
        "img2img": ((PROMPT, image), {"strength": 0.7}),
        "inpaint": ((PROMPT, image, mask), {}),
        "outpaint": ((PROMPT, image[:, :24]), {"left": 8, "right": 8, "overlap": 2}),
    }

    async def run_async():
        async with AsyncClient(triton_url, timeout_s=300) as aclient:
            return {
                name: await getattr(aclient, name)(*args, **kwargs, **options)
                for name, (args, kwargs) in calls.items()
            }

    results = asyncio.run(run_async())
    for name, (args, kwargs) in calls.items():
        expected = getattr(client, name)(*args, **kwargs, **options)
        got = results[name]
        assert got.settings == expected.settings, name
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(expected.images[0])), name
    assert results["outpaint"].images[0].size == (40, 32)
    assert results["img2img"].settings.strength == 0.7


def test_a_misspelled_model_is_not_retried(triton_url):
    with Client(triton_url, model="stable_difusion", retries=3, backoff_s=30.0) as typo:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="unknown model") as info:
            typo.generate(PROMPT, num_inference_steps=2, scheduler="ddim")
        assert info.value.status == "StatusCode.NOT_FOUND"
        assert time.monotonic() - t0 < 15, "NOT_FOUND was retried (each wait is 15-30 s)"


def test_settings_report_the_servers_defaults_and_reproduce_the_images(client, grpc_client_module):
    first = client.generate(PROMPT, num_inference_steps=2)
    s = first.settings
    assert s.seed == first.seeds[0]
    assert (s.height, s.width) == first.images[0].size[::-1]
    assert (s.guidance_scale, s.negative_prompt, s.num_images_per_prompt) == (7.5, None, 1)
    parameters = grpc_client_module.get_model_config("stable_diffusion").config.parameters
    published = (
        parameters["default_scheduler"].string_value if "default_scheduler" in parameters else ""
    )
    assert s.scheduler == (published or "default")
    again = client.generate(
        s.prompt,
        negative_prompt=s.negative_prompt,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        height=s.height,
        width=s.width,
        seed=s.seed,
        num_images_per_prompt=s.num_images_per_prompt,
    )
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))


def test_png_parameters_round_trip_and_reproduce_the_image(client, reference, tmp_path):
    result = client.generate(PROMPT, **REQUEST)
    paths = result.save(tmp_path / "cat.png")
    assert [p.name for p in paths] == ["cat.png", "cat-1.png"]
    fields = parse_infotext(read_infotext(paths[1]))
    width, height = (int(v) for v in fields["Size"].split("x"))
    sampler = {v: k for k, v in A1111_SAMPLERS.items()}[fields["Sampler"]]
    again = client.generate(
        fields["Prompt"],
        negative_prompt=fields["Negative prompt"],
        num_inference_steps=int(fields["Steps"]),
        guidance_scale=float(fields["CFG scale"]),
        seed=int(fields["Seed"]),
        scheduler=sampler,
        height=height,
        width=width,
        num_images_per_prompt=int(fields["Batch size"]),
    )
    assert_matches(again, reference)
    assert fields["Model"] == "stable_diffusion" and fields["Batch pos"] == "1"


def test_clip_skip_and_guidance_rescale_reach_the_server_and_round_trip_through_the_png(
    client, grpc_client_module, tmp_path
):
    # Seed 9: an image the tiny safety checker lets through, with and without.
    options = {k: v for k, v in REQUEST.items() if k != "num_images_per_prompt"} | {"seed": 9}
    new = dict(clip_skip=1, guidance_rescale=0.7)
    raw = grpc_client_module.infer("stable_diffusion", raw_inputs(PROMPT, **options, **new))
    plain = client.generate(PROMPT, **options)
    result = client.generate(PROMPT, **options, **new)
    assert np.array_equal(np.asarray(result.images[0]), raw.as_numpy("images")[0])
    assert result.nsfw_content_detected == plain.nsfw_content_detected == [False]
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))
    assert (result.settings.clip_skip, result.settings.guidance_rescale) == (1, 0.7)
    (path,) = result.save(tmp_path / "skip.png")
    assert "CFG scale: 6.0, Seed: 9" in read_infotext(path)
    assert "Clip skip: 2, CFG Rescale: 0.7" in read_infotext(path)  # the web UI's N is ours + 1
    again = client.generate(**infotext_options(parse_infotext(read_infotext(path))))
    assert again.settings == result.settings
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_prompt_syntax_and_the_hires_fix_reach_the_server_and_round_trip_through_the_png(
    client, tmp_path
):
    options = dict(num_inference_steps=2, seed=9, height=32, width=64, scheduler="euler")
    hires = dict(enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2)
    prompt = "a (photo:1.6) of a cat"
    result = client.generate(prompt, prompt_syntax="diffusers", **options, **hires)
    weighted = client.generate(prompt, **options, **hires)  # the model's syntax: a1111
    assert result.images[0].size == (128, 64)  # the second pass: hr_scale x the size sent
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(weighted.images[0]))
    s = result.settings
    assert (s.height, s.width, s.enable_hr, s.hr_upscaler) == (32, 64, True, "latent")
    (path,) = result.save(tmp_path / "hires.png")
    text = read_infotext(path)
    assert "Size: 64x32" in text and "Prompt syntax: diffusers" in text
    assert (
        "Hires upscale: 2.0, Hires steps: 2, Hires upscaler: Latent, Denoising strength: 0.7"
        in text
    )
    again = client.generate(**infotext_options(parse_infotext(text)))
    assert again.settings == result.settings
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


# --------------------------------------------------------------------------- streaming


def test_stream_yields_progress_in_order_then_the_unary_images(client, streaming, reference):
    events = list(client.stream(PROMPT, **REQUEST))
    *progress, result = events
    assert all(isinstance(e, ProgressEvent) for e in progress)
    total = progress[0].total_steps
    assert [e.step for e in progress] == list(range(1, total + 1))
    assert {e.total_steps for e in progress} == {total} and total >= REQUEST["num_inference_steps"]
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(progress, progress[1:], strict=False))
    assert all(e.previews is None for e in progress)
    assert isinstance(result, GenerationResult)
    assert_matches(result, reference)
    assert result.model_name == "stable_diffusion_stream"
    assert result.settings.model == "stable_diffusion"


def test_async_stream_with_previews_equals_the_unary_images(triton_url, streaming, reference):
    async def run():
        async with AsyncClient(triton_url, timeout_s=300) as client:
            return [e async for e in client.stream(PROMPT, preview=True, **REQUEST)]

    *progress, result = asyncio.run(run())
    assert progress and all(len(e.previews) == REQUEST["num_images_per_prompt"] for e in progress)
    assert all(p.mode == "RGB" for p in progress[0].previews)
    assert_matches(result, reference)


# --------------------------------------------------------------------------- cancellation


def test_cancelling_a_stream_stops_the_servers_loop(
    client, streaming, grpc_client_module, no_shm_left_behind
):
    before = unet_requests(grpc_client_module)
    done = finished_requests(grpc_client_module, client.stream_model)
    seen = []
    stream = client.stream(PROMPT, num_inference_steps=LONG, seed=1)
    with pytest.raises(CancelledError):
        for event in stream:
            seen.append(event)
            if len(seen) == 2:
                stream.cancel()
    assert [e.step for e in seen] == [1, 2]
    wait_until_finished(grpc_client_module, client.stream_model, done + 1)
    ran = unet_requests(grpc_client_module) - before
    assert 2 <= ran <= 10, f"the server ran {ran} of {LONG} steps after the cancel"
    assert client.generate(PROMPT, num_inference_steps=2, seed=1).images


def test_cancelling_an_async_call_stops_the_server(
    triton_url, client, grpc_client_module, no_shm_left_behind
):
    before = unet_requests(grpc_client_module)
    done = finished_requests(grpc_client_module, client.model)

    async def run():
        async with AsyncClient(triton_url) as aclient:
            pending = aclient.submit(PROMPT, num_inference_steps=LONG, seed=1)
            deadline = time.monotonic() + 120
            while unet_requests(grpc_client_module) < before + 2:
                assert time.monotonic() < deadline, "the request never started"
                await asyncio.sleep(0.05)
            pending.cancel()
            with pytest.raises(CancelledError):
                await pending

    asyncio.run(run())
    wait_until_finished(grpc_client_module, client.model, done + 1)
    ran = unet_requests(grpc_client_module) - before
    assert 2 <= ran <= 10, f"the server ran {ran} of {LONG} steps after the cancel"
    assert client.generate(PROMPT, num_inference_steps=2, seed=1).images


def test_cancelling_a_submitted_call_stops_the_server(
    client, grpc_client_module, no_shm_left_behind
):
    before = unet_requests(grpc_client_module)
    done = finished_requests(grpc_client_module, client.model)
    pending = client.submit(PROMPT, num_inference_steps=LONG, seed=1)
    wait_for_unet_requests(grpc_client_module, before + 2)
    pending.cancel()
    with pytest.raises(CancelledError, match="cancelled by the caller"):
        pending.result()
    wait_until_finished(grpc_client_module, client.model, done + 1)
    ran = unet_requests(grpc_client_module) - before
    assert 2 <= ran <= 10, f"the server ran {ran} of {LONG} steps after the cancel"
    assert client.generate(PROMPT, num_inference_steps=2, seed=1).images


def test_a_timeout_is_deadline_exceeded_and_stops_the_server(client, grpc_client_module):
    before = unet_requests(grpc_client_module)
    done = finished_requests(grpc_client_module, client.model)
    # 96 x 96: each step costs about twice a native one, so the 1 s deadline
    # lands early in the request even on a quiet machine (within max_work).
    with pytest.raises(DeadlineExceededError) as info:
        client.generate(PROMPT, num_inference_steps=LONG, height=96, width=96, timeout_s=1.0)
    assert isinstance(info.value, TimeoutError)
    wait_until_finished(grpc_client_module, client.model, done + 1)
    ran = unet_requests(grpc_client_module) - before
    assert ran < LONG // 2, f"the server ran {ran} of {LONG} steps after the deadline"
    assert client.generate(PROMPT, num_inference_steps=2, seed=1).images


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps must be at least 1, got 0"),
        ({"scheduler": "nope"}, "unknown scheduler 'nope'; known schedulers: default, ddim"),
        (
            {"prompt_2": "oil", "original_size": (64, 64)},
            "prompt_2, original_size: SDXL inputs; this model is SD 1.x/2.x",
        ),
    ],
)
@pytest.mark.parametrize("how", ["generate", "async", "stream", "async stream"])
def test_bad_input_is_an_invalid_request_with_the_servers_message(
    client, streaming, triton_url, how, options, message
):
    async def run_async():
        async with AsyncClient(triton_url) as aclient:
            if how == "async":
                return await aclient.generate(PROMPT, **options)
            return [e async for e in aclient.stream(PROMPT, **options)]

    with pytest.raises(InvalidRequestError) as info:
        if how == "generate":
            client.generate(PROMPT, **options)
        elif how == "stream":
            list(client.stream(PROMPT, **options))
        else:
            asyncio.run(run_async())
    assert str(info.value).startswith(message)


def test_no_server_is_unavailable(unused_url):
    with Client(unused_url) as down:
        assert not down.is_ready()
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="not ready after 0.5 s"):
            down.wait_until_ready(timeout_s=0.5)
        assert time.monotonic() - t0 < 10
        with pytest.raises(UnavailableError, match=unused_url):
            down.generate(PROMPT)
        with pytest.raises(UnavailableError):
            list(down.stream(PROMPT))

    async def run():
        async with AsyncClient(unused_url) as adown:
            with pytest.raises(UnavailableError):
                await adown.generate(PROMPT)
            with pytest.raises(UnavailableError):
                [e async for e in adown.stream(PROMPT)]

    asyncio.run(run())


def test_an_unknown_model_is_unavailable(triton_url):
    with (
        Client(triton_url, model="no_such_model") as c,
        pytest.raises(UnavailableError, match="unknown model"),
    ):
        c.generate(PROMPT)


def test_health(client):
    health = client.health()
    assert health.live and health.ready and health.models["stable_diffusion"]
    assert health.models["stable_diffusion_stream"]


# --------------------------------------------------------------------------- locked: admin key, TLS


@pytest.fixture
def locked(locked_server, tls_files) -> dict:
    """Client options for the locked server (TLS), for its one loaded model."""
    options = dict(ssl=True, root_certificates=tls_files["cert"], model="text_encoder")
    return {"url": locked_server.grpc_url, **options}


def test_tls_works_with_the_servers_certificate_and_plain_text_fails(locked):
    with Client(**locked) as c:
        assert c.health(timeout_s=30).models["text_encoder"]
    plain = {k: v for k, v in locked.items() if k not in ("ssl", "root_certificates")}
    with Client(**plain) as c, pytest.raises(UnavailableError):
        c.health(timeout_s=10)
    with pytest.raises(ValueError, match="need ssl=True"):
        Client(plain["url"], root_certificates="ca.pem")


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (None, "no admin key was given"),
        ("wrong-key-0123456789", "admin key given was not accepted"),
    ],
)
def test_admin_calls_without_the_right_key_are_refused_saying_why(locked, key, why):
    with Client(**locked, admin_key=key, retries=3, backoff_s=30.0) as c:
        calls = [
            c.list_models,
            lambda: c.unload_model("text_encoder"),
            lambda: c.load_model("unet"),
        ]
        for call in calls:
            with pytest.raises(PermissionDeniedError, match=why) as info:
                call()
            assert isinstance(info.value, PermissionError)
            assert "'sd-triton-admin-key'" in str(info.value)
        assert c.is_ready(), "a refused unload took the model away"

    async def run():
        async with AsyncClient(**locked, admin_key=key) as ac:
            with pytest.raises(PermissionDeniedError, match=why):
                await ac.list_models()

    asyncio.run(run())


def test_admin_calls_with_the_key_unload_load_and_pin_versions(locked, locked_server):
    with Client(**locked, admin_key=locked_server.admin_key) as c:
        states = {m.name: m.state for m in c.list_models()}
        assert states["text_encoder"] == "READY" and "stable_diffusion" in states
        c.unload_model("text_encoder")
        assert not c.is_ready()
        c.load_model("text_encoder")
        assert c.is_ready()
        c.load_model("text_encoder", versions=[1])  # a rollback: exactly version 1
        assert c.is_ready()
        # The pinned policy reaches the server: a version that does not exist is refused.
        with pytest.raises(InvalidRequestError, match="at least one version must be available"):
            c.load_model("text_encoder", versions=[7])
        assert c.is_ready()

    async def run():
        async with AsyncClient(**locked, admin_key=locked_server.admin_key) as ac:
            await ac.unload_model("text_encoder")
            unloaded = not await ac.is_ready()
            await ac.load_model("text_encoder")
            return unloaded and await ac.is_ready()

    assert asyncio.run(run())

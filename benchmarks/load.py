"""The two sides of the comparison: requests to the server, and diffusers in this process.

Served: a closed loop of ``c`` workers, each with its own gRPC client,
sending one request (one prompt, one image) after another until ``n``
requests are done. Latency is per request, measured around the call;
images/s is ``n`` over the wall time from the first send to the last reply.

In-process: the diffusers pipeline of the model's family
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) on the checkpoint
the repository was exported from, called sequentially. A diffusers pipeline is
not thread-safe (its scheduler holds per-call state), so one pipeline serves
one caller at a time: at every concurrency its throughput is the sequential
one, which is what a user of one in-process pipeline gets.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .perf_analyzer import PROMPTS


@dataclass(frozen=True)
class Request:
    """What every request of a benchmark setting asks for; prompts and seeds vary per request."""

    height: int
    width: int
    steps: int
    guidance_scale: float = 7.5
    prompts: Sequence[str] = PROMPTS
    scheduler: str | None = None  # an alias of sd_pipeline.schedulers; None: the model's own

    def prompt(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]


@dataclass
class Timing:
    """Latencies (s) of ``n`` images and the wall time (s) they took together."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def images(self) -> int:
        return len(self.latencies)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "wall_s": round(self.wall_s, 4),
            "images_per_s": round(self.images_per_s, 4),
            "p50_s": round(self.percentile(50), 4),
            "p95_s": round(self.percentile(95), 4),
            "latencies_s": [round(x, 4) for x in self.latencies],
        }


# ------------------------------------------------------------------ served
class Served:
    """Sends ``stable_diffusion`` requests over gRPC; one client per worker thread."""

    def __init__(
        self,
        url: str,
        request: Request,
        *,
        model: str = "stable_diffusion",
        timeout_s: float = 600.0,
    ):
        self.url, self.request, self.model, self.timeout_s = url, request, model, timeout_s

    def _inputs(self, prompt: str, seed: int):
        import tritonclient.grpc as grpcclient

        r = self.request
        values = {
            "prompt": np.array([prompt.encode()], dtype=np.object_),
            "height": np.array([r.height], np.int32),
            "width": np.array([r.width], np.int32),
            "num_inference_steps": np.array([r.steps], np.int32),
            "guidance_scale": np.array([r.guidance_scale], np.float32),
            "seed": np.array([seed], np.int64),
        }
        if r.scheduler:
            values["scheduler"] = np.array([r.scheduler.encode()], dtype=np.object_)
        dtypes = {np.object_: "BYTES", np.int32: "INT32", np.int64: "INT64", np.float32: "FP32"}
        inputs = []
        for name, value in values.items():
            tensor = grpcclient.InferInput(name, list(value.shape), dtypes[value.dtype.type])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return inputs

    def generate(self, client, i: int, seed: int) -> np.ndarray:
        """One image (uint8 HWC) for request ``i``."""
        result = client.infer(
            self.model, self._inputs(self.request.prompt(i), seed), client_timeout=self.timeout_s
        )
        return result.as_numpy("images")[0]

    def one(self, i: int = 0, seed: int = 0) -> np.ndarray:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        try:
            return self.generate(client, i, seed)
        finally:
            client.close()

    def run(
        self,
        concurrency: int,
        n: int,
        *,
        seed0: int = 0,
        on_image: Callable[[], None] = lambda: None,
    ) -> Timing:
        """``n`` requests from ``concurrency`` closed-loop workers; seeds ``seed0 + i``."""
        import tritonclient.grpc as grpcclient

        clients = [grpcclient.InferenceServerClient(self.url) for _ in range(concurrency)]
        lock = threading.Lock()
        next_i = iter(range(n))
        timing = Timing()
        errors: list[BaseException] = []

        def worker(client) -> None:
            while not errors:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    self.generate(client, i, seed0 + i)
                except BaseException as e:  # reported after join
                    errors.append(e)
                    return
                with lock:
                    timing.latencies.append(time.perf_counter() - t0)
                on_image()

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        timing.wall_s = time.perf_counter() - start
        for client in clients:
            client.close()
        if errors:
            raise errors[0]
        return timing


# -------------------------------------------------------------- in-process
# The diffusers text-to-image pipeline of each model family (pipeline.json's ``family``).
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def pipeline_class(family: str) -> str:
    """The diffusers pipeline the in-process baseline runs for a model ``family``."""
    try:
        return PIPELINES[family]
    except KeyError:
        raise ValueError(
            f"no text-to-image baseline for family {family!r} (the harness measures "
            f"text-to-image; families: {', '.join(PIPELINES)})"
        ) from None


class InProcess:
    """The diffusers pipeline of a model family (:data:`PIPELINES`) on a checkpoint folder, on
    CPU or CUDA."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        request: Request,
        *,
        family: str = "sd",
        device: str = "cpu",
        dtype: str = "float32",
    ):
        import diffusers
        import torch

        self.request = request
        self.device = device
        kwargs = {} if dtype == "float32" else {"torch_dtype": getattr(torch, dtype)}
        cls = getattr(diffusers, pipeline_class(family))
        self.pipe = cls.from_pretrained(str(checkpoint), **kwargs)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = self.pipe.scheduler.config

    def generate(self, i: int, seed: int) -> np.ndarray:
        """One image (uint8 HWC) for request ``i``, rounded as diffusers rounds its PIL images."""
        import torch

        r = self.request
        if r.scheduler:
            from sd_pipeline.schedulers import make_scheduler

            # Per request, as served: a scheduler that draws its own noise takes the seed.
            self.pipe.scheduler = make_scheduler(r.scheduler, self.scheduler_config, seed)
        out = self.pipe(
            r.prompt(i),
            height=r.height,
            width=r.width,
            num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
        if self.device != "cpu":
            torch.cuda.synchronize()
        return (np.asarray(out.images[0]) * 255).round().astype(np.uint8)

    def run(self, n: int, *, seed0: int = 0, on_image: Callable[[], None] = lambda: None) -> Timing:
        timing = Timing()
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            self.generate(i, seed0 + i)
            timing.latencies.append(time.perf_counter() - t0)
            on_image()
        timing.wall_s = time.perf_counter() - start
        return timing

"""The benchmark harness: served pipeline vs diffusers in-process, at several concurrencies.

One command measures, for each model setting, at concurrency 1, 2, 4, 8:
latency p50/p95 per image and images/s through the served
``stable_diffusion`` model; the same requests in-process with the diffusers
pipeline of the model's family (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``; ``family`` in the repository's ``pipeline.json``)
on the checkpoint the repository was exported from (the baseline); their
ratio (the serving overhead); how the
server batched UNet calls (its inference statistics); and the memory of the
server's process tree. Served and in-process runs alternate (ABBA over the
concurrency levels) so that drift on a shared machine hits both sides alike.
It writes ``<label>.md`` (table), ``<label>.png`` (plot) and
``raw/<label>.json`` under ``--output-dir``.

Settings (``make bench``): the tiny model from ``--repository``, then SD 1.5's
full architecture with random weights at a small size (built and exported
once, cached under ``build/bench/`` keyed on its options,
:mod:`.random_models`); on request (``--models full-size-xl``) SDXL base's
architecture the same way. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import flops, overhead, report, stats, system
from .load import InProcess, Request, Served, Timing, pipeline_class
from .random_models import FULL_SIZE_ARCH, full_size_build, xl_build, xl_name

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = (1, 2, 4, 8)
MODELS = ("repository", "overhead", "full-size", "full-size-xl")
DEFAULT_MODELS = ("repository", "overhead", "full-size")
XL_WIDTH_SCALES = (0.5, 1.0)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when inside it (reports travel)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Setting:
    """One model at one request shape, and how many images to measure per concurrency level."""

    name: str
    checkpoint: Path
    repository: Path
    request: Request
    requests_per_worker: int = 2  # served images per level = c x this, per round
    inprocess_images: int = 2  # in-process images per level, per round
    family: str = "sd"  # pipeline.json's: picks the in-process diffusers pipeline
    pipeline_model: str = "stable_diffusion"  # --model-prefix + stable_diffusion
    unet_model: str = "unet"  # pipeline.json's component_models["unet"]

    def describe(self) -> dict:
        r = self.request
        return {
            "name": self.name,
            "family": self.family,
            "pipeline_model": self.pipeline_model,
            "inprocess_pipeline": pipeline_class(self.family),
            "checkpoint": _shown(self.checkpoint),
            "repository": _shown(self.repository),
            "size": f"{r.width}x{r.height}",
            "steps": r.steps,
            "guidance_scale": r.guidance_scale,
            "requests_per_worker": self.requests_per_worker,
            "inprocess_images": self.inprocess_images,
        }


@dataclass
class Options:
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY
    rounds: int = 1
    threads: int = 0  # 0: every core this process may use
    device: str = "cpu"
    dtype: str = "float32"
    peak_tflops: float | None = None
    url: str | None = None  # a running server (else one is started per setting)
    server_pid: int | None = None  # its pid, for memory
    progress: bool = True
    server_log_dir: Path | None = None
    server_start_timeout_s: float = 900.0
    warmup: int | None = None  # concurrent warm-up requests (default: one per pipeline instance)


# ------------------------------------------------------------------ run
class Progress:
    """A tqdm bar over images (served and in-process); a no-op when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def expect(self, more: int) -> None:
        if self.bar is not None:
            self.bar.total += more
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def planned_images(setting: Setting, opts: Options) -> int:
    """Images the progress bar expects (the warm-up adds one per pipeline instance when it knows)."""
    per_round = sum(
        c * setting.requests_per_worker + setting.inprocess_images for c in opts.concurrency
    )
    return 2 + opts.rounds * per_round


@contextlib.contextmanager
def serve(setting: Setting, opts: Options) -> Iterator[tuple[str, int | None]]:
    """The gRPC url and pid of a server on the setting's repository (``opts.url``, or one started here)."""
    if opts.url:
        yield opts.url, opts.server_pid
        return
    from sd_triton.server import TritonServer

    log_file = (
        opts.server_log_dir / f"tritonserver-{setting.name}.log" if opts.server_log_dir else None
    )
    server = TritonServer(setting.repository, log_file=log_file)
    # Loading the full-size models (GBs of ONNX, one stub process per instance)
    # takes minutes on a busy 2-core machine.
    server.start(timeout_s=opts.server_start_timeout_s)
    try:
        yield server.grpc_url, server.pid
    finally:
        server.stop()


def pipeline_instances(client, model: str = "stable_diffusion") -> int:
    """How many instances of the pipeline model run side by side (its instance groups' counts)."""
    config = client.get_model_config(model, as_json=True)["config"]
    return sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1


def _merge(timings: Sequence[Timing]) -> Timing:
    return Timing([x for t in timings for x in t.latencies], sum(t.wall_s for t in timings))


def measure(setting: Setting, opts: Options, progress: Progress) -> dict:
    """Everything the report says about one setting."""
    import tritonclient.grpc as grpcclient

    with serve(setting, opts) as (url, pid):
        client = grpcclient.InferenceServerClient(url)
        progress.phase(f"{setting.name}: loading diffusers")
        sides = Sides(
            setting,
            opts,
            progress,
            client,
            pid,
            Served(url, setting.request, model=setting.pipeline_model),
            InProcess(
                setting.checkpoint,
                setting.request,
                family=setting.family,
                device=opts.device,
                dtype=opts.dtype,
            ),
        )
        server_memory = system.MemorySampler(pid) if pid else None
        own_memory = system.MemorySampler(os.getpid(), tree=False)
        with server_memory or contextlib.nullcontext(), own_memory:
            max_diff = sides.warm_up()
            levels = [sides.level(j, c) for j, c in enumerate(opts.concurrency)]
        server_version = client.get_server_metadata().version
        client.close()
    request = setting.request
    work = flops.count(
        setting.checkpoint,
        height=request.height,
        width=request.width,
        guidance=request.guidance_scale > 1,
    )
    result = {
        "setting": setting.describe(),
        "server_version": server_version,
        "max_pixel_diff_served_vs_inprocess": max_diff,
        "levels": levels,
        "work": {
            **asdict(work),
            "step_gflop": work.step_gflop,
            "image_gflop": work.image_gflop(request.steps),
        },
        "memory": {
            "server_peak_bytes": server_memory.peak_bytes if server_memory else None,
            "server_peak_breakdown": server_memory.peak_breakdown if server_memory else {},
            "harness_peak_bytes": own_memory.peak_bytes,
        },
    }
    result["unet_per_step"] = _unet_per_step(result, opts)
    return result


@dataclass
class Sides:
    """The two sides of one setting, ready to measure."""

    setting: Setting
    opts: Options
    progress: Progress
    client: Any  # tritonclient.grpc.InferenceServerClient, for statistics
    server_pid: int | None
    served: Served
    baseline: InProcess

    def warm_up(self) -> int:
        """Warm both sides up; return the max pixel difference of one image made both ways.

        Every pipeline instance's first request pays seconds for lazy imports
        and first-call allocations, so one request per instance is sent at
        once. The image check proves both sides run the same weights and settings.
        """
        self.progress.phase(f"{self.setting.name}: warm-up")
        n = self.opts.warmup
        if n is None:
            n = pipeline_instances(self.client, self.setting.pipeline_model)
        self.progress.expect(n)
        if n:
            self.served.run(n, n, seed0=10**6, on_image=self.progress.step)
        a = self.served.one(0, seed=0)
        self.progress.step()
        b = self.baseline.generate(0, seed=0)
        self.progress.step()
        return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())

    def level(self, j: int, c: int) -> dict:
        """Concurrency ``c``, the ``j``-th level: served and in-process runs, alternating ABBA."""
        timings: dict[str, list[Timing]] = {"served": [], "inprocess": []}
        cpu: dict[str, list[dict]] = {"served": [], "inprocess": []}
        server_stats: dict[str, stats.ModelStats] = {}
        for r in range(self.opts.rounds):
            seed0 = 1000 * (j + 1) + 100 * r
            order = ("served", "inprocess") if (j + r) % 2 == 0 else ("inprocess", "served")
            for side in order:
                self.progress.phase(f"{self.setting.name}: {side} c={c}")
                with system.CpuAccount(self.server_pid) as account:
                    if side == "served":
                        before = stats.snapshot(self.client)
                        n = c * self.setting.requests_per_worker
                        timing = self.served.run(c, n, seed0=seed0, on_image=self.progress.step)
                        model = self.setting.pipeline_model
                        after = stats.settled(self.client, before, model, n)
                        server_stats = stats.total(server_stats, stats.delta(after, before))
                    else:
                        n = self.setting.inprocess_images
                        timing = self.baseline.run(n, seed0=seed0, on_image=self.progress.step)
                timings[side].append(timing)
                cpu[side].append(account.result)
        level = _level(
            c,
            _merge(timings["served"]),
            _merge(timings["inprocess"]),
            server_stats,
            (self.setting.pipeline_model, self.setting.unet_model),
        )
        level["cpu"] = {side: system.sum_accounts(runs) for side, runs in cpu.items()}
        return level


def _level(
    c: int,
    served: Timing,
    inproc: Timing,
    server_stats: dict[str, stats.ModelStats],
    models: tuple[str, str] = ("stable_diffusion", "unet"),
) -> dict:
    """One level's numbers; ``models``: the pipeline and UNet model names."""
    pipeline, unet_model = models
    unet = server_stats.get(unet_model, stats.ModelStats())
    s_per_img = 1 / served.images_per_s if served.images_per_s else float("nan")
    i_per_img = 1 / inproc.images_per_s if inproc.images_per_s else float("nan")
    return {
        "concurrency": c,
        "served": served.to_dict(),
        "inprocess": inproc.to_dict(),
        # Serving overhead: seconds per image served over seconds per image in-process.
        "overhead": round(s_per_img / i_per_img, 4),
        "p50_ratio": round(served.percentile(50) / inproc.percentile(50), 4),
        "unet": {
            **unet.to_dict(),
            "executions_per_image": round(unet.execution_count / max(served.images, 1), 3),
        },
        "server_ms_per_image": stats.time_per_image(server_stats, served.images, pipeline),
        "server_stats": {k: v.to_dict() for k, v in server_stats.items()},
    }


def _unet_per_step(result: dict, opts: Options) -> dict:
    """UNet time per step at c=1 (server's compute_infer / executions) beside the FLOP floor."""
    first = next((lv for lv in result["levels"] if lv["concurrency"] == 1), result["levels"][0])
    ms = first["unet"]["compute_infer_ms_per_execution"]
    step_gflop = result["work"]["step_gflop"]
    peak = opts.peak_tflops or (flops.H100_TFLOPS if opts.device == "cuda" else None)
    return {
        "concurrency": first["concurrency"],
        "measured_ms": ms,
        "step_gflop": round(step_gflop, 3),
        "achieved_tflops": round(step_gflop / ms, 4) if ms else None,  # GFLOP / ms = TFLOP/s
        "peak_tflops": peak,
        "floor_ms": round(step_gflop / peak, 4) if peak else None,
    }


def run(settings: Sequence[Setting], opts: Options) -> dict:
    """Measure every setting; return the raw results with the machine, versions and options."""
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    progress = Progress(sum(planned_images(s, opts) for s in settings), opts.progress)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    try:
        results = [measure(s, opts, progress) for s in settings]
    finally:
        progress.close()
    import torch

    return {
        "started": started,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "machine": system.machine(),
        "versions": system.versions(results[0]["server_version"] if results else None),
        "options": {
            "concurrency": list(opts.concurrency),
            "rounds": opts.rounds,
            "torch_threads": torch.get_num_threads(),
            "server_omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "device": opts.device,
            "dtype": opts.dtype,
        },
        "settings": results,
    }


# ------------------------------------------------------------------- CLI
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = set(names) - set(MODELS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"models are {', '.join(MODELS)}; got {text!r}")
    return names


def _source_checkpoint(repository: Path, model: str) -> Path | None:
    from .perf_analyzer import pipeline_constants

    with contextlib.suppress(OSError, ValueError, KeyError):
        source = Path(pipeline_constants(repository, model)["source"])
        if (source / "model_index.json").exists():
            return source
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sd_triton.benchmarks.harness", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("build/model_repository"),
        help="exported model repository",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="diffusers folder it was exported from (default: pipeline.json's source, else build/tiny-sd)",
    )
    p.add_argument("--name", default="tiny", help="label of the --repository setting")
    p.add_argument(
        "--model-prefix",
        default="",
        help="the --repository setting's pipeline is <prefix>stable_diffusion (a repository "
        "exported with --model-prefix; the 'overhead' part needs no prefix)",
    )
    p.add_argument(
        "--size", type=int, help="height = width in px (default: the model's native size)"
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument(
        "--requests-per-worker", type=int, default=2, help="served images per level = c x this"
    )
    p.add_argument("--inprocess-images", type=int, default=4, help="in-process images per level")
    p.add_argument(
        "--models",
        type=_names,
        default=DEFAULT_MODELS,
        help="comma-separated: 'repository' (--repository, default the tiny model), 'overhead' "
        "(per-step overhead of --repository's pipeline with a null UNet, benchmarks/overhead.py), "
        "'full-size' (SD 1.5's architecture with random weights, built and cached under "
        "--build-dir) and/or 'full-size-xl' (SDXL base's, widths times --xl-width-scale; not in "
        f"the default {','.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--full-size-size", type=int, default=128)
    p.add_argument("--full-size-steps", type=int, default=2)
    p.add_argument("--full-size-requests-per-worker", type=int, default=1)
    p.add_argument("--full-size-inprocess-images", type=int, default=1)
    p.add_argument(
        "--xl-width-scale",
        type=float,
        choices=XL_WIDTH_SCALES,
        default=0.5,
        help="full-size-xl: SDXL's widths times this (1.0: the real architecture, ~14 GB of "
        "fp32 weights per copy; 0.5: a quarter of them, every depth kept)",
    )
    p.add_argument("--concurrency", type=_ints, default=DEFAULT_CONCURRENCY)
    p.add_argument(
        "--rounds", type=int, default=1, help="alternations of served and in-process per level"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in-process and OMP_NUM_THREADS for the server (default: all cores)",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="in-process baseline device"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="in-process dtype and full-size export dtype",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="device peak for the FLOP floor (default: 790 on cuda, none on cpu)",
    )
    p.add_argument(
        "--url", help="gRPC address of a running server (only the --repository setting is run)"
    )
    p.add_argument("--server-pid", type=int, help="pid of that server, for its memory")
    p.add_argument("--build-dir", type=Path, default=Path("build"))
    p.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--label", help="output file stem (default: cpu or gpu)")
    p.add_argument(
        "--warmup",
        type=int,
        help="requests sent at once before measuring (default: one per pipeline instance: "
        "an instance's first request pays seconds of lazy start-up)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    overhead.add_arguments(p)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> list[Setting]:
    """The settings ``--models`` asks for (building the full-size models on first use)."""
    if args.url and len(set(args.models) - {"overhead"}) > 1:
        raise SystemExit(
            "--url serves one repository: pass --models repository, full-size or full-size-xl"
        )
    settings = []
    if "repository" in args.models:
        model = f"{args.model_prefix}stable_diffusion"
        checkpoint = (
            args.checkpoint
            or _source_checkpoint(args.repository, model)
            or args.build_dir / "tiny-sd"
        )
        settings.append(
            _setting(
                args.name,
                checkpoint,
                args.repository,
                args.size,
                args.steps,
                args.guidance_scale,
                args.requests_per_worker,
                args.inprocess_images,
                model=model,
            )
        )
    full_size = {  # --models name: (setting name, build)
        "full-size": (FULL_SIZE_ARCH, lambda: full_size_build(args.build_dir, dtype=args.dtype)),
        "full-size-xl": (
            xl_name(args.xl_width_scale),
            lambda: xl_build(args.build_dir, args.xl_width_scale, dtype=args.dtype),
        ),
    }
    for model, (name, build) in full_size.items():
        if model not in args.models:
            continue
        checkpoint, repository = build()
        settings.append(
            _setting(
                name,
                checkpoint,
                repository,
                args.full_size_size,
                args.full_size_steps,
                args.guidance_scale,
                args.full_size_requests_per_worker,
                args.full_size_inprocess_images,
            )
        )
    return settings


def _setting(
    name: str,
    checkpoint: Path,
    repository: Path,
    size: int | None,
    steps: int,
    guidance_scale: float,
    requests_per_worker: int,
    inprocess_images: int,
    model: str = "stable_diffusion",
) -> Setting:
    """A setting on pipeline ``model`` of ``repository``: its family, native size and UNet
    model from its ``pipeline.json``."""
    from .perf_analyzer import pipeline_constants

    constants = pipeline_constants(repository, model)
    request = Request(
        size or constants["native_height"],
        size or constants["native_width"],
        steps,
        guidance_scale,
    )
    return Setting(
        name,
        checkpoint,
        repository,
        request,
        requests_per_worker,
        inprocess_images,
        family=constants["family"],
        pipeline_model=model,
        unet_model=constants["component_models"]["unet"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    from .perf_analyzer import pipeline_constants

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = args.threads or system.machine()["cores"]
    # The servers this harness starts inherit it (each stub's torch/OpenMP pool).
    os.environ["OMP_NUM_THREADS"] = str(threads)
    settings = settings_from_args(args)
    opts = Options(
        concurrency=args.concurrency,
        rounds=args.rounds,
        threads=threads,
        device=args.device,
        dtype=args.dtype,
        peak_tflops=args.peak_tflops,
        url=args.url,
        server_pid=args.server_pid,
        progress=args.progress,
        server_log_dir=args.build_dir / "bench" / "logs",
        warmup=args.warmup,
    )
    opts.server_log_dir.mkdir(parents=True, exist_ok=True)
    results = run(settings, opts)
    if "overhead" in args.models:
        constants = pipeline_constants(args.repository)
        request = Request(constants["native_height"], constants["native_width"], 0)
        request = replace(request, guidance_scale=args.guidance_scale)
        results["overhead"] = overhead.run(
            args.repository,
            args.build_dir / "bench" / "overhead",
            overhead.plan_from_args(args, request),
            log_dir=opts.server_log_dir,
            merge=args.merging,
        )
    label = args.label or ("gpu" if args.device == "cuda" else "cpu")
    paths = report.write(results, args.output_dir, label)
    print(report.markdown(results))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One command from proof: build, export, serve and measure SD 1.5's architecture on a GPU.

``make gpu-check`` (``python -m sd_triton.benchmarks.gpu_check``) on a bare
CUDA machine with no network (the wheels it needs: ``benchmarks/gpu_wheels.sh``,
docs/gpu.md):

1. builds SD 1.5's full architecture with random weights (``export.tiny.SD15``,
   seeded; random weights change the pixels, not the work);
2. exports it for the GPU: the torch host (``--host torch``: each component's
   diffusers module in fp16 with PyTorch's SDPA attention) on ``KIND_GPU``
   instances, or ``--host python`` (the ONNX files in onnxruntime; it needs
   ``onnxruntime-gpu``, whose CUDA provider it checks for first);
3. starts the pip-installed ``tritonserver`` (nvidia-pytriton's) on it;
4. checks that a served image equals diffusers' ``StableDiffusionPipeline``
   in this process on the same GPU, weights, precision, seed and settings
   (tolerances: :data:`TOLERANCES`);
5. measures s/image at 512×512 at 20 and 50 steps (c=1), images/s at
   concurrency 1 and 4 (with the UNet's samples per execution from the
   server's statistics), the GPU memory of the server's processes, and the
   UNet's ms per step beside the FLOP floor (:mod:`.flops`);
6. does 4 and 5 again (c=1 and concurrency, no second export) for the same
   pipeline with the UNet in its process (``inpipe_stable_diffusion``: config
   parameter ``unet_in_pipeline``, one instance; docs/gpu.md, "Per-step
   overhead"): the UNet's host on the GPU inside the pipeline's process, its
   steps merged there (``sd_unet_*`` metrics);
7. writes ``benchmarks/results/gpu-<gpu>.md`` (and ``raw/gpu-<gpu>.json``).

Designed to take under 8 minutes on an H100-class GPU: about 1 min to build
the weights, 1 min to export (no ONNX step with the torch host), 1-2 min to
start the server, 1-2 min of measurements.

``--dry``: the same steps on the CPU with the embedded tiny model, 64×64 and
a few steps, fp32 (the tests run it, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import flops, stats, system
from .load import InProcess, Request, Served

log = logging.getLogger(__name__)

PIPELINE = "stable_diffusion"
# The same pipeline with the UNet in its process (unet_in_pipeline), beside it.
IN_PIPELINE = "inpipe_stable_diffusion"


@dataclass(frozen=True)
class Tolerance:
    """How close a served image must be to diffusers' in-process one (uint8 levels)."""

    max_levels: int  # largest difference of any value
    within_one: float  # share of values at most 1 level apart
    why: str


# fp32: the project's contract (DESIGN.md), met on the CPU by every test.
# fp16: diffusers' fp16 pipeline keeps its latents in fp16 between steps and
# runs the scheduler on them; the served loop keeps latents, scheduler and
# guidance in fp32 and only the components compute in fp16. Every step
# therefore differs by fp16 rounding of the latents (~5e-4 relative),
# compounded over the steps: close, not bit-equal.
TOLERANCES = {
    "fp32": Tolerance(1, 1.0, "the project's contract: within one uint8 level"),
    "fp16": Tolerance(
        8,
        0.99,
        "diffusers' fp16 pipeline rounds its latents to fp16 after every step; the served "
        "loop keeps them in fp32 (only the components compute in fp16)",
    ),
}


@dataclass(frozen=True)
class Plan:
    """One gpu-check: the model, where and how it runs, what is measured."""

    name: str
    device: str  # cuda | cpu
    precision: str  # fp16 | fp32 (export and in-process baseline)
    host: str = "torch"
    size: int = 512
    steps: tuple[int, ...] = (20, 50)
    concurrency: tuple[int, ...] = (1, 4)
    images_per_step_count: int = 3  # c=1 images for each step count
    requests_per_worker: int = 3  # images per worker for each concurrency level
    inprocess_images: int = 2  # in-process images for each step count
    seeds: tuple[int, ...] = (0, 1, 2)  # images compared with diffusers'
    extra: dict = field(default_factory=dict)

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.precision]


FULL = Plan("sd15-random", "cuda", "fp16")
DRY = Plan(
    "tiny",
    "cpu",
    "fp32",
    size=64,
    steps=(2, 4),
    concurrency=(1, 2),
    images_per_step_count=1,
    requests_per_worker=1,
    inprocess_images=1,
)


# ------------------------------------------------------------ build
def build(plan: Plan, build_dir: Path, checkpoint: Path | None = None) -> tuple[Path, Path]:
    """The checkpoint (built unless given) and its export for ``plan``, under ``build_dir``."""
    from sd_triton.export import Contents, ExportOptions, Hosting, export_repository
    from sd_triton.export.tiny import SD15, TINY, build_pipeline, save_pipeline

    root = build_dir / "gpu-check" / plan.name
    if checkpoint is None:
        checkpoint = root / "checkpoint"
        if not (checkpoint / "model_index.json").is_file():
            t0 = time.perf_counter()
            arch = SD15 if plan.name == "sd15-random" else TINY
            save_pipeline(build_pipeline(arch, seed=0), checkpoint)
            log.info("built %s in %.0f s", plan.name, time.perf_counter() - t0)
    repository = root / "repository"
    options = ExportOptions(
        contents=Contents(precision=plan.precision, stream_model=False),
        hosting=Hosting(
            host=plan.host,
            gpu=plan.device == "cuda",
            pipeline_instances=max(plan.concurrency),
            # One thread per component on the CPU: the dry run shares its cores.
            intra_op_threads=1 if plan.device == "cpu" else None,
        ),
    )
    t0 = time.perf_counter()
    export_repository(checkpoint, repository, options, overwrite=True)
    add_in_pipeline_twin(repository, plan)
    log.info(
        "exported %s (%s, %s) in %.0f s",
        plan.name,
        plan.host,
        plan.precision,
        time.perf_counter() - t0,
    )
    return checkpoint, repository


def add_in_pipeline_twin(repository: Path, plan: Plan) -> None:
    """The exported pipeline again as :data:`IN_PIPELINE`, with the UNet in its process.

    A copy of the pipeline model's folder with config parameter ``unet_in_pipeline``
    and one instance running up to the highest concurrency's requests: it reads the
    ``unet`` model's folder beside it (no second export) and loads those weights once
    more, on the same GPU, in its own process.
    """
    from sd_triton.export import triton_config as T

    dest = repository / IN_PIPELINE
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(repository / PIPELINE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    config = T.read_config(dest)
    config.name = IN_PIPELINE
    config.parameters["unet_in_pipeline"].string_value = "1"
    config.parameters["max_concurrency"].string_value = str(max(plan.concurrency))
    config.instance_group[0].count = 1
    T.write_config(config, dest)


def check_host(plan: Plan) -> None:
    """Refuse early what cannot run: no CUDA, or onnxruntime without its CUDA provider."""
    if plan.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: torch sees no CUDA device (use --dry on a CPU machine)")
    if plan.host == "python":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise SystemExit(
                "gpu-check --host python needs onnxruntime-gpu (CUDAExecutionProvider); "
                "installed onnxruntime has " + ", ".join(onnxruntime.get_available_providers())
            )


# ------------------------------------------------------------ measure
def compare(served: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> dict:
    """How far served uint8 images are from the reference ones, and whether that is within tolerance.

    Passes only if some reference image is not flat: an image of one value (a
    NaN run, an image the safety checker blacked out) proves nothing.
    """
    served, reference = np.stack(served), np.stack(reference)
    diff = np.abs(served.astype(np.int16) - reference.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    within_one = float(np.mean(diff <= 1))
    varied = max(float(image.std()) for image in reference) > 1.0
    return {
        "max_levels": int(diff.max()),
        "mean_levels": round(float(diff.mean()), 4),
        "within_one_level": round(within_one, 6),
        "psnr_db": round(10 * np.log10(255**2 / mse), 2) if mse else float("inf"),
        "images": len(reference),
        "reference_std": [round(float(image.std()), 2) for image in reference],
        "tolerance": asdict(tolerance),
        "ok": varied
        and int(diff.max()) <= tolerance.max_levels
        and within_one >= tolerance.within_one,
    }


def gpu_memory(pids: Sequence[int]) -> dict | None:
    """GPU memory (MiB) of the given processes, from ``nvidia-smi``; None without it."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    used = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = int(parts[1])
    mine = {pid: used[pid] for pid in pids if pid in used}
    return {"total_mib": sum(mine.values()), "processes": len(mine), "per_pid_mib": mine}


def _request(plan: Plan, steps: int) -> Request:
    return Request(plan.size, plan.size, steps)


def served_numbers(plan: Plan, url: str, client, metrics_url: str) -> dict:
    """Warm-up, one image for the comparison, s/image per step count (and the per-step
    overhead over those runs), images/s per concurrency."""
    first = _request(plan, plan.steps[0])
    c_max = max(plan.concurrency)
    Served(url, first).run(c_max, c_max, seed0=10**6)  # every instance's first request
    out: dict = {"images": [Served(url, first).one(0, seed=seed) for seed in plan.seeds]}
    out["s_per_image"] = {}
    before, loop_before = stats.snapshot(client), stats.denoise_snapshot(metrics_url, PIPELINE)
    for steps in plan.steps:
        timing = Served(url, _request(plan, steps)).run(1, plan.images_per_step_count, seed0=100)
        out["s_per_image"][str(steps)] = round(timing.percentile(50), 4)
    n = plan.images_per_step_count * len(plan.steps)
    unet = stats.delta(stats.settled(client, before, PIPELINE, n), before).get("unet")
    loop = stats.ms_per_step(stats.denoise_snapshot(metrics_url, PIPELINE), loop_before)
    out["per_step"] = per_step(loop, unet or stats.ModelStats())
    out["levels"] = []
    for c in plan.concurrency:
        n = c * plan.requests_per_worker
        before = stats.snapshot(client)
        timing = Served(url, first).run(c, n, seed0=200)
        unet = stats.delta(stats.settled(client, before, PIPELINE, n), before).get(
            "unet", stats.ModelStats()
        )
        out["levels"].append(
            {
                "concurrency": c,
                "steps": plan.steps[0],
                "images_per_s": round(timing.images_per_s, 4),
                "p50_s": round(timing.percentile(50), 4),
                "unet": {
                    **unet.to_dict(),
                    "executions_per_image": round(unet.execution_count / n, 3),
                },
            }
        )
    return out


def per_step(loop_ms: float | None, unet: stats.ModelStats) -> dict:
    """#13's measure at c=1: the pipeline's ms per denoising step (its own clock, one UNet
    call each) less the UNet's compute per execution: what serving adds around the UNet."""
    compute = round(unet.ms_per_execution("compute_infer"), 4)
    return {
        "loop_ms": loop_ms,
        "unet_compute_ms": compute,
        "unet_queue_ms": round(unet.ms_per_execution("queue"), 4),
        "overhead_ms": None if loop_ms is None else round(loop_ms - compute, 4),
    }


def in_pipeline_numbers(plan: Plan, url: str, metrics_url: str, unet_compute_ms) -> dict:
    """:func:`served_numbers` for :data:`IN_PIPELINE`; its UNet counts from the ``sd_unet_*``
    metrics (Triton sees no UNet call), its per-step overhead against the UNet's compute per
    execution measured on the BLS pipeline (the same module on the same device)."""

    def served(steps: int) -> Served:
        return Served(url, _request(plan, steps), model=IN_PIPELINE)

    first, c_max = plan.steps[0], max(plan.concurrency)
    served(first).one(0, seed=10**6)  # diffusers' lazy imports, the first CUDA kernels
    served(first).run(c_max, c_max, seed0=10**6)
    out: dict = {"images": [served(first).one(0, seed=seed) for seed in plan.seeds]}
    out["s_per_image"] = {}
    loop_before = stats.denoise_snapshot(metrics_url, IN_PIPELINE)
    for steps in plan.steps:
        timing = served(steps).run(1, plan.images_per_step_count, seed0=100)
        out["s_per_image"][str(steps)] = round(timing.percentile(50), 4)
    loop = stats.ms_per_step(stats.denoise_snapshot(metrics_url, IN_PIPELINE), loop_before)
    out["per_step"] = {
        "loop_ms": loop,
        "unet_compute_ms": unet_compute_ms,
        "unet_queue_ms": 0.0,
        "overhead_ms": None if loop is None else round(loop - unet_compute_ms, 4),
    }
    out["levels"] = []
    for c in plan.concurrency:
        n = c * plan.requests_per_worker
        before = stats.unet_snapshot(metrics_url, IN_PIPELINE)
        timing = served(first).run(c, n, seed0=200)
        unet = stats.in_pipeline_unet(stats.unet_snapshot(metrics_url, IN_PIPELINE), before)
        out["levels"].append(
            {
                "concurrency": c,
                "steps": first,
                "images_per_s": round(timing.images_per_s, 4),
                "p50_s": round(timing.percentile(50), 4),
                "unet": {**unet, "executions_per_image": round(unet["execution_count"] / n, 3)},
            }
        )
    return out


def inprocess_numbers(plan: Plan, checkpoint: Path) -> dict:
    """diffusers in this process on the same device and precision: the reference image and s/image."""
    import torch

    dtype = "float16" if plan.precision == "fp16" else "float32"
    threads = torch.get_num_threads()
    if plan.device == "cpu":
        torch.set_num_threads(1)  # as each served component (the dry run's intra_op_threads)
    try:
        return _inprocess(plan, checkpoint, dtype)
    finally:
        torch.set_num_threads(threads)


def _inprocess(plan: Plan, checkpoint: Path, dtype: str) -> dict:
    pipe = InProcess(checkpoint, _request(plan, plan.steps[0]), device=plan.device, dtype=dtype)
    out: dict = {"images": [pipe.generate(0, seed=seed) for seed in plan.seeds]}
    out["s_per_image"] = {}
    for steps in plan.steps:
        pipe.request = _request(plan, steps)
        timing = pipe.run(plan.inprocess_images, seed0=100)
        out["s_per_image"][str(steps)] = round(timing.percentile(50), 4)
    del pipe
    return out


def unet_floor(plan: Plan, checkpoint: Path, levels: list[dict]) -> dict:
    """The UNet's measured ms per step (c=1: compute_infer / executions) beside the FLOP floor."""
    work = flops.count(checkpoint, height=plan.size, width=plan.size, guidance=True)
    ms = next(lv for lv in levels if lv["concurrency"] == 1)["unet"][
        "compute_infer_ms_per_execution"
    ]
    peak = flops.H100_TFLOPS if plan.device == "cuda" else None
    return {
        "step_gflop": round(work.step_gflop, 2),
        "measured_ms": ms,
        "achieved_tflops": round(work.step_gflop / ms, 2) if ms else None,
        "peak_tflops": peak,
        "floor_ms": round(work.step_gflop / peak, 3) if peak else None,
    }


def run(plan: Plan, build_dir: Path, checkpoint: Path | None = None) -> dict:
    """Everything the results file says, from a bare machine to numbers."""
    from sd_triton.server import TritonServer

    check_host(plan)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_start = time.perf_counter()
    checkpoint, repository = build(plan, build_dir, checkpoint)
    t_built = time.perf_counter()
    import tritonclient.grpc as grpcclient

    server = TritonServer(repository, log_file=build_dir / "gpu-check" / f"{plan.name}-server.log")
    server.start(timeout_s=900)
    t_served = time.perf_counter()
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        served = served_numbers(plan, server.grpc_url, client, server.metrics_url)
        compute = served["per_step"]["unet_compute_ms"]
        in_pipeline = in_pipeline_numbers(plan, server.grpc_url, server.metrics_url, compute)
        pids = [p["pid"] for p in system.process_memory(server.pid)]
        memory = {"gpu": gpu_memory(pids), "rss": system.process_memory(server.pid)}
        server_version = client.get_server_metadata().version
        client.close()
        inproc = inprocess_numbers(plan, checkpoint)
    finally:
        server.stop()
    return {
        "started": started,
        "plan": {k: v for k, v in asdict(plan).items() if k != "extra"},
        "machine": system.machine(),
        "versions": system.versions(server_version),
        "seconds": {
            "build_and_export": round(t_built - t_start, 1),
            "server_start": round(t_served - t_built, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
        "image_check": compare(served.pop("images"), inproc["images"], plan.tolerance),
        "served": served,
        "in_pipeline": {
            "image_check": compare(in_pipeline.pop("images"), inproc.pop("images"), plan.tolerance),
            **in_pipeline,
        },
        "inprocess": inproc,
        "memory": memory,
        "unet_per_step": unet_floor(plan, checkpoint, served["levels"]),
    }


# ------------------------------------------------------------ report
def markdown(result: dict) -> str:
    """The results file."""
    plan, check, served = result["plan"], result["image_check"], result["served"]
    m, v, floor = result["machine"], result["versions"], result["unet_per_step"]
    tol = check["tolerance"]
    steps = [str(s) for s in plan["steps"]]
    lines = [
        f"# gpu-check: {plan['name']} on {m.get('gpu') or m.get('cpu')}",
        "",
        f"Started {result['started']}; {m.get('cores')} cores; tritonserver "
        f"{v.get('tritonserver')}, torch {v.get('torch')}, diffusers {v.get('diffusers')}. "
        f"Host `{plan['host']}`, {plan['precision']}, {plan['size']}×{plan['size']}, "
        f"default scheduler, guidance 7.5. Seconds: build + export "
        f"{result['seconds']['build_and_export']}, server start "
        f"{result['seconds']['server_start']}, total {result['seconds']['total']}.",
        "",
        "## Served image vs diffusers in-process (same device, precision, weights, seed)",
        "",
        f"**{'PASS' if check['ok'] else 'FAIL'}** over {check['images']} seeds: max "
        f"{check['max_levels']} levels, "
        f"{check['within_one_level'] * 100:.3f} % of values within 1 level, mean "
        f"{check['mean_levels']}, PSNR {check['psnr_db']} dB (reference std "
        f"{check['reference_std']}). Tolerance: max {tol['max_levels']} levels and "
        f"≥ {tol['within_one'] * 100:g} % within 1 level, because {tol['why']}.",
        "",
        "## Time per image (c=1, p50)",
        "",
        "| steps | served s/image | in-process s/image | served / in-process |",
        "|---|---|---|---|",
    ]
    for s in steps:
        a, b = served["s_per_image"][s], result["inprocess"]["s_per_image"][s]
        lines.append(f"| {s} | {a} | {b} | {a / b:.3f} |")
    lines += [
        "",
        f"## Throughput ({steps[0]} steps)",
        "",
        "| c | images/s | p50 s | UNet samples/exec | UNet exec/image | UNet ms/exec | batch sizes |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in served["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['images_per_s']} | {lv['p50_s']} "
            + stats.unet_cells(lv["unet"])
        )
    gpu = result["memory"]["gpu"]
    rss = sum(p["rss"] for p in result["memory"]["rss"]) / 2**30
    lines += [
        "",
        "## UNet per step and memory",
        "",
        f"- UNet ms per step at c=1 (compute_infer / executions, 2 samples): "
        f"**{floor['measured_ms']}** for {floor['step_gflop']} GFLOP"
        + (
            f"; floor at {floor['peak_tflops']} TFLOP/s: {floor['floor_ms']} ms "
            f"({floor['achieved_tflops']} TFLOP/s achieved)"
            if floor["floor_ms"]
            else ""
        ),
        per_step_line(served["per_step"]),
        "- GPU memory of the server's processes: "
        + (
            f"{gpu['total_mib']} MiB over {gpu['processes']} processes"
            if gpu
            else "n/a (no nvidia-smi)"
        ),
        f"- host memory (RSS) of the server's processes: {rss:.2f} GiB",
    ]
    return "\n".join(lines + in_pipeline_lines(result, steps)) + "\n"


def in_pipeline_lines(result: dict, steps: list[str]) -> list[str]:
    """The results file's section on :data:`IN_PIPELINE`, beside the BLS pipeline's numbers."""
    ip, served = result["in_pipeline"], result["served"]
    check = ip["image_check"]
    lines = [
        "",
        f"## The UNet in the pipeline's process (`{IN_PIPELINE}`, `unet_in_pipeline`)",
        "",
        "The same export's pipeline with the UNet's host loaded into its own process (one "
        "instance, requests on threads, steps merged there; no BLS call per step). Its UNet "
        "counts come from the pipeline's `sd_unet_*` metrics.",
        "",
        f"**{'PASS' if check['ok'] else 'FAIL'}** against diffusers in-process over "
        f"{check['images']} seeds: max {check['max_levels']} levels, "
        f"{check['within_one_level'] * 100:.3f} % within 1 level, PSNR {check['psnr_db']} dB.",
        "",
        "| steps | BLS s/image | in pipeline s/image | in pipeline / BLS |",
        "|---|---|---|---|",
    ]
    for s in steps:
        a, b = served["s_per_image"][s], ip["s_per_image"][s]
        lines.append(f"| {s} | {a} | {b} | {b / a:.3f} |")
    lines += [
        "",
        "| c | BLS images/s | in pipeline images/s | in pipeline UNet samples/run | calls/run |",
        "|---|---|---|---|---|",
    ]
    for bls, lv in zip(served["levels"], ip["levels"], strict=True):
        u = lv["unet"]
        lines.append(
            f"| {lv['concurrency']} | {bls['images_per_s']} | {lv['images_per_s']} "
            f"| {u['samples_per_execution']} | {u['requests_per_execution']} |"
        )
    p = ip["per_step"]
    if p["loop_ms"] is not None:
        lines += [
            "",
            f"- served per step at c=1 (the pipeline's own clock over the s/image runs): "
            f"{p['loop_ms']} ms, less the UNet's compute per execution measured through the "
            f"BLS pipeline above ({p['unet_compute_ms']} ms; the same module on the same "
            f"device, so the difference carries both runs' noise): **{p['overhead_ms']} ms per "
            "step added by serving** (scheduler step, guidance, the merger; no BLS call)",
        ]
    return lines


def per_step_line(p: dict) -> str:
    if p["loop_ms"] is None:
        return "- served per step: n/a (the pipeline counted no step)"
    return (
        f"- served per step at c=1 (the pipeline's own clock over the s/image runs): "
        f"{p['loop_ms']} ms, of which the UNet's compute {p['unet_compute_ms']} ms per execution "
        f"(queue {p['unet_queue_ms']} ms): **{p['overhead_ms']} ms per step added by serving** "
        '(BLS round trip, scheduler step, guidance; docs/gpu.md, "Per-step overhead")'
    )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def write(result: dict, out_dir: Path, label: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "raw").mkdir(exist_ok=True)
    (out_dir / "raw" / f"{label}.json").write_text(json.dumps(result, indent=2) + "\n")
    path = out_dir / f"{label}.md"
    path.write_text(markdown(result))
    return path


# ------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sd_triton.benchmarks.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--dry",
        action="store_true",
        help="CPU rehearsal: the tiny model, 64x64, 2 and 4 steps, fp32",
    )
    p.add_argument("--build-dir", type=Path, default=Path("build"))
    p.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--checkpoint", type=Path, help="a diffusers folder instead of building one")
    p.add_argument("--host", choices=("torch", "python"), help="component host (default torch)")
    p.add_argument("--precision", choices=("fp16", "fp32"))
    p.add_argument("--label", help="results file stem (default gpu-<gpu name>, dry: cpu-dry)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = DRY if args.dry else FULL
    changes = {k: getattr(args, k) for k in ("host", "precision") if getattr(args, k)}
    plan = replace(plan, **changes)
    result = run(plan, args.build_dir, args.checkpoint)
    label = args.label or (
        "cpu-dry" if args.dry else f"gpu-{slug(result['machine'].get('gpu') or 'cuda')}"
    )
    path = write(result, args.output_dir, label)
    print(markdown(result))
    print(f"wrote {path}")
    ok = result["image_check"]["ok"] and result["in_pipeline"]["image_check"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

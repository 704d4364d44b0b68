"""Per-step overhead: the served loop around a null UNet, beside the same loop in-process.

A denoising step served by ``stable_diffusion`` costs the UNet's compute plus
everything around it: the BLS round trip, the UNet batcher's queue delay, the
scheduler step, the guidance arithmetic, the cancellation poll. To see the
second part alone, this mode serves the pipeline with a **null UNet**: a
Python-backend model with the UNet's config (inputs, dynamic batching) whose
``execute`` hands ``sample`` back as ``out_sample`` and computes nothing.
The same loop (``sd_pipeline.loop.generate``) runs in-process with the same
null UNet and the repository's other components in onnxruntime, so that

- served ms/step = what serving adds per step plus the loop's own work,
- in-process ms/step = the loop's own work (scheduler, guidance),

each measured two ways: by the loop's own clock (the served pipeline's
``sd_denoise_seconds_total`` / ``sd_denoise_steps_total`` metrics; in-process,
the same numbers from ``generate``'s result), which is the headline, and from
request latencies at two step counts: (median latency at ``hi`` steps - at
``lo`` steps) / (hi - lo), so the per-request costs (text encoder, VAE, safety
checker, gRPC) cancel out; on a busy machine that difference carries the noise
of every request, the loop's clock only that of the steps.

Variants share one server: for each UNet ``max_queue_delay_microseconds``
asked for, a pipeline model ``d<delay>_null_stable_diffusion`` calling its
own ``d<delay>_null_unet`` (the other components are shared). They run
alternately (ABBA over rounds), so load from elsewhere hits all alike. A
second server does the same with the real UNet at concurrency 4, to show from
the UNet's statistics (samples per execution) whether the dynamic batcher
still merges steps of concurrent requests at each delay.

Memory: the RSS and the unique set size (USS: what the process alone holds;
shared libraries are counted once, in whichever process maps them) of each
Python-backend stub, so that the cost of one more pipeline instance is read
directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import stats, system
from .load import Request, Served

log = logging.getLogger(__name__)

PIPELINE = "stable_diffusion"
SHARED = ("text_encoder", "vae_encoder", "vae_decoder", "safety_checker")

# The null UNet: the UNet's tensor contract, no work. Batched requests each get
# their own sample back, so the dynamic batcher behaves as with the real model.
NULL_UNET = '''"""Null UNet (benchmarks/overhead.py): out_sample = sample, nothing computed."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(
                        "out_sample",
                        pb_utils.get_input_tensor_by_name(r, "sample").as_numpy(),
                    )
                ]
            )
            for r in requests
        ]
'''

# The floor under the served step: one BLS call from a Python model to the null
# UNet with one step's tensors, built once, and nothing else of the pipeline's.
BLS_PROBE = '''"""BLS probe (benchmarks/overhead.py): what one bare BLS call to a UNet costs.

Sends one denoising step's UNet tensors (zeros, built once and reused) to the
model a request names, ``calls`` times, and answers each call's seconds: no
pipeline code, no tensor conversions, only ``InferenceRequest.exec``.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        inputs = json.loads(parameters["unet_inputs"]["string_value"])
        self.inputs = [pb_utils.Tensor(n, np.zeros(shape, dtype)) for n, dtype, shape in inputs]
        self.memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def execute(self, requests):
        return [self._probe(request) for request in requests]

    def _probe(self, request):
        calls = int(pb_utils.get_input_tensor_by_name(request, "calls").as_numpy()[0])
        target = pb_utils.get_input_tensor_by_name(request, "target").as_numpy()[0].decode()
        seconds = np.zeros(calls)
        for i in range(calls):
            t0 = time.perf_counter()
            answer = pb_utils.InferenceRequest(
                model_name=target,
                inputs=self.inputs,
                requested_output_names=["out_sample"],
                preferred_memory=self.memory,
            ).exec()
            seconds[i] = time.perf_counter() - t0
            if answer.has_error():
                return pb_utils.InferenceResponse(error=answer.error())
        return pb_utils.InferenceResponse([pb_utils.Tensor("seconds", seconds)])
'''
PROBE = "bls_probe"
# The null UNet without a dynamic batcher: what the batcher's hop costs a lone call.
UNBATCHED = "unbatched_null_unet"


@dataclass(frozen=True)
class Variant:
    """One pipeline model in the benchmark server: which UNet, at which queue delay."""

    delay_us: int
    null_unet: bool = True
    # The real UNet's onnxruntime threads spin while idle (onnx host allow_spinning 1)
    spinning: bool = False

    @property
    def prefix(self) -> str:
        spin = "spin_" if self.spinning else ""
        return f"d{self.delay_us}_{'null' if self.null_unet else 'real'}_{spin}"

    @property
    def pipeline(self) -> str:
        return f"{self.prefix}{PIPELINE}"

    @property
    def unet(self) -> str:
        return f"{self.prefix}unet"


# ------------------------------------------------------------ repository
def _copy_model(source: Path, dest: Path, name: str, edit) -> None:
    """Copy model folder ``source`` to ``dest`` as model ``name``; ``edit(config)`` changes its config.

    Large files (weights) are linked, not copied.
    """
    from sd_triton.export.triton_config import read_config, write_config

    def link_or_copy(src: str, dst: str) -> None:
        if os.path.getsize(src) > 1 << 20:
            os.symlink(os.path.abspath(src), dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(
        source, dest, copy_function=link_or_copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = read_config(dest / "config.pbtxt")
    config.name = name
    edit(config)
    write_config(config, dest)


def _unet_model(source: Path, dest: Path, variant: Variant) -> None:
    def edit(config) -> None:
        config.dynamic_batching.max_queue_delay_microseconds = variant.delay_us
        if variant.null_unet:
            config.backend, config.platform = "python", ""
            config.ClearField("instance_group")
        elif "allow_spinning" in config.parameters:  # the Python-backend ONNX host
            config.parameters["allow_spinning"].string_value = str(int(variant.spinning))

    _copy_model(source / "unet", dest / variant.unet, variant.unet, edit)
    if variant.null_unet:
        for version in (dest / variant.unet).iterdir():
            if version.is_dir():
                shutil.rmtree(version)
                version.mkdir()
                (version / "model.py").write_text(NULL_UNET)


def _pipeline_model(source: Path, dest: Path, variant: Variant, instances: int) -> None:
    def edit(config) -> None:
        del config.instance_group[:]
        group = config.instance_group.add()
        group.kind, group.count = group.KIND_CPU, instances

    _copy_model(source / PIPELINE, dest / variant.pipeline, variant.pipeline, edit)
    for assets in (dest / variant.pipeline).glob("*/assets"):
        pipeline_json = assets / "pipeline.json"
        constants = json.loads(pipeline_json.read_text())
        constants["component_models"] = {**constants["component_models"], "unet": variant.unet}
        pipeline_json.write_text(json.dumps(constants, indent=2) + "\n")


def variant_repository(
    source: Path, dest: Path, variants: Sequence[Variant], *, instances: int
) -> Path:
    """A repository at ``dest`` serving each variant beside the shared components of ``source``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in SHARED:
        if (source / name).is_dir():
            _copy_model(source / name, dest / name, name, lambda config: None)
    for variant in variants:
        _unet_model(source, dest, variant)
        _pipeline_model(source, dest, variant, instances)
    return dest


def add_bls_probe(source: Path, dest: Path, request: Request, batch: int) -> list[str]:
    """Add :data:`BLS_PROBE` to the variant repository ``dest``, sending the UNet inputs of a
    ``request``-sized step of ``batch`` samples, and :data:`UNBATCHED`; the probe's targets."""
    from tritonclient.grpc import model_config_pb2 as pb

    from sd_triton.export.triton_config import read_config, write_config

    from .perf_analyzer import pipeline_constants, unet_shapes

    nulls = sorted(p.name for p in dest.glob("d*_null_unet"))
    if not nulls:
        return []
    shapes = unet_shapes(
        read_config(source / "unet"),
        pipeline_constants(source),
        height=request.height,
        width=request.width,
    )
    inputs = [[name, str(dtype), [batch, *shape]] for name, (dtype, shape) in shapes.items()]
    config = pb.ModelConfig(name=PROBE, backend="python", max_batch_size=0)
    config.input.add(name="calls", data_type=pb.TYPE_INT32, dims=[1])
    config.input.add(name="target", data_type=pb.TYPE_STRING, dims=[1])
    config.output.add(name="seconds", data_type=pb.TYPE_FP64, dims=[-1])
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=1)
    config.parameters["unet_inputs"].string_value = json.dumps(inputs)
    (dest / PROBE / "1").mkdir(parents=True)
    (dest / PROBE / "1" / "model.py").write_text(BLS_PROBE)
    write_config(config, dest / PROBE)
    _copy_model(
        dest / nulls[0], dest / UNBATCHED, UNBATCHED, lambda c: c.ClearField("dynamic_batching")
    )
    return [*nulls, UNBATCHED]


def bls_calls(client, target: str, calls: int) -> np.ndarray:
    """Seconds of each of ``calls`` bare BLS calls from the probe to ``target``."""
    import tritonclient.grpc as grpcclient

    inputs = [
        grpcclient.InferInput("calls", [1], "INT32"),
        grpcclient.InferInput("target", [1], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(np.array([calls], np.int32))
    inputs[1].set_data_from_numpy(np.array([target.encode()], dtype=object))
    return client.infer(PROBE, inputs).as_numpy("seconds")


# ------------------------------------------------------------ in-process
class NullUnetComponents:
    """The repository's components in onnxruntime, with a UNet that hands ``sample`` back."""

    def __init__(self, repository: Path):
        from sd_pipeline.components import OnnxComponents

        self._inner = OnnxComponents(repository)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def unet(self, sample, timestep, encoder_hidden_states, added=None, *, residuals=None):
        return sample


class InProcessLoop:
    """``sd_pipeline.loop.generate`` in this process, on :class:`NullUnetComponents`."""

    def __init__(self, repository: Path, request: Request):
        from sd_pipeline.config import Assets

        self.assets = Assets.load(repository / PIPELINE / "1" / "assets")
        self.components = NullUnetComponents(repository)
        self.request = request

    steps = 0  # denoising steps run and the seconds they took, by the loop's clock
    seconds = 0.0

    def latency(self, steps: int, i: int) -> float:
        from sd_pipeline.loop import generate
        from sd_pipeline.request import make_request

        r = self.request
        request = make_request(
            self.assets.config,
            r.prompt(i),
            height=r.height,
            width=r.width,
            num_inference_steps=steps,
            guidance_scale=r.guidance_scale,
            seed=i,
            scheduler=r.scheduler,
        )
        t0 = time.perf_counter()
        result = generate(request, self.components, self.assets)
        latency = time.perf_counter() - t0
        self.steps += result.steps
        self.seconds += result.denoise_s
        return latency


# ------------------------------------------------------------ measuring
@dataclass(frozen=True)
class Plan:
    """What one overhead run sends."""

    request: Request  # size, guidance, scheduler (steps: set per run)
    delays_us: Sequence[int] = (2000, 0)
    concurrency: Sequence[int] = (1, 4)
    steps: tuple[int, int] = (2, 22)  # (lo, hi): per step = difference / (hi - lo)
    requests_per_worker: int = 4  # per level, step count and round
    rounds: int = 2
    merge_steps: int = 10  # real-UNet run: steps per request
    merge_requests_per_worker: int = 2
    # real-UNet run: also the UNet with onnxruntime's spinning threads (at the last delay)
    merge_spinning: bool = True
    probe_calls: int = 200  # bare BLS calls per target and round (0: no probe)

    def merge_variants(self) -> list[Variant]:
        variants = [Variant(d, null_unet=False) for d in self.delays_us]
        if self.merge_spinning:
            variants.append(Variant(self.delays_us[-1], null_unet=False, spinning=True))
        return variants


def paired(concurrency: int, pairs: int, steps: tuple[int, int], one) -> dict:
    """ms per step from ``pairs`` back-to-back (lo, hi) requests per worker, ``concurrency`` workers.

    ``one(worker, steps, i)`` runs request ``i`` with ``steps`` steps and
    returns its latency (s). Each worker alternates the order within a pair
    (lo then hi, hi then lo), so drift on a shared machine falls on both
    sides of every difference; the result is the median over pairs of
    (hi - lo) / (hi - lo steps). ``ms_per_step_floor`` is the same from the
    fastest request of each step count: on a machine shared with other work,
    the least disturbed estimate.
    """
    lo, hi = steps
    diffs: list[float] = []
    p50: dict[int, list[float]] = {lo: [], hi: []}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for k in range(pairs):
                order = (lo, hi) if k % 2 == 0 else (hi, lo)
                t = {s: one(w, s, w * 1000 + 2 * k + j) for j, s in enumerate(order)}
                with lock:
                    diffs.append((t[hi] - t[lo]) / (hi - lo) * 1e3)
                    for s in steps:
                        p50[s].append(t[s])
        except BaseException as e:  # reported after join
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {
        "ms_per_step": round(statistics.median(diffs), 3),
        "ms_per_step_floor": round((min(p50[hi]) - min(p50[lo])) / (hi - lo) * 1e3, 3),
        "ms_per_step_iqr": [round(float(q), 3) for q in np.percentile(diffs, (25, 75))],
        "pairs": len(diffs),
        "p50_s": {str(s): round(statistics.median(x), 4) for s, x in p50.items()},
    }


def _served_paired(server, client, plan: Plan, variant: Variant, c: int) -> dict:
    """One level of :func:`paired` against ``variant``, with the UNet's statistics and the
    pipeline's own ms per step (its metrics) over it."""
    import tritonclient.grpc as grpcclient

    url = server.grpc_url
    served = {
        s: Served(url, replace(plan.request, steps=s), model=variant.pipeline) for s in plan.steps
    }
    clients = [grpcclient.InferenceServerClient(url) for _ in range(c)]

    def one(w: int, steps: int, i: int) -> float:
        t0 = time.perf_counter()
        served[steps].generate(clients[w], i, seed=i)
        return time.perf_counter() - t0

    before = stats.snapshot(client)
    loop_before = stats.denoise_snapshot(server.metrics_url, variant.pipeline)
    try:
        row = paired(c, plan.requests_per_worker, plan.steps, one)
    finally:
        for x in clients:
            x.close()
    n = 2 * c * plan.requests_per_worker
    after = stats.settled(client, before, variant.pipeline, n)
    loop_after = stats.denoise_snapshot(server.metrics_url, variant.pipeline)
    row["unet"] = stats.delta(after, before).get(variant.unet, stats.ModelStats())
    row["loop"] = [b - a for a, b in zip(loop_before, loop_after, strict=True)]
    return row


def _start(repository: Path, log_dir: Path | None, name: str, timeout_s: float):
    from sd_triton.server import TritonServer

    log_file = log_dir / f"tritonserver-{name}.log" if log_dir else None
    server = TritonServer(repository, log_file=log_file)
    server.start(timeout_s=timeout_s)
    return server


def _warm(url: str, plan: Plan, variants: Sequence[Variant]) -> None:
    """One request per pipeline instance at once: an instance's first request pays its start-up."""
    c = max(plan.concurrency)
    for variant in variants:
        request = replace(plan.request, steps=plan.steps[0])
        Served(url, request, model=variant.pipeline).run(c, c)


def _merge_rows(rows: list[dict]) -> dict:
    """Rounds of one (variant, concurrency) as one row: all pairs' medians, statistics summed."""
    unet = stats.ModelStats()
    for row in rows:
        unet = unet + row["unet"]
    steps, seconds = (sum(r["loop"][k] for r in rows) for k in (0, 1))
    best = sorted(rows, key=lambda r: r["ms_per_step"])[len(rows) // 2]
    return {
        **best,
        "rounds": [r["ms_per_step"] for r in rows],
        "unet": unet.to_dict(),
        "loop": {"steps": steps, "seconds": round(seconds, 6)},
        "loop_ms_per_step": stats.ms_per_step((steps, seconds), (0, 0)),
        "loop_rounds": [stats.ms_per_step(r["loop"], (0, 0)) for r in rows],
    }


def served_overhead(
    repository: Path,
    plan: Plan,
    log_dir: Path | None,
    timeout_s: float,
    probe_targets: Sequence[str] = (),
) -> dict:
    """Per-step time of each delay variant with the null UNet, at each concurrency; memory;
    the seconds of bare BLS calls to each of ``probe_targets`` (:data:`BLS_PROBE`), per round
    beside the levels."""
    import tritonclient.grpc as grpcclient

    variants = [Variant(d) for d in plan.delays_us]
    levels: dict[tuple[int, int], list[dict]] = {}
    probes: dict[str, list[np.ndarray]] = {t: [] for t in probe_targets}
    server = _start(repository, log_dir, "overhead", timeout_s)
    try:
        url = server.grpc_url
        client = grpcclient.InferenceServerClient(url)
        _warm(url, plan, variants)
        for target in probes:
            bls_calls(client, target, 20)
        with system.CpuAccount(server.pid) as account:
            for r in range(plan.rounds):
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    for c in plan.concurrency:
                        row = _served_paired(server, client, plan, variant, c)
                        levels.setdefault((variant.delay_us, c), []).append(row)
                for target in probes if r % 2 == 0 else list(probes)[::-1]:
                    probes[target].append(bls_calls(client, target, plan.probe_calls))
        memory = system.process_memory(server.pid)
        client.close()
    finally:
        server.stop()
    rows = [
        {"delay_us": d, "concurrency": c, **_merge_rows(runs)} for (d, c), runs in levels.items()
    ]
    bls = {t: _call_ms(np.concatenate(runs)) for t, runs in probes.items() if runs}
    return {"rows": rows, "cpu": account.result, "memory": memory, "bls": bls}


def _call_ms(seconds: np.ndarray) -> dict:
    ms = seconds * 1e3
    p10, p50, p90 = (round(float(x), 3) for x in np.percentile(ms, (10, 50, 90)))
    return {
        "calls": len(ms),
        "mean": round(float(ms.mean()), 3),
        "p10": p10,
        "p50": p50,
        "p90": p90,
    }


def inprocess_overhead(repository: Path, plan: Plan) -> dict:
    """Per-step time of the same loop with the null UNet in this process (one caller)."""
    loop = InProcessLoop(repository, plan.request)
    loop.latency(plan.steps[0], 0)  # first call: lazy imports, sessions
    loop.steps, loop.seconds = 0, 0.0
    with system.CpuAccount(None) as account:
        row = paired(
            1,
            plan.requests_per_worker * plan.rounds,
            plan.steps,
            lambda w, s, i: loop.latency(s, i),
        )
    loop_ms = stats.ms_per_step((loop.steps, loop.seconds), (0, 0))
    return {**row, "loop_ms_per_step": loop_ms, "cpu": account.result}


def merging(repository: Path, plan: Plan, log_dir: Path | None, timeout_s: float) -> dict:
    """The real UNet at each delay and concurrency: does the batcher still merge steps?"""
    import tritonclient.grpc as grpcclient

    variants = plan.merge_variants()
    rows = []
    server = _start(repository, log_dir, "merging", timeout_s)
    try:
        url = server.grpc_url
        client = grpcclient.InferenceServerClient(url)
        _warm(url, plan, variants)
        request = replace(plan.request, steps=plan.merge_steps)
        with system.CpuAccount(server.pid) as account:
            for variant in variants:
                for c in plan.concurrency:
                    n = c * plan.merge_requests_per_worker
                    t0 = time.perf_counter()
                    before = stats.snapshot(client)
                    loop_before = stats.denoise_snapshot(server.metrics_url, variant.pipeline)
                    timing = Served(url, request, model=variant.pipeline).run(c, n)
                    delta = stats.delta(stats.settled(client, before, variant.pipeline, n), before)
                    loop_after = stats.denoise_snapshot(server.metrics_url, variant.pipeline)
                    lat = timing.latencies
                    wall = time.perf_counter() - t0
                    u = delta.get(variant.unet, stats.ModelStats())
                    per_step = statistics.median(lat) / plan.merge_steps * 1e3
                    rows.append(
                        {
                            "delay_us": variant.delay_us,
                            "spinning": variant.spinning,
                            "concurrency": c,
                            "images_per_s": round(n / wall, 4),
                            "p50_s": round(statistics.median(lat), 4),
                            "ms_per_step": round(per_step, 3),
                            "loop_ms_per_step": stats.ms_per_step(loop_after, loop_before),
                            "unet": {
                                **u.to_dict(),
                                "executions_per_image": round(u.execution_count / n, 3),
                            },
                        }
                    )
        client.close()
    finally:
        server.stop()
    return {"rows": rows, "steps": plan.merge_steps, "cpu": account.result}


def run(
    source: Path,
    work: Path,
    plan: Plan,
    *,
    log_dir: Path | None = None,
    timeout_s: float = 600.0,
    merge: bool = True,
) -> dict:
    """The whole overhead mode on the exported repository ``source``; scratch repositories under ``work``."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load = [os.getloadavg()]
    c = max(plan.concurrency)
    null_repo = variant_repository(
        source, work / "null-unet", [Variant(d) for d in plan.delays_us], instances=c
    )
    guided = plan.request.guidance_scale > 1
    targets = add_bls_probe(source, null_repo, plan.request, 2 if guided else 1)
    result = {
        "started": started,
        "plan": {
            "size": f"{plan.request.width}x{plan.request.height}",
            "guidance_scale": plan.request.guidance_scale,
            "scheduler": plan.request.scheduler,
            "steps": list(plan.steps),
            "requests_per_worker": plan.requests_per_worker,
            "rounds": plan.rounds,
            "pipeline_instances": c,
        },
        "served": served_overhead(
            null_repo, plan, log_dir, timeout_s, targets if plan.probe_calls else ()
        ),
        "inprocess": inprocess_overhead(source, plan),
    }
    load.append(os.getloadavg())
    if merge:
        real_repo = variant_repository(
            source, work / "real-unet", plan.merge_variants(), instances=c
        )
        result["merging"] = merging(real_repo, plan, log_dir, timeout_s)
        load.append(os.getloadavg())
    result["load_average"] = load
    result["machine"] = system.machine()
    return result


# ------------------------------------------------------------ report
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def memory_lines(memory: list[dict]) -> list[str]:
    """One row per process kind: count, RSS and USS per process (MiB)."""
    kinds: dict[str, list[dict]] = {}
    for proc in memory:
        kinds.setdefault(proc["label"], []).append(proc)
    lines = [
        "| process | count | RSS per process MiB | USS per process MiB |",
        "|---|---|---|---|",
    ]
    for label, procs in sorted(kinds.items()):
        rss = statistics.median(p["rss"] for p in procs)
        uss = statistics.median(p["uss"] for p in procs)
        lines.append(f"| {label} | {len(procs)} | {_mib(rss)} | {_mib(uss)} |")
    return lines


def markdown(result: dict) -> str:
    """The overhead section of a benchmark report."""
    plan, served, inproc = result["plan"], result["served"], result["inprocess"]
    lo, hi = plan["steps"]
    load = ", ".join("/".join(f"{x:.2f}" for x in la) for la in result["load_average"])
    lines = [
        "## Per-step overhead (null UNet)",
        "",
        f"{plan['size']}, guidance {plan['guidance_scale']}, scheduler "
        f"{plan['scheduler'] or 'default'}. **Loop's clock**: the denoising loop's seconds "
        "over its steps (served: the pipeline's `sd_denoise_seconds_total` / "
        "`sd_denoise_steps_total` over the level; in-process: the same from `generate`), per "
        "round in brackets. Request pairs: median over back-to-back pairs of "
        f"(t at {hi} steps - t at {lo} steps) / {hi - lo}, IQR over pairs; floor: the same "
        f"from the fastest request of each step count; {plan['requests_per_worker']} pairs per "
        f"worker and round, "
        f"{plan['rounds']} rounds (ABBA); {plan['pipeline_instances']} pipeline instances per "
        f"variant. Started {result['started']}; load average (1/5/15 min) at start, after the "
        f"overhead runs{', after the merging runs' if 'merging' in result else ''}: {load}; "
        f"others' load during the served runs {served['cpu'].get('others_cores', 0)} cores, "
        f"during the in-process runs {inproc['cpu'].get('others_cores', 0)} cores.",
        "",
        "| UNet queue delay µs | c | served ms/step, loop's clock (rounds) | in-process, "
        "loop's clock | served ms/step, request pairs (IQR) | per round | floor | in-process, "
        "request pairs (floor) | UNet samples/exec | UNet queue ms/call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = inproc["ms_per_step"]
    for row in served["rows"]:
        u = row["unet"]
        q1, q3 = row["ms_per_step_iqr"]
        rounds = " ".join(f"{x:.2f}" for x in row["rounds"])
        loop_rounds = " ".join(_ms(x) for x in row["loop_rounds"])
        lines.append(
            f"| {row['delay_us']} | {row['concurrency']} | **{_ms(row['loop_ms_per_step'])}** "
            f"({loop_rounds}) | {_ms(inproc['loop_ms_per_step'])} "
            f"| {row['ms_per_step']:.2f} ({q1:.2f}–{q3:.2f}) | {rounds} "
            f"| {row['ms_per_step_floor']:.2f} | {base:.2f} ({inproc['ms_per_step_floor']:.2f}) "
            f"| {u['samples_per_execution']} | {u['queue_ms_per_request']} |"
        )
    lines += bls_lines(served.get("bls", {}), served["rows"], inproc)
    lines += ["", "Memory of the server's processes (null-UNet server):", ""]
    lines += memory_lines(served["memory"])
    if "merging" in result:
        m = result["merging"]
        lines += [
            "",
            f"### Merging under load (real UNet, {m['steps']} steps; others' load "
            f"{m['cpu'].get('others_cores', 0)} cores)",
            "",
            "ms/step: p50 latency / steps; loop's clock: the pipeline's own per-step time. "
            "Spinning: the UNet's onnxruntime threads spin while idle (onnxruntime's default; "
            "the export writes `allow_spinning: 0`).",
            "",
            "| UNet queue delay µs | spinning | c | images/s | p50 s | ms/step | loop's clock "
            "ms/step | UNet samples/exec | UNet exec/image | UNet ms/exec | batch sizes |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in m["rows"]:
            spin = "yes" if row.get("spinning") else "no"
            lines.append(
                f"| {row['delay_us']} | {spin} | {row['concurrency']} | {row['images_per_s']} "
                f"| {row['p50_s']} | {row['ms_per_step']} | {_ms(row.get('loop_ms_per_step'))} "
                + stats.unet_cells(row["unet"])
            )
    return "\n".join(lines) + "\n"


def bls_lines(bls: dict, rows: list[dict], inproc: dict) -> list[str]:
    """The bare BLS calls' table, and what they leave of each c=1 level's served step."""
    if not bls:
        return []
    lines = [
        "",
        "One bare BLS call (the floor under a served step): a Python model sends one step's "
        "UNet tensors, built once, to the null UNet and times `exec()`; no pipeline code. "
        f"`{UNBATCHED}`: the same null UNet without a dynamic batcher.",
        "",
        "| to | calls | mean ms | p10 | p50 | p90 |",
        "|---|---|---|---|---|---|",
    ]
    for target, ms in bls.items():
        lines.append(
            f"| {target} | {ms['calls']} | **{ms['mean']:.3f}** | {ms['p10']:.3f} "
            f"| {ms['p50']:.3f} | {ms['p90']:.3f} |"
        )
    for row in rows:
        call = bls.get(Variant(row["delay_us"]).unet)
        if row["concurrency"] != 1 or call is None or row["loop_ms_per_step"] is None:
            continue
        served = row["loop_ms_per_step"]
        lines += [
            "",
            f"At c=1, delay {row['delay_us']} µs: {served:.3f} ms per served step = "
            f"{call['mean']:.3f} ms of bare BLS call (mean) + {served - call['mean']:.3f} ms "
            "of the loop's own work, its tensor conversions and what a step pays for the "
            f"pipeline's process around the call (the loop in-process: "
            f"{_ms(inproc['loop_ms_per_step'])} ms).",
        ]
    return lines


# ------------------------------------------------------------ CLI
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The overhead mode's options (shared with the harness's command line)."""
    p.add_argument("--overhead-concurrency", type=_ints, default=(1, 4))
    p.add_argument(
        "--overhead-delays",
        type=_ints,
        default=(2000, 0),
        help="UNet max_queue_delay_microseconds values to compare",
    )
    p.add_argument(
        "--overhead-steps",
        type=_ints,
        default=(2, 22),
        help="the two step counts whose difference gives the per-step time",
    )
    p.add_argument("--overhead-requests-per-worker", type=int, default=4)
    p.add_argument("--overhead-rounds", type=int, default=2)
    p.add_argument("--overhead-scheduler", default="euler")
    p.add_argument(
        "--overhead-probe-calls",
        type=int,
        default=200,
        help="bare BLS calls to each null UNet per round (the floor under a step; 0: none)",
    )
    p.add_argument(
        "--no-merging",
        dest="merging",
        action="store_false",
        help="skip the real-UNet run that shows merging under load",
    )
    p.add_argument(
        "--no-spinning-variant",
        dest="merge_spinning",
        action="store_false",
        help="in the real-UNet run, skip the UNet whose onnxruntime threads spin",
    )


def plan_from_args(args: argparse.Namespace, request: Request) -> Plan:
    lo, hi = args.overhead_steps
    return Plan(
        request=replace(request, scheduler=args.overhead_scheduler or None),
        delays_us=args.overhead_delays,
        concurrency=tuple(args.overhead_concurrency),
        steps=(lo, hi),
        requests_per_worker=args.overhead_requests_per_worker,
        rounds=args.overhead_rounds,
        merge_spinning=args.merge_spinning,
        probe_calls=args.overhead_probe_calls,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from .perf_analyzer import pipeline_constants

    p = argparse.ArgumentParser(
        prog="python -m sd_triton.benchmarks.overhead", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repository", type=Path, default=Path("build/model_repository"))
    p.add_argument("--build-dir", type=Path, default=Path("build"))
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument(
        "--output", type=Path, help="also write the section here (.md; raw JSON in raw/ beside it)"
    )
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    constants = pipeline_constants(args.repository)
    request = Request(constants["native_height"], constants["native_width"], 0, args.guidance_scale)
    work = args.build_dir / "bench" / "overhead"
    result = run(
        args.repository, work, plan_from_args(args, request), log_dir=work, merge=args.merging
    )
    text = markdown(result)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        raw = args.output.parent / "raw" / f"{args.output.stem}.json"
        raw.parent.mkdir(exist_ok=True)
        raw.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

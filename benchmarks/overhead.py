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
own ``d<delay>_null_unet`` by BLS (the other components are shared), and
``inpipe_null_stable_diffusion``, one instance with the config parameter
``unet_in_pipeline: 1``, which loads ``inpipe_null_unet``'s host into its own
process and makes no BLS call per step (its steps of concurrent requests merge
in-process; the ``sd_unet_*`` metrics count its runs, calls and samples). The
null UNet is a component host (``component_host.ComponentHost``, as the
exported UNet's ``model.py``), so served and in the pipeline it runs the same
code: read, concatenate, ``run`` returns ``sample``. The variants run
alternately (ABBA over rounds), so load from elsewhere hits all alike. A
second server does the same with the real UNet at concurrency 4, to show from
the UNet's statistics (samples per execution; for the UNet in the pipeline,
its metrics) whether steps of concurrent requests are still merged.

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

# The null UNet: the UNet's tensor contract, no work. A component host as the
# exported UNet's model.py is (component_host.ComponentHost, ARRAYS numpy), so that
# Triton serves it (requests read, batched by shape, split back) and a pipeline with
# unet_in_pipeline loads it into its own process, running the same code either way.
NULL_UNET = '''"""Null UNet (benchmarks/overhead.py): out_sample = sample, nothing computed.

A component host as the exported UNet's ``model.py``: Triton serves it (the
dynamic batcher's requests concatenated and split back as with the real
model), and a pipeline with ``unet_in_pipeline`` runs it in its own process.
"""

import numpy as np
import triton_python_backend_utils as pb_utils
from component_host import ComponentHost


class TritonPythonModel(ComponentHost):
    ARRAYS = "numpy"

    def cuda_available(self):
        return False

    def load(self, args):
        pass

    def read(self, tensor, pb_tensor):
        return pb_tensor.as_numpy()

    def concat(self, arrays):
        return np.concatenate(arrays)

    def run(self, inputs):
        return {"out_sample": inputs["sample"]}

    def output(self, tensor, x):
        return pb_utils.Tensor(tensor.name, np.ascontiguousarray(x))
'''
HOST_LIBRARY = "component_host.py"  # what the null UNet's model.py imports, beside it

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
    """One pipeline model in the benchmark server: which UNet, at which queue delay, and
    whether the pipeline calls it (BLS) or runs its host in its own process."""

    delay_us: int
    null_unet: bool = True
    # The real UNet's onnxruntime threads spin while idle (onnx host allow_spinning 1)
    spinning: bool = False
    # The pipeline runs the UNet's host in its process (config parameter unet_in_pipeline)
    in_pipeline: bool = False

    @property
    def prefix(self) -> str:
        spin = "spin_" if self.spinning else ""
        where = "inpipe" if self.in_pipeline else f"d{self.delay_us}"
        return f"{where}_{'null' if self.null_unet else 'real'}_{spin}"

    @property
    def pipeline(self) -> str:
        return f"{self.prefix}{PIPELINE}"

    @property
    def unet(self) -> str:
        return f"{self.prefix}unet"


def _label(row: dict) -> str:
    return "in pipeline" if row.get("in_pipeline") else f"BLS, delay {row['delay_us']} µs"


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
            del config.instance_group[:]
            group = config.instance_group.add()
            group.kind, group.count = group.KIND_CPU, 1
        elif "allow_spinning" in config.parameters:  # the Python-backend ONNX host
            config.parameters["allow_spinning"].string_value = str(int(variant.spinning))

    _copy_model(source / "unet", dest / variant.unet, variant.unet, edit)
    if variant.null_unet:
        # component_host.py: the UNet's own copy (a Python-hosted export), else the
        # pipeline's (every export has one beside the pipeline's model.py)
        hosts = [*(source / "unet").glob(f"*/{HOST_LIBRARY}")]
        hosts += (source / PIPELINE).glob(f"*/{HOST_LIBRARY}")
        if not hosts:
            raise FileNotFoundError(
                f"no {HOST_LIBRARY} under {source} (an export's pipeline has one)"
            )
        for version in (dest / variant.unet).iterdir():
            if version.is_dir():
                shutil.rmtree(version)
                version.mkdir()
                (version / "model.py").write_text(NULL_UNET)
                shutil.copy2(hosts[0], version / HOST_LIBRARY)


def _pipeline_model(source: Path, dest: Path, variant: Variant, instances: int) -> None:
    """The pipeline of ``variant``: ``instances`` instances calling its UNet by BLS, or, with
    the UNet in the pipeline, one instance running up to ``instances`` requests on threads
    (``max_concurrency``) whose steps merge in-process."""
    from google.protobuf import json_format

    from sd_triton.export.triton_config import read_config

    def edit(config) -> None:
        del config.instance_group[:]
        group = config.instance_group.add()
        group.kind, group.count = group.KIND_CPU, 1 if variant.in_pipeline else instances
        if variant.in_pipeline:
            config.parameters["unet_in_pipeline"].string_value = "1"
            config.parameters["max_concurrency"].string_value = str(instances)

    _copy_model(source / PIPELINE, dest / variant.pipeline, variant.pipeline, edit)
    if variant.in_pipeline:
        code = "\n".join(p.read_text() for p in (dest / variant.pipeline).glob("*/model.py"))
        if "unet_in_pipeline" not in code:
            raise ValueError(
                f"{source / PIPELINE}: this export's pipeline cannot run the UNet in its process "
                "(no unet_in_pipeline in its model.py): export it again with this version"
            )
    # The UNet's config as the pipeline's in-process host is given it (the exporter's form)
    unet_config = json_format.MessageToDict(
        read_config(dest / variant.unet), preserving_proto_field_name=True
    )
    for assets in (dest / variant.pipeline).glob("*/assets"):
        pipeline_json = assets / "pipeline.json"
        constants = json.loads(pipeline_json.read_text())
        constants["component_models"] = {**constants["component_models"], "unet": variant.unet}
        constants["unet_config"] = unet_config
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
    merge_requests_per_worker: int = 2  # per level and round
    merge_rounds: int = 2  # real-UNet run: rounds, variants alternating ABBA
    # real-UNet run: also the UNet with onnxruntime's spinning threads (at the last delay)
    merge_spinning: bool = True
    probe_calls: int = 200  # bare BLS calls per target and round (0: no probe)
    # also the pipeline that runs the UNet's host in its own process (unet_in_pipeline)
    in_pipeline: bool = True

    def null_variants(self) -> list[Variant]:
        variants = [Variant(d) for d in self.delays_us]
        if self.in_pipeline:
            variants.append(Variant(0, in_pipeline=True))
        return variants

    def merge_variants(self) -> list[Variant]:
        variants = [Variant(d, null_unet=False) for d in self.delays_us]
        if self.merge_spinning:
            variants.append(Variant(self.delays_us[-1], null_unet=False, spinning=True))
        if self.in_pipeline:
            variants.append(Variant(0, null_unet=False, in_pipeline=True))
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
    """One level of :func:`paired` against ``variant``, with the UNet's statistics (Triton's,
    or for the UNet in the pipeline its ``sd_unet_*`` metrics) and the pipeline's own ms per
    step (its metrics) over it."""
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
    unet_before = stats.unet_snapshot(server.metrics_url, variant.pipeline)
    try:
        row = paired(c, plan.requests_per_worker, plan.steps, one)
    finally:
        for x in clients:
            x.close()
    n = 2 * c * plan.requests_per_worker
    after = _settled(client, before, variant, n)
    loop_after = stats.denoise_snapshot(server.metrics_url, variant.pipeline)
    unet_after = stats.unet_snapshot(server.metrics_url, variant.pipeline)
    row["unet"] = stats.delta(after, before).get(variant.unet, stats.ModelStats())
    row["loop"] = [b - a for a, b in zip(loop_before, loop_after, strict=True)]
    row["unet_in_pipeline"] = [b - a for a, b in zip(unet_before, unet_after, strict=True)]
    return row


def _settled(client, before: dict, variant: Variant, requests: int) -> dict:
    """Triton's statistics once ``variant``'s ``requests`` are in them. The pipeline with the
    UNet in its process answers from its own threads, and writes its metrics (the numbers
    read for it) before each answer: a plain snapshot."""
    if variant.in_pipeline:
        return stats.snapshot(client)
    return stats.settled(client, before, variant.pipeline, requests)


def _checked(server, what: str, run, *args):
    """``run(*args)``; if it fails because the server died, say so: the exit code (negative: the
    signal), what was running and where the server's log is, not the client's "Socket closed"."""
    try:
        return run(*args)
    except Exception as e:
        proc = getattr(server, "_proc", None)
        code = None if proc is None else proc.poll()
        if code is None:
            raise
        raise RuntimeError(
            f"tritonserver exited with code {code} during {what}; its log: {server.log_path}"
        ) from e


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


def _merge_rows(variant: Variant, rows: list[dict]) -> dict:
    """Rounds of one (variant, concurrency) as one row: all pairs' medians, statistics summed.

    ``unet``: the UNet's statistics, Triton's for a UNet called by BLS, the pipeline's
    ``sd_unet_*`` metrics for the UNet in its process (``bls_unet``: Triton's for that
    UNet's model all the same, which no step should have called)."""
    unet = stats.ModelStats()
    for row in rows:
        unet = unet + row["unet"]
    steps, seconds = (sum(r["loop"][k] for r in rows) for k in (0, 1))
    best = sorted(rows, key=lambda r: r["ms_per_step"])[len(rows) // 2]
    extra = {}
    if variant.in_pipeline:
        runs = [sum(r["unet_in_pipeline"][k] for r in rows) for k in range(3)]
        extra["bls_unet"] = unet.to_dict()
        unet_row = stats.in_pipeline_unet(runs, (0, 0, 0))
    else:
        unet_row = unet.to_dict()
    best = {k: v for k, v in best.items() if k != "unet_in_pipeline"}
    return {
        **best,
        **extra,
        "rounds": [r["ms_per_step"] for r in rows],
        "unet": unet_row,
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

    variants = plan.null_variants()
    levels: dict[tuple[Variant, int], list[dict]] = {}
    probes: dict[str, list[np.ndarray]] = {t: [] for t in probe_targets}
    server = _start(repository, log_dir, "overhead", timeout_s)
    try:
        url = server.grpc_url
        client = grpcclient.InferenceServerClient(url)
        _checked(server, "the warm-up", _warm, url, plan, variants)
        for target in probes:
            bls_calls(client, target, 20)
        with system.CpuAccount(server.pid) as account:
            for r in range(plan.rounds):
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    for c in plan.concurrency:
                        row = _checked(
                            server,
                            f"{variant.pipeline} at c={c}, round {r + 1}",
                            _served_paired,
                            server,
                            client,
                            plan,
                            variant,
                            c,
                        )
                        levels.setdefault((variant, c), []).append(row)
                for target in probes if r % 2 == 0 else list(probes)[::-1]:
                    probes[target].append(bls_calls(client, target, plan.probe_calls))
        memory = system.process_memory(server.pid)
        client.close()
    finally:
        server.stop()
    rows = [
        {**_variant_keys(v), "concurrency": c, **_merge_rows(v, runs)}
        for (v, c), runs in levels.items()
    ]
    bls = {t: _call_ms(np.concatenate(runs)) for t, runs in probes.items() if runs}
    return {"rows": rows, "cpu": account.result, "memory": memory, "bls": bls}


def _variant_keys(variant: Variant) -> dict:
    """How a row names its variant."""
    return {
        "delay_us": variant.delay_us,
        "in_pipeline": variant.in_pipeline,
        "pipeline": variant.pipeline,
    }


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


def _merging_level(server, client, plan: Plan, variant: Variant, c: int) -> dict:
    """One closed-loop level of ``c`` workers against ``variant`` with the real UNet: the
    images' latencies, the wall time, the loop's and the UNet's counters over it."""
    metrics, url = server.metrics_url, server.grpc_url
    n = c * plan.merge_requests_per_worker
    request = replace(plan.request, steps=plan.merge_steps)
    t0 = time.perf_counter()
    before = stats.snapshot(client)
    loop_before = stats.denoise_snapshot(metrics, variant.pipeline)
    unet_before = stats.unet_snapshot(metrics, variant.pipeline)
    timing = Served(url, request, model=variant.pipeline).run(c, n)
    after = _settled(client, before, variant, n)
    loop_after = stats.denoise_snapshot(metrics, variant.pipeline)
    unet_after = stats.unet_snapshot(metrics, variant.pipeline)
    return {
        "images": n,
        "wall_s": time.perf_counter() - t0,
        "latencies": list(timing.latencies),
        "loop": [b - a for a, b in zip(loop_before, loop_after, strict=True)],
        "unet": stats.delta(after, before).get(variant.unet, stats.ModelStats()),
        "unet_in_pipeline": [b - a for a, b in zip(unet_before, unet_after, strict=True)],
    }


def _merging_row(plan: Plan, variant: Variant, c: int, runs: list[dict]) -> dict:
    """The rounds of one (variant, concurrency) of the merging run as one row."""
    n = sum(r["images"] for r in runs)
    lat = [x for r in runs for x in r["latencies"]]
    bls = stats.ModelStats()
    for r in runs:
        bls = bls + r["unet"]
    steps, seconds = (sum(r["loop"][k] for r in runs) for k in (0, 1))
    u = bls.to_dict()
    if variant.in_pipeline:
        u = stats.in_pipeline_unet(
            [sum(r["unet_in_pipeline"][k] for r in runs) for k in range(3)], (0, 0, 0)
        )
    row = {
        **_variant_keys(variant),
        "spinning": variant.spinning,
        "concurrency": c,
        "images": n,
        "images_per_s": round(n / sum(r["wall_s"] for r in runs), 4),
        "rounds_images_per_s": [round(r["images"] / r["wall_s"], 4) for r in runs],
        "p50_s": round(statistics.median(lat), 4),
        "ms_per_step": round(statistics.median(lat) / plan.merge_steps * 1e3, 3),
        "loop_ms_per_step": stats.ms_per_step((steps, seconds), (0, 0)),
        "unet": {**u, "executions_per_image": round(u["execution_count"] / n, 3)},
    }
    if variant.in_pipeline:
        row["bls_unet"] = bls.to_dict()
    return row


def merging(repository: Path, plan: Plan, log_dir: Path | None, timeout_s: float) -> dict:
    """The real UNet at each delay and concurrency, and in the pipeline's process: are steps
    of concurrent requests still merged? Variants alternate ABBA over ``plan.merge_rounds``."""
    import tritonclient.grpc as grpcclient

    variants = plan.merge_variants()
    levels: dict[tuple[Variant, int], list[dict]] = {}
    server = _start(repository, log_dir, "merging", timeout_s)
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        _checked(server, "the warm-up", _warm, server.grpc_url, plan, variants)
        with system.CpuAccount(server.pid) as account:
            for r in range(plan.merge_rounds):
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    for c in plan.concurrency:
                        level = _checked(
                            server,
                            f"{variant.pipeline} at c={c}, merging round {r + 1}",
                            _merging_level,
                            server,
                            client,
                            plan,
                            variant,
                            c,
                        )
                        levels.setdefault((variant, c), []).append(level)
        client.close()
    finally:
        server.stop()
    rows = [_merging_row(plan, v, c, runs) for (v, c), runs in levels.items()]
    return {
        "rows": rows,
        "steps": plan.merge_steps,
        "rounds": plan.merge_rounds,
        "requests_per_worker": plan.merge_requests_per_worker,
        "cpu": account.result,
    }


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
    null_repo = variant_repository(source, work / "null-unet", plan.null_variants(), instances=c)
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
            "in_pipeline": plan.in_pipeline,
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


TARGET_MS = 0.5  # per-step overhead at c=1 on the CPU (issue #13)


def markdown(result: dict) -> str:
    """The overhead section of a benchmark report."""
    plan, served, inproc = result["plan"], result["served"], result["inprocess"]
    lo, hi = plan["steps"]
    load = ", ".join("/".join(f"{x:.2f}" for x in la) for la in result["load_average"])
    c = plan["pipeline_instances"]
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
        f"{plan['rounds']} rounds (ABBA); BLS: {c} pipeline instances per variant calling "
        "the null UNet model"
        + (
            "; in pipeline: one instance (`unet_in_pipeline: 1`, "
            f"`max_concurrency: {c}`) running the same null UNet's host in its process"
            if plan.get("in_pipeline")
            else ""
        )
        + f". Started {result['started']}; load average (1/5/15 min) at start, after the "
        f"overhead runs{', after the merging runs' if 'merging' in result else ''}: {load}; "
        f"others' load during the served runs {served['cpu'].get('others_cores', 0)} cores, "
        f"during the in-process runs {inproc['cpu'].get('others_cores', 0)} cores.",
        "",
        "| UNet | c | served ms/step, loop's clock (rounds) | in-process, "
        "loop's clock | served ms/step, request pairs (IQR) | per round | floor | in-process, "
        "request pairs (floor) | UNet samples/exec | UNet calls/exec | UNet queue ms/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = inproc["ms_per_step"]
    for row in served["rows"]:
        u = row["unet"]
        q1, q3 = row["ms_per_step_iqr"]
        rounds = " ".join(f"{x:.2f}" for x in row["rounds"])
        loop_rounds = " ".join(_ms(x) for x in row["loop_rounds"])
        queue = u["queue_ms_per_request"]
        lines.append(
            f"| {_label(row)} | {row['concurrency']} | **{_ms(row['loop_ms_per_step'])}** "
            f"({loop_rounds}) | {_ms(inproc['loop_ms_per_step'])} "
            f"| {row['ms_per_step']:.2f} ({q1:.2f}–{q3:.2f}) | {rounds} "
            f"| {row['ms_per_step_floor']:.2f} | {base:.2f} ({inproc['ms_per_step_floor']:.2f}) "
            f"| {u['samples_per_execution']} | {u.get('requests_per_execution', '-')} "
            f"| {'-' if queue is None else queue} |"
        )
    lines += headline_lines(served["rows"])
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
            f"{m.get('requests_per_worker', 2)} images per worker, level and round, "
            f"{m.get('rounds', 1)} rounds (ABBA over the variants); images/s: all rounds' "
            "images over their wall time (per round in brackets). "
            "ms/step: p50 latency / steps; loop's clock: the pipeline's own per-step time. "
            "Spinning: the UNet's onnxruntime threads spin while idle (onnxruntime's default; "
            "the export writes `allow_spinning: 0`). UNet statistics: Triton's for a UNet "
            "called by BLS; for the UNet in the pipeline, the pipeline's `sd_unet_*` metrics "
            "(runs, step calls, samples; no times or sizes).",
            "",
            "| UNet | spinning | c | images/s | p50 s | ms/step | loop's clock "
            "ms/step | UNet calls/exec | UNet samples/exec | UNet exec/image | UNet ms/exec "
            "| batch sizes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in m["rows"]:
            spin = "yes" if row.get("spinning") else "no"
            per_round = " ".join(str(x) for x in row.get("rounds_images_per_s", []))
            lines.append(
                f"| {_label(row)} | {spin} | {row['concurrency']} | {row['images_per_s']} "
                f"({per_round}) "
                f"| {row['p50_s']} | {row['ms_per_step']} | {_ms(row.get('loop_ms_per_step'))} "
                f"| {row['unet'].get('requests_per_execution', '-')} "
                + stats.unet_cells(row["unet"])
            )
        lines += merging_lines(m["rows"])
    return "\n".join(lines) + "\n"


def _pick(rows: list[dict], c: int, *, in_pipeline: bool, delay_us: int = 0) -> dict | None:
    """The row of one variant (not spinning) at concurrency ``c``."""
    for row in rows:
        if (
            row["concurrency"] == c
            and bool(row.get("in_pipeline")) == in_pipeline
            and not row.get("spinning")
            and (in_pipeline or row["delay_us"] == delay_us)
        ):
            return row
    return None


def headline_lines(rows: list[dict]) -> list[str]:
    """The UNet in the pipeline against the BLS call at delay 0, per concurrency: ms per step
    by the loop's clock, and at c=1 against the target."""
    lines = []
    for c in sorted({r["concurrency"] for r in rows}):
        inpipe = _pick(rows, c, in_pipeline=True)
        bls = _pick(rows, c, in_pipeline=False)
        if (
            inpipe is None
            or bls is None
            or None
            in (
                inpipe["loop_ms_per_step"],
                bls["loop_ms_per_step"],
            )
        ):
            continue
        a, b = inpipe["loop_ms_per_step"], bls["loop_ms_per_step"]
        u = inpipe["unet"]
        line = (
            f"**c={c}: UNet in the pipeline {a:.3f} ms per step vs {b:.3f} by BLS at delay "
            f"0 µs** (loop's clock; {a / b:.2f}×); its UNet ran {u['execution_count']} times "
            f"for {u['request_count']} step calls ({u['requests_per_execution']} calls, "
            f"{u['samples_per_execution']} samples per run)"
        )
        if c == 1:
            verdict = "met" if a <= TARGET_MS else "not met"
            line += f"; target ≤ {TARGET_MS} ms per step at c=1: **{verdict}**"
        calls = inpipe.get("bls_unet", {}).get("request_count", 0)
        lines += ["", line + f"; BLS calls to its UNet model: {calls}."]
    return lines


def merging_lines(rows: list[dict]) -> list[str]:
    """Under load (the highest concurrency): images/s and merging, the UNet in the pipeline
    against the BLS call at delay 0."""
    c = max(r["concurrency"] for r in rows)
    inpipe = _pick(rows, c, in_pipeline=True)
    bls = _pick(rows, c, in_pipeline=False)
    if inpipe is None or bls is None:
        return []
    u, v = inpipe["unet"], bls["unet"]
    ratio = inpipe["images_per_s"] / bls["images_per_s"] if bls["images_per_s"] else 0.0
    return [
        "",
        f"**c={c}, real UNet: in the pipeline {inpipe['images_per_s']} images/s vs "
        f"{bls['images_per_s']} by BLS at delay 0 µs ({ratio:.2f}×).** Merging: in the "
        f"pipeline {u['request_count']} step calls in {u['execution_count']} runs "
        f"(`sd_unet_requests_total` / `sd_unet_executions_total` = "
        f"{u['requests_per_execution']}), {u['samples_per_execution']} samples per run; "
        f"by BLS {v['samples_per_execution']} samples per execution "
        f"({v['requests_per_execution']} calls); UNet executions per image "
        f"{u['executions_per_image']} vs {v['executions_per_image']}.",
    ]


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
        if row.get("in_pipeline"):
            continue
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
        "--overhead-merge-rounds",
        type=int,
        default=2,
        help="rounds of the real-UNet run (variants alternating ABBA)",
    )
    p.add_argument(
        "--overhead-merge-requests-per-worker",
        type=int,
        default=2,
        help="images per worker, level and round in the real-UNet run",
    )
    p.add_argument(
        "--no-merging",
        dest="merging",
        action="store_false",
        help="skip the real-UNet run that shows merging under load",
    )
    p.add_argument(
        "--no-in-pipeline",
        dest="in_pipeline",
        action="store_false",
        help="skip the pipeline that runs the UNet's host in its process (unet_in_pipeline)",
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
        in_pipeline=args.in_pipeline,
        merge_rounds=args.overhead_merge_rounds,
        merge_requests_per_worker=args.overhead_merge_requests_per_worker,
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

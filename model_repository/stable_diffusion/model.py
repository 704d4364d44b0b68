"""Triton Python-backend glue for the Stable Diffusion pipeline.

The pipeline itself is ``sd_pipeline`` (beside this file): this module only
turns Triton requests into :class:`GenerationRequest`s, runs
:func:`generate` with the components as BLS calls, and turns results and
errors into responses. One file serves two configs:

- ``stable_diffusion`` (default transaction policy): one response per
  request. An instance runs one request at a time (``execute`` must return
  its responses; an ``async def execute`` is awaited to completion too, measured
  on Triton 2.51), so requests run concurrently through ``instance_group
  { count: K }``: K stub processes whose UNet calls the UNet's dynamic
  batcher merges.
- ``stable_diffusion_stream`` (``model_transaction_policy { decoupled: true }``):
  ``execute`` validates each request, hands it to a worker thread and
  returns at once; the worker sends one progress response per denoising
  step and then the images with the FINAL flag. One instance runs up to
  ``max_concurrency`` requests at once (config parameter, default 8).

``unet_in_pipeline`` (config parameter, ``1`` to enable; the exporter's
``--unet-in-pipeline``): the UNet model's own host (its ``model.py`` and
files, which the exporter puts in ``unet/`` inside this version folder) runs
in this process, so a step makes no BLS call (``InProcessUNet``); the unary model
then also hands each request to a worker thread (a default-policy model may
answer through the request's response sender after ``execute`` returned,
measured on Triton 2.51), so that one instance runs up to ``max_concurrency``
requests at once and their steps merge in-process (``sd_unet_*`` metrics
count the runs and the samples they held).

Config parameters (string values, all optional; the exporter writes them,
documented in docs/reliability.md):
``max_steps``, ``max_pixels``, ``max_side``, ``max_images``,
``max_prompt_bytes``, ``max_prompt_chunks``, ``max_work`` (request limits,
defaults: ``sd_pipeline.config.Limits``), ``default_scheduler`` (an alias for
requests that name none; default: the model's own scheduler config),
``prompt_syntax`` (``a1111`` or ``diffusers``, for requests that name none;
default ``a1111``),
``max_concurrency``, ``max_queue_size``, ``queue_timeout_s`` (streaming
model: its own admission control; the unary model's queue is Triton's
``dynamic_batching { default_queue_policy }``, written by the exporter).
``device`` (``auto``, ``cuda``, ``cpu``): where the pipeline's tensors may
live (``component_host.choose_device``; see also
``sd_pipeline/triton_components.py``).

Errors are per request: bad input -> INVALID_ARG with the validation
message, cancellation -> CANCELLED, overload, a queue timeout or a component
model that is not loaded -> UNAVAILABLE, anything else -> INTERNAL (logged).
Every request ends with one JSON audit line in the server log and in the
``sd_*`` metrics (see ``sd_pipeline/telemetry.py``).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The sd_pipeline this version was exported with sits beside this file and must
# win over any installed copy (pip install sd-triton in the server's environment),
# or a rollback to an older version would run newer pipeline code.
_HERE = Path(__file__).resolve().parent
if sys.path[:1] != [str(_HERE)]:
    sys.path.insert(0, str(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from component_host import instance_device  # noqa: E402  (beside this file, as in every host)

from sd_pipeline import spec as S  # noqa: E402
from sd_pipeline.conditioning import check_prompt_chunks  # noqa: E402
from sd_pipeline.config import Assets, Limits  # noqa: E402
from sd_pipeline.errors import Cancelled, ComponentError, InvalidRequest  # noqa: E402
from sd_pipeline.loop import (  # noqa: E402
    GenerationResult,
    generate,
    import_lazy_modules,
    polled_at_most_every,
)
from sd_pipeline.preview import latents_to_preview  # noqa: E402
from sd_pipeline.request import GenerationRequest, model_defaults, parse_request  # noqa: E402
from sd_pipeline.schedulers import check_name  # noqa: E402
from sd_pipeline.telemetry import Metrics, Unavailable, component_unavailable, log_line, record  # noqa: E402
from sd_pipeline.triton_components import InProcessUNet, TritonComponents, unet_folder  # noqa: E402

ASSETS = _HERE / "assets"
DEFAULT_MAX_CONCURRENCY = 8
# How often a running request asks Triton whether its client cancelled it.
CANCEL_POLL_INTERVAL_S = 0.05


def config_parameters(model_config: dict) -> dict[str, str]:
    """The model config's ``parameters`` as name -> string value."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def check_model_config(model_config: dict, model: S.ModelSpec) -> None:
    """Fail at load, not per request: the config must declare exactly ``model``'s tensors."""
    problems = []
    if model_config.get("max_batch_size", 0) != 0:
        problems.append("max_batch_size must be 0 (one request is one prompt)")
    for kind, tensors in (("input", model.inputs), ("output", model.outputs)):
        declared = {t["name"]: t for t in model_config.get(kind, [])}
        for t in tensors:
            if t.name not in declared:
                problems.append(f"{kind} {t.name} is missing")
            elif declared[t.name]["data_type"] != t.triton_dtype:
                problems.append(f"{kind} {t.name} must be {t.triton_dtype}")
        extra = sorted(set(declared) - {t.name for t in tensors})
        if extra:
            problems.append(f"unexpected {kind} {', '.join(extra)}")
    if problems:
        raise ValueError(
            f"{model_config.get('name')}: config does not match {model.name}: "
            + "; ".join(problems)
        )


def result_tensors(result: GenerationResult) -> list:
    return [
        pb_utils.Tensor("images", result.images),
        pb_utils.Tensor("nsfw_content_detected", result.nsfw_content_detected),
        pb_utils.Tensor("seeds", result.seeds),
    ]


def error_for(exc: BaseException):
    """The ``TritonError`` a request gets for ``exc``."""
    if isinstance(exc, InvalidRequest):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
    if isinstance(exc, Cancelled):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED)
    if isinstance(exc, Unavailable):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
    if isinstance(exc, ComponentError) and component_unavailable(exc):
        return pb_utils.TritonError(
            f"component model {exc.component} is unavailable: {exc}",
            pb_utils.TritonError.UNAVAILABLE,
        )
    pb_utils.Logger.log_error(f"stable_diffusion: {''.join(traceback.format_exception(exc))}")
    return pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
        self.spec = S.STABLE_DIFFUSION_STREAM if self.decoupled else S.STABLE_DIFFUSION
        check_model_config(model_config, self.spec)
        self.assets = Assets.load(ASSETS)
        # Worker threads would otherwise race diffusers' lazy imports on first use.
        import_lazy_modules()
        parameters = config_parameters(model_config)
        self.limits = Limits.from_parameters(parameters, self.assets.config)
        # The alias for requests that name no scheduler (None: the model's own config).
        self.default_scheduler = parameters.get("default_scheduler", "").strip() or None
        check_name(self.default_scheduler)
        # The model's own input defaults (a Turbo or LCM export's steps and guidance).
        self.defaults = model_defaults(parameters)
        # The device rule of every Python-backend model here (component_host.py): a
        # KIND_GPU instance runs on its GPU or fails to load, never quietly on the
        # CPU (parameter ``device``: auto, cuda or cpu); BLS calls keep CUDA tensors on it.
        cuda = instance_device(args, model_config, cuda=torch.cuda.is_available())
        device = "cpu" if cuda is None else f"cuda:{cuda}"
        self.model_name = args.get("model_name", model_config.get("name", ""))
        self.model_version = str(args.get("model_version", ""))
        self.metrics = Metrics(pb_utils, self.model_name, self.model_version)
        in_pipeline = _flag(parameters, "unet_in_pipeline")
        self.unet = self._load_unet(args, cuda) if in_pipeline else None
        # Requests on worker threads: the streaming model's, and the unary one's whose
        # steps merge in its process.
        self.threaded = self.decoupled or self.unet is not None
        self.components = TritonComponents(self.assets.config, device=device, unet=self.unet)
        # The refiner exported beside an SDXL base (its own component models).
        refiner = self.assets.refiner
        self.refiner = None if refiner is None else TritonComponents(refiner.config, device=device)
        self.pool = None
        if self.threaded:
            workers = int(parameters.get("max_concurrency") or DEFAULT_MAX_CONCURRENCY)
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sd-stream")
            # Admission: at most `workers` running plus `max_queue_size` waiting (0: unbounded).
            self.max_queued = int(parameters.get("max_queue_size") or 0)
            self.capacity = workers + self.max_queued if self.max_queued > 0 else None
            self.queue_timeout_s = float(parameters.get("queue_timeout_s") or 0)
            self.in_flight = 0
            self.lock = threading.Lock()

    def execute(self, requests: list) -> list | None:
        if self.threaded:
            for request in requests:
                self._start_stream(request)
            return None
        return [self._respond(request) for request in requests]

    def finalize(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.unet is not None:
            self.unet.finalize()

    def _load_unet(self, args: dict, cuda: int | None) -> InProcessUNet:
        """The UNet model's host in this process, on this instance's device."""
        config = self.assets.config
        if not config.unet_config:
            raise ValueError(
                f"{self.model_name}: unet_in_pipeline needs the UNet's config in "
                "pipeline.json (unet_config): export again with --unet-in-pipeline"
            )
        return InProcessUNet(
            unet_folder(args["model_repository"], args["model_version"], config),
            config.unet_config,
            kind="CPU" if cuda is None else "GPU",
            device_id=cuda or 0,
            observe=self.metrics.observe_unet,
        )

    # ------------------------------------------------------------------ helpers
    def _inputs(self, request) -> dict:
        inputs = {}
        for t in self.spec.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, t.name)
            if tensor is not None:
                inputs[t.name] = tensor.as_numpy()
        return inputs

    def _parse(self, inputs: dict) -> GenerationRequest:
        request = parse_request(
            inputs,
            self.assets.config,
            self.limits,
            self.spec,
            default_scheduler=self.default_scheduler,
            defaults=self.defaults,
        )
        # Prompts in the web UI's syntax: at most max_prompt_chunks chunks each.
        check_prompt_chunks(request, self.assets, self.limits.max_prompt_chunks)
        return request

    def _audit(self, request_id, inputs, parsed, start, error, result=None) -> None:
        """One JSON line in the server log and the sd_* metrics, for every request.

        Never fails the request it records: a problem here is logged and dropped.
        """
        try:
            self._record(request_id, inputs, parsed, start, error, result)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_error(f"{self.model_name}: audit record failed: {e!r}")

    def _record(self, request_id, inputs, parsed, start, error, result) -> None:
        duration = time.perf_counter() - start
        entry = record(
            request_id=request_id,
            model=self.model_name,
            version=self.model_version,
            inputs=inputs,
            parsed=parsed,
            duration_s=duration,
            error=error,
            nsfw=None if result is None else result.nsfw_content_detected,
            denoise_s=None if result is None else result.denoise_s,
        )
        pb_utils.Logger.log_info(log_line(entry))
        done = (
            (0, 0, 0.0) if result is None else (len(result.images), result.steps, result.denoise_s)
        )
        images, steps, denoise_s = done
        self.metrics.observe(entry["outcome"], duration, images, steps=steps, denoise_s=denoise_s)

    def _respond(self, request):
        start = time.perf_counter()
        inputs, parsed, result, error = {}, None, None, None
        try:
            inputs = self._inputs(request)
            parsed = self._parse(inputs)
            result = generate(
                parsed,
                self.components,
                self.assets,
                refiner=self.refiner,
                should_stop=polled_at_most_every(request.is_cancelled, CANCEL_POLL_INTERVAL_S),
            )
            response = pb_utils.InferenceResponse(output_tensors=result_tensors(result))
        except Exception as e:
            error = e
            response = pb_utils.InferenceResponse(error=error_for(e))
        self._audit(_request_id(request), inputs, parsed, start, error, result)
        return response

    def _admit(self) -> None:
        """Count one more request in; refuse it when running + waiting is at capacity."""
        with self.lock:
            if self.capacity is not None and self.in_flight >= self.capacity:
                queued = self.in_flight - (self.capacity - self.max_queued)
                raise Unavailable(
                    f"server busy: {queued} requests queued (max_queue_size {self.max_queued}) "
                    f"for {self.model_name}; retry later"
                )
            self.in_flight += 1

    def _release(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def _start_stream(self, request) -> None:
        # Inputs are read (and copied) here: Triton frees them when execute returns.
        start = time.perf_counter()
        sender = request.get_response_sender()
        request_id = _request_id(request)
        inputs, parsed = {}, None
        try:
            inputs = self._inputs(request)
            parsed = self._parse(inputs)
            self._admit()
        except Exception as e:
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            sender.send(pb_utils.InferenceResponse(error=error_for(e)), flags=final)
            self._audit(request_id, inputs, parsed, start, e)
            return
        audit = (request_id, {k: inputs[k] for k in ("prompt", "negative_prompt") if k in inputs})
        self.pool.submit(self._stream, parsed, sender, start, audit)

    def _stream(self, parsed: GenerationRequest, sender, start: float, audit=("", {})) -> None:
        try:
            self._stream_one(parsed, sender, start, audit)
        finally:
            self._release()

    def _stream_one(self, parsed: GenerationRequest, sender, start: float, audit) -> None:
        def elapsed():
            return pb_utils.Tensor("elapsed_s", np.array([time.perf_counter() - start], np.float32))

        def progress(step_index: int, total_steps: int, latents) -> None:
            tensors = [
                pb_utils.Tensor("step", np.array([step_index + 1], np.int32)),
                pb_utils.Tensor("total_steps", np.array([total_steps], np.int32)),
                elapsed(),
            ]
            if parsed.preview:
                preview = latents_to_preview(latents)
                tensors.append(pb_utils.Tensor("preview_images", preview))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))

        result, error = None, None
        try:
            waited = time.perf_counter() - start
            if self.queue_timeout_s and waited > self.queue_timeout_s:
                raise Unavailable(
                    f"request timeout expired: waited {waited:.1f} s in the queue "
                    f"(queue_timeout_s {self.queue_timeout_s:g})"
                )
            if sender.is_cancelled():
                raise Cancelled("cancelled while queued")
            result = generate(
                parsed,
                self.components,
                self.assets,
                refiner=self.refiner,
                callback=progress if self.decoupled else None,
                should_stop=polled_at_most_every(sender.is_cancelled, CANCEL_POLL_INTERVAL_S),
            )
            tensors = result_tensors(result)
            if self.decoupled:
                tensors.append(elapsed())
            response = pb_utils.InferenceResponse(output_tensors=tensors)
        except Exception as e:
            error = e
            response = pb_utils.InferenceResponse(error=error_for(e))
        # Recorded before the answer leaves, as the unary model's: a client that reads
        # the metrics after its response sees its request counted.
        request_id, inputs = audit
        self._audit(request_id, inputs, parsed, start, error, result)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _flag(parameters: dict[str, str], key: str) -> bool:
    """A yes/no config parameter (``1``/``true``/``yes``; absent or empty: no)."""
    value = parameters.get(key, "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"config parameter {key} must be 1 or 0, got {value!r}")
    return value in ("1", "true", "yes")


def _request_id(request) -> str:
    get = getattr(request, "request_id", None)
    return get() if callable(get) else ""

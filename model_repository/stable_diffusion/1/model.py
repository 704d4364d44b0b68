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

Config parameters (string values, all optional): ``max_steps``,
``max_pixels``, ``max_images`` (request limits), ``default_scheduler`` (an
alias for requests that name none; default: the model's own scheduler
config), ``max_concurrency`` (streaming model only).

Errors are per request: bad input -> INVALID_ARG with the validation
message, cancellation -> CANCELLED, anything else -> INTERNAL (logged).
"""

from __future__ import annotations

import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from sd_pipeline import spec as S
from sd_pipeline.config import Assets, Limits
from sd_pipeline.errors import Cancelled, InvalidRequest
from sd_pipeline.loop import GenerationResult, generate
from sd_pipeline.preview import latents_to_preview
from sd_pipeline.request import GenerationRequest, parse_request
from sd_pipeline.schedulers import check_name
from sd_pipeline.triton_components import TritonComponents

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MAX_CONCURRENCY = 8


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
    pb_utils.Logger.log_error(f"stable_diffusion: {''.join(traceback.format_exception(exc))}")
    return pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
        self.spec = S.STABLE_DIFFUSION_STREAM if self.decoupled else S.STABLE_DIFFUSION
        check_model_config(model_config, self.spec)
        self.assets = Assets.load(ASSETS)
        parameters = config_parameters(model_config)
        self.limits = Limits.from_parameters(parameters, self.assets.config)
        # The alias for requests that name no scheduler (None: the model's own config).
        self.default_scheduler = parameters.get("default_scheduler", "").strip() or None
        check_name(self.default_scheduler)
        self.components = TritonComponents(self.assets.config)
        self.pool = None
        if self.decoupled:
            workers = int(parameters.get("max_concurrency") or DEFAULT_MAX_CONCURRENCY)
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sd-stream")

    def execute(self, requests: list) -> list | None:
        if self.decoupled:
            for request in requests:
                self._start_stream(request)
            return None
        return [self._respond(request) for request in requests]

    def finalize(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    # ------------------------------------------------------------------ helpers
    def _parse(self, request) -> GenerationRequest:
        inputs = {}
        for t in self.spec.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, t.name)
            if tensor is not None:
                inputs[t.name] = tensor.as_numpy()
        return parse_request(
            inputs,
            self.assets.config,
            self.limits,
            self.spec,
            default_scheduler=self.default_scheduler,
        )

    def _respond(self, request):
        try:
            parsed = self._parse(request)
            result = generate(
                parsed, self.components, self.assets, should_stop=request.is_cancelled
            )
        except Exception as e:
            return pb_utils.InferenceResponse(error=error_for(e))
        return pb_utils.InferenceResponse(output_tensors=result_tensors(result))

    def _start_stream(self, request) -> None:
        # Inputs are read (and copied) here: Triton frees them when execute returns.
        sender = request.get_response_sender()
        try:
            parsed = self._parse(request)
        except Exception as e:
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            sender.send(pb_utils.InferenceResponse(error=error_for(e)), flags=final)
            return
        self.pool.submit(self._stream, parsed, sender, time.perf_counter())

    def _stream(self, parsed: GenerationRequest, sender, start: float) -> None:
        def elapsed():
            return pb_utils.Tensor("elapsed_s", np.array([time.perf_counter() - start], np.float32))

        def progress(step_index: int, total_steps: int, latents) -> None:
            tensors = [
                pb_utils.Tensor("step", np.array([step_index + 1], np.int32)),
                pb_utils.Tensor("total_steps", np.array([total_steps], np.int32)),
                elapsed(),
            ]
            if parsed.preview:
                preview = latents_to_preview(latents, self.assets.config)
                tensors.append(pb_utils.Tensor("preview_images", preview))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))

        try:
            result = generate(
                parsed,
                self.components,
                self.assets,
                callback=progress,
                should_stop=sender.is_cancelled,
            )
            response = pb_utils.InferenceResponse(
                output_tensors=[*result_tensors(result), elapsed()]
            )
        except Exception as e:
            response = pb_utils.InferenceResponse(error=error_for(e))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

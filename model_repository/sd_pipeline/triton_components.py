"""The components as BLS calls to the component models of the same Triton server.

Only importable inside Triton's Python backend (``triton_python_backend_utils``
is imported when the class is built, so the rest of the package never needs
it). Tensors cross as DLPack, without copies on this side; every call checks
``has_error()`` on the response it just got and raises a
:class:`~.errors.ComponentError` that names the component.

Calls are synchronous (``InferenceRequest.exec``) and safe from several
threads; concurrency across requests comes from several model instances or
the streaming model's worker threads, and the UNet's dynamic batcher merges
their calls into one execution (step-level batching).

Which models: the names and versions pipeline.json records
(``component_models``: the exporter's ``--model-prefix``;
``component_versions``: the version exported with this pipeline), so a
pipeline version always calls the component weights it was exported with.

Devices: a call's outputs come back on the device of its inputs. CPU tensors
in, CPU tensors out. CUDA tensors in (a loop that keeps its latents on
``device``), CUDA tensors out: the inputs go as DLPack GPU tensors, the
outputs are taken by DLPack, with no host round trip per step. Models with
bool outputs (the safety checker's ``has_nsfw_concepts``, read as numpy:
DLPack has no portable bool) answer in CPU memory.

Every call states where its outputs must land (``preferred_memory``: the
memory they are consumed in). Unstated, Triton r24.10 puts them where the
callee allocates them: GPU memory for a GPU onnxruntime instance, where
``as_numpy()`` raises, even for a call whose inputs were on the CPU.

Per step, the loop makes one UNet call: what a call needs that does not change
between calls (the served name and version, each tensor's dtype and reshape,
the output names, where they land) is worked out once per contract and device
(:class:`_Plan`), so that a call only converts its tensors and waits for the
answer (benchmarks/overhead.py measures what is left).

The UNet in the pipeline's process (:class:`InProcessUNet`, config parameter
``unet_in_pipeline``): that call is most of what serving adds to a step
(0.3-0.4 ms of a 0.7 ms step on the CPU, benchmarks/results/cpu-overhead.md),
so the pipeline can instead load the UNet model's own host (its ``model.py``
and files, which the exporter puts in ``unet/`` inside the pipeline's version
folder) and run it here; concurrent requests' steps are merged by :class:`~.step_merger.StepMerger`
as the UNet's dynamic batcher would. ControlNet's controlled UNet and the
refiner's UNet stay BLS calls.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import spec as S
from .components import TextEncoding, controlnet_call, unet_call
from .config import UNET_FOLDER, PipelineConfig
from .errors import ComponentError
from .step_merger import StepMerger

__all__ = ["InProcessUNet", "TritonComponents"]

_CPU = torch.device("cpu")


class _Plan(NamedTuple):
    """What every BLS call to one model contract from one device repeats, worked out once."""

    spec: S.ModelSpec
    name: str  # the served model name
    version: int
    inputs: tuple[tuple[str, torch.dtype, tuple[int, ...] | None], ...]  # name, dtype, reshape
    outputs: tuple[tuple[str, bool], ...]  # name, read as numpy (bool: DLPack has none)
    output_names: list[str]
    preferred_memory: Any


class TritonComponents:
    """:class:`~.components.Components` over BLS.

    ``model_names`` overrides the component model names of pipeline.json;
    ``device`` is where the loop may keep its tensors (see the module's notes).
    """

    def __init__(
        self,
        config: PipelineConfig,
        model_names: Mapping[str, str] | None = None,
        *,
        device: torch.device | str = "cpu",
        unet: InProcessUNet | None = None,
    ) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        self.config = config
        self.device = torch.device(device)
        self.model_names = {**config.component_models, **(model_names or {})}
        self.model_versions = dict(config.component_versions)
        self.local_unet = unet
        # (id(spec), device) -> _Plan; specs are long-lived objects (spec.py's
        # constants, components.unet_spec's one per contract), checked on use.
        self._plans: dict[tuple[int, torch.device], _Plan] = {}

    def _plan(self, model: S.ModelSpec, device: torch.device) -> _Plan:
        key = (id(model), device)
        plan = self._plans.get(key)
        if plan is not None and plan.spec is model:
            return plan
        dtype = self.config.tensor_dtype
        inputs = tuple(
            # The model sees a reshaped tensor (the timestep: [B]); callers send the
            # config's dims ([B, 1]).
            (
                t.name,
                getattr(torch, dtype(model, t.name)),
                None if t.reshape is None else t.triton_dims,
            )
            for t in model.inputs
        )
        outputs = tuple((t.name, dtype(model, t.name) == "bool") for t in model.outputs)
        plan = _Plan(
            spec=model,
            name=self.model_names.get(model.name, model.name),
            version=int(self.model_versions.get(model.name, -1)),
            inputs=inputs,
            outputs=outputs,
            output_names=[name for name, _ in outputs],
            preferred_memory=self._preferred_memory(model, device),
        )
        self._plans[key] = plan
        return plan

    def _to_triton(self, name: str, dtype: torch.dtype, dims, x: torch.Tensor):
        if x.requires_grad:
            x = x.detach()
        if x.dtype != dtype:
            x = x.to(dtype)
        if dims is not None:
            x = x.reshape(x.shape[0], *dims)
        if not x.is_contiguous():
            x = x.contiguous()
        if dtype == torch.bool:  # DLPack has no portable bool before v0.8
            return self._pb.Tensor(name, x.cpu().numpy())
        return self._pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(x))

    def _from_triton(
        self, plan: _Plan, name: str, as_numpy: bool, response, device: torch.device
    ) -> torch.Tensor:
        tensor = self._pb.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise ComponentError(plan.name, f"response has no output {name!r}")
        if as_numpy:
            return torch.from_numpy(tensor.as_numpy().copy())
        out = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
        if out.device != device:
            out = out.to(device)
        return out.float() if out.dtype == torch.float16 else out

    def _preferred_memory(self, model: S.ModelSpec, device: torch.device):
        """Where ``model``'s outputs must land for a call from ``device`` (one place per call).

        GPU ``device`` when the loop runs there and every output is taken by
        DLPack; CPU memory otherwise (CPU calls, and bool outputs, read as numpy).
        """
        on_gpu = device.type == "cuda" and not any(
            self.config.tensor_dtype(model, t.name) == "bool" for t in model.outputs
        )
        if on_gpu:
            return self._pb.PreferredMemory(self._pb.TRITONSERVER_MEMORY_GPU, device.index or 0)
        return self._pb.PreferredMemory(self._pb.TRITONSERVER_MEMORY_CPU, 0)

    def _call(self, model: S.ModelSpec, *tensors: torch.Tensor) -> list[torch.Tensor]:
        device = next((x.device for x in tensors if x.is_cuda), _CPU)
        plan = self._plan(model, device)
        inputs = [
            self._to_triton(name, dtype, dims, x)
            for (name, dtype, dims), x in zip(plan.inputs, tensors, strict=True)
        ]
        if device.type == "cuda":
            # The component reads the inputs on its own stream: they must be written.
            torch.cuda.current_stream(device).synchronize()
        request = self._pb.InferenceRequest(
            model_name=plan.name,
            model_version=plan.version,
            inputs=inputs,
            requested_output_names=plan.output_names,
            preferred_memory=plan.preferred_memory,
        )
        response = request.exec()
        if response.has_error():
            raise ComponentError(plan.name, response.error().message())
        return [
            self._from_triton(plan, name, as_numpy, response, device)
            for name, as_numpy in plan.outputs
        ]

    def encode_text(self, input_ids, skip_layers, *, encoder="text_encoder"):
        return TextEncoding(*self._call(S.COMPONENTS[encoder], input_ids, skip_layers))

    def unet(self, sample, timestep, encoder_hidden_states, added=None, *, residuals=None):
        spec, tensors = unet_call(sample, timestep, encoder_hidden_states, added, residuals)
        if self.local_unet is not None and residuals is None:
            return self.local_unet(spec, tensors)
        return self._call(spec, *tensors)[0]

    def controlnet(
        self, name, sample, timestep, encoder_hidden_states, cond, scale, guess, added=None
    ):
        residuals = self.config.controlnet_residuals
        spec, tensors = controlnet_call(
            name, residuals, sample, timestep, encoder_hidden_states, cond, scale, guess, added
        )
        return self._call(spec, *tensors)

    def vae_encode(self, image):
        return self._call(S.VAE_ENCODER, image)[0]

    def vae_decode(self, latents):
        return self._call(S.VAE_DECODER, latents)[0]

    def safety_check(self, clip_input, images):
        out_images, flags = self._call(S.SAFETY_CHECKER, clip_input, images)
        return out_images, flags


# ---------------------------------------------------------------------------
# The UNet in the pipeline's process


def unet_folder(pipeline_folder: str | Path, version: str, config: PipelineConfig) -> Path:
    """The UNet model's version folder for the pipeline model at ``pipeline_folder``.

    Where the exporter puts it (``--unet-in-pipeline``): ``unet/`` inside the pipeline's
    own version folder. Otherwise the UNet model beside the pipeline in the repository
    (its name and version from pipeline.json), as a repository assembled by hand may have.
    """
    nested = Path(pipeline_folder) / str(version) / UNET_FOLDER
    if nested.is_dir():
        return nested
    name = config.component_models.get("unet", "unet")
    unet_version = config.component_versions.get("unet", 1)
    return Path(pipeline_folder).resolve().parent / name / str(unet_version)


class InProcessUNet:
    """The UNet model's own host (``onnx_host`` or ``torch_host``), run in this process.

    ``folder``: the UNet model's version folder (its ``model.py`` and files);
    ``model_config``: its Triton config as JSON data (``pipeline.json``'s
    ``unet_config``, as the exporter wrote it); ``kind`` and ``device_id``: the
    pipeline instance's, so the UNet runs where the loop runs. Calls from
    several threads are merged into one run (:class:`~.step_merger.StepMerger`,
    at most the config's ``max_batch_size`` samples); ``observe(calls, rows)``
    sees every run.
    """

    def __init__(
        self,
        folder: str | Path,
        model_config: Mapping[str, Any],
        *,
        kind: str = "CPU",
        device_id: int = 0,
        observe=None,
    ) -> None:
        folder = Path(folder)
        self.name = str(model_config.get("name", "unet"))
        source = folder / "model.py"
        if not source.is_file():
            raise FileNotFoundError(
                f"unet_in_pipeline: the UNet model's files are not at {folder} (the exporter's "
                "--unet-in-pipeline puts them in the pipeline's version folder, under "
                f"{UNET_FOLDER}/); export again with --unet-in-pipeline, or set the pipeline's "
                "config parameter unet_in_pipeline to 0 to call the UNet model instead"
            )
        if str(folder) not in sys.path:  # the host's own imports (the torch host's wrappers)
            sys.path.append(str(folder))
        spec = importlib.util.spec_from_file_location(f"sd_unet_host_{id(self)}", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        host = module.TritonPythonModel()
        host.initialize(
            {
                "model_config": json.dumps(dict(model_config)),
                "model_name": self.name,
                "model_repository": str(folder.parent),
                "model_version": folder.name,
                "model_instance_kind": kind,
                "model_instance_device_id": str(device_id),
            }
        )
        self.host = host
        self.inputs = {t.name: t for t in host.inputs}
        self.output = host.outputs[0]
        self._numpy = getattr(host, "ARRAYS", "numpy") == "numpy"
        max_batch = int(model_config.get("max_batch_size", 0))
        if max_batch < 1:
            raise ValueError(f"unet_in_pipeline: model {self.name} has no batch dimension")
        # The host's own batching (requests of one shape concatenated, split back), from
        # component_host.py beside the pipeline's model.py, as in every host.
        from component_host import run_batched

        self._run_batched_host = run_batched
        self.merger = StepMerger(self._run_batched, max_batch, observe)

    def _run_batched(self, batches):
        results = self._run_batched_host(self.host.run, batches, self.host.concat)
        self.host.finish()
        return results

    def _convert(self, name: str, x: torch.Tensor):
        t = self.inputs.get(name)
        if t is None:
            raise ComponentError(self.name, f"the UNet model has no input {name!r}")
        x = x.detach().to(getattr(torch, t.dtype))
        if self._numpy:
            x = x.cpu().numpy()
        return t.to_model(x)

    def __call__(self, spec: S.ModelSpec, tensors) -> torch.Tensor:
        device = tensors[0].device
        inputs = {
            t.name: self._convert(t.name, x) for t, x in zip(spec.inputs, tensors, strict=True)
        }
        try:
            outputs = self.merger(inputs)
        except Exception as e:  # noqa: BLE001  (a host's own error types)
            raise ComponentError(self.name, str(e)) from e
        out = outputs[self.output.name]
        out = torch.from_numpy(out) if self._numpy else out
        if out.device != device:
            out = out.to(device)
        return out.float() if out.dtype == torch.float16 else out

    def finalize(self) -> None:
        finalize = getattr(self.host, "finalize", None)
        if finalize is not None:
            finalize()

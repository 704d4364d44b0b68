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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from . import spec as S
from .components import TextEncoding, controlnet_call, unet_call
from .config import PipelineConfig
from .errors import ComponentError

__all__ = ["TritonComponents"]

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
    ) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        self.config = config
        self.device = torch.device(device)
        self.model_names = {**config.component_models, **(model_names or {})}
        self.model_versions = dict(config.component_versions)
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

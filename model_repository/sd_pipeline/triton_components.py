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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import spec as S
from .components import TextEncoding, controlnet_call_spec, unet_spec
from .config import PipelineConfig
from .errors import ComponentError

__all__ = ["TritonComponents"]


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

    def _to_triton(self, model: S.ModelSpec, tensor: S.TensorSpec, x: torch.Tensor):
        dtype = getattr(torch, self.config.tensor_dtype(model, tensor.name))  # numpy's names
        x = x.detach().to(dtype)
        if tensor.reshape is not None:
            # The model sees the reshaped tensor (the timestep: [B]); callers send
            # the config's dims ([B, 1]).
            x = x.reshape(x.shape[0], *tensor.triton_dims)
        x = x.contiguous()
        if dtype == torch.bool:  # DLPack has no portable bool before v0.8
            return self._pb.Tensor(tensor.name, x.cpu().numpy())
        return self._pb.Tensor.from_dlpack(tensor.name, torch.utils.dlpack.to_dlpack(x))

    def _from_triton(
        self, model: S.ModelSpec, name: str, response, device: torch.device
    ) -> torch.Tensor:
        tensor = self._pb.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise ComponentError(model.name, f"response has no output {name!r}")
        if self.config.tensor_dtype(model, name) == "bool":
            return torch.from_numpy(tensor.as_numpy().copy())
        out = torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).to(device)
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
        name = self.model_names.get(model.name, model.name)
        device = next((x.device for x in tensors if x.is_cuda), torch.device("cpu"))
        inputs = [self._to_triton(model, t, x) for t, x in zip(model.inputs, tensors, strict=True)]
        if device.type == "cuda":
            # The component reads the inputs on its own stream: they must be written.
            torch.cuda.current_stream(device).synchronize()
        request = self._pb.InferenceRequest(
            model_name=name,
            model_version=int(self.model_versions.get(model.name, -1)),
            inputs=inputs,
            requested_output_names=[t.name for t in model.outputs],
            preferred_memory=self._preferred_memory(model, device),
        )
        response = request.exec()
        if response.has_error():
            raise ComponentError(name, response.error().message())
        return [self._from_triton(model, t.name, response, device) for t in model.outputs]

    def encode_text(self, input_ids, skip_layers, *, encoder="text_encoder"):
        return TextEncoding(*self._call(S.COMPONENTS[encoder], input_ids, skip_layers))

    def unet(self, sample, timestep, encoder_hidden_states, added=None, *, residuals=None):
        spec = unet_spec(added, residuals)
        extra = [added[t.name] for t in spec.inputs[3 : len(spec.inputs) - len(residuals or ())]]
        tensors = (sample, timestep, encoder_hidden_states, *extra, *(residuals or ()))
        return self._call(spec, *tensors)[0]

    def controlnet(
        self, name, sample, timestep, encoder_hidden_states, cond, scale, guess, added=None
    ):
        spec = controlnet_call_spec(name, self.config.controlnet_residuals, added)
        extra = [added[t.name] for t in spec.inputs[6:]]
        tensors = (sample, timestep, encoder_hidden_states, cond, scale, guess, *extra)
        return self._call(spec, *tensors)

    def vae_encode(self, image):
        return self._call(S.VAE_ENCODER, image)[0]

    def vae_decode(self, latents):
        return self._call(S.VAE_DECODER, latents)[0]

    def safety_check(self, clip_input, images):
        out_images, flags = self._call(S.SAFETY_CHECKER, clip_input, images)
        return out_images, flags

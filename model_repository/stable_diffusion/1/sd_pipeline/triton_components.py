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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import spec as S
from .config import PipelineConfig
from .errors import ComponentError

__all__ = ["TritonComponents"]

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


class TritonComponents:
    """:class:`~.components.Components` over BLS. ``model_names`` renames component models."""

    def __init__(
        self, config: PipelineConfig, model_names: Mapping[str, str] | None = None
    ) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        self.config = config
        self.model_names = dict(model_names or {})

    def _to_triton(self, model: S.ModelSpec, tensor: S.TensorSpec, x: torch.Tensor):
        dtype = _TORCH_DTYPES[self.config.tensor_dtype(model, tensor.name)]
        x = x.detach().to(dtype)
        if tensor.reshape is not None:
            # The model sees the reshaped tensor (the timestep: [B]); callers send
            # the config's dims ([B, 1]).
            x = x.reshape(x.shape[0], *tensor.triton_dims)
        x = x.contiguous()
        if dtype == torch.bool:  # DLPack has no portable bool before v0.8
            return self._pb.Tensor(tensor.name, x.numpy())
        return self._pb.Tensor.from_dlpack(tensor.name, torch.utils.dlpack.to_dlpack(x))

    def _from_triton(self, model: S.ModelSpec, name: str, response) -> torch.Tensor:
        tensor = self._pb.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise ComponentError(model.name, f"response has no output {name!r}")
        if self.config.tensor_dtype(model, name) == "bool":
            return torch.from_numpy(tensor.as_numpy().copy())
        out = torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).cpu()
        return out.float() if out.dtype == torch.float16 else out

    def _call(self, model: S.ModelSpec, *tensors: torch.Tensor) -> list[torch.Tensor]:
        name = self.model_names.get(model.name, model.name)
        request = self._pb.InferenceRequest(
            model_name=name,
            inputs=[
                self._to_triton(model, t, x) for t, x in zip(model.inputs, tensors, strict=True)
            ],
            requested_output_names=[t.name for t in model.outputs],
        )
        response = request.exec()
        if response.has_error():
            raise ComponentError(name, response.error().message())
        return [self._from_triton(model, t.name, response) for t in model.outputs]

    def encode_text(self, input_ids):
        return self._call(S.TEXT_ENCODER, input_ids)[0]

    def unet(self, sample, timestep, encoder_hidden_states):
        return self._call(S.UNET, sample, timestep, encoder_hidden_states)[0]

    def vae_encode(self, image):
        return self._call(S.VAE_ENCODER, image)[0]

    def vae_decode(self, latents):
        return self._call(S.VAE_DECODER, latents)[0]

    def safety_check(self, clip_input, images):
        out_images, flags = self._call(S.SAFETY_CHECKER, clip_input, images)
        return out_images, flags

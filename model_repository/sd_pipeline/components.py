"""The component models behind one small interface, and two in-process hosts for it.

The loop (:mod:`.loop`) only sees :class:`Components`: torch tensors in,
torch tensors out, float32 at the interface (an adapter casts to and from an
fp16 export's dtypes). Three implementations:

- :class:`OnnxComponents`: onnxruntime sessions over an exported repository's
  ``model.onnx`` files (tests, the in-process baseline);
- :class:`DiffusersComponents`: the diffusers / transformers modules of a
  ``StableDiffusionPipeline`` (reference runs, no export needed);
- ``TritonComponents`` (:mod:`.triton_components`): BLS calls to the
  component models of the same Triton server.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from . import spec as S
from .errors import ComponentError

if TYPE_CHECKING:
    import torch

__all__ = ["Components", "DiffusersComponents", "OnnxComponents", "TextEncoding", "unet_spec"]


class TextEncoding(NamedTuple):
    """A text encoder's outputs (:data:`.spec.TEXT_ENCODER`): the chosen layer's hidden
    state ``[B, L, D]``, the same through the final layer norm, the pooled embedding ``[B, P]``."""

    hidden_state: torch.Tensor
    normed_hidden_state: torch.Tensor
    text_embeds: torch.Tensor


def unet_spec(
    added: Mapping[str, Any] | None, residuals: Sequence[Any] | None = None
) -> S.ModelSpec:
    """The UNet contract a call with these added inputs (``text_embeds``, ``time_ids``,
    ``timestep_cond``) speaks; with ControlNet ``residuals``, the controlled UNet's.

    One object per contract (built once: the loop asks at every step, and
    :class:`~.triton_components.TritonComponents` keeps its per-model call
    plan by it)."""
    added = added or {}
    count = None if residuals is None else len(residuals)
    return _unet_spec("time_ids" in added, "timestep_cond" in added, count)


@cache
def _unet_spec(text_time: bool, timestep_cond: bool, residuals: int | None) -> S.ModelSpec:
    if residuals is not None:
        from .controlnet import controlled_unet_spec

        return controlled_unet_spec(residuals, text_time=text_time, timestep_cond=timestep_cond)
    return S.unet_spec(text_time=text_time, timestep_cond=timestep_cond)


def controlnet_call_spec(name: str, residuals: int, added: Mapping[str, Any] | None) -> S.ModelSpec:
    """The contract of ControlNet component ``name`` called with these added inputs."""
    return _controlnet_spec(name, residuals, "time_ids" in (added or {}))


@cache
def _controlnet_spec(name: str, residuals: int, text_time: bool) -> S.ModelSpec:
    from .controlnet import controlnet_spec

    return controlnet_spec(name, residuals, text_time=text_time)


def unet_call(sample, timestep, encoder_hidden_states, added, residuals):
    """The UNet contract of a call (:func:`unet_spec`) and its tensors in that contract's
    order: the three common inputs, the added ones, the residuals."""
    spec = unet_spec(added, residuals)
    extra = [added[t.name] for t in spec.inputs[3 : len(spec.inputs) - len(residuals or ())]]
    return spec, (sample, timestep, encoder_hidden_states, *extra, *(residuals or ()))


def controlnet_call(name, residuals, sample, timestep, embeddings, cond, scale, guess, added):
    """ControlNet ``name``'s contract (:func:`controlnet_call_spec`) and its tensors in order."""
    spec = controlnet_call_spec(name, residuals, added)
    extra = [added[t.name] for t in spec.inputs[6:]]
    return spec, (sample, timestep, embeddings, cond, scale, guess, *extra)


@runtime_checkable
class Components(Protocol):
    """What the loop needs from the models (shapes as in :mod:`.spec`)."""

    def encode_text(
        self, input_ids: torch.Tensor, skip_layers: torch.Tensor, *, encoder: str = "text_encoder"
    ) -> TextEncoding:
        """Token ids ``[B, L]`` and layers to skip ``[B]`` (int) through text encoder ``encoder``."""
        ...

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added: Mapping[str, torch.Tensor] | None = None,
        *,
        residuals: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Latents ``[B, C, h, w]``, float32 timestep per sample ``[B]``, text embeddings and the
        UNet's added inputs by name (SDXL's ``text_embeds``, ``time_ids``; LCM's
        ``timestep_cond``) -> predicted noise. With ControlNet ``residuals`` (down blocks',
        then the mid block's), the controlled UNet."""
        ...

    def controlnet(
        self,
        name: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
        guess_mode: torch.Tensor,
        added: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """ControlNet component ``name`` on the UNet's inputs, the control image ``[B, 3, H, W]``
        in [0, 1], per-sample scale ``[B]`` and guess mode ``[B]`` (bool) -> its scaled
        residuals (down blocks', then the mid block's)."""
        ...

    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` in [-1, 1] -> latent distribution parameters ``[B, 2C, h, w]``."""
        ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``[B, C, h, w]`` -> image ``[B, 3, H, W]`` in about [-1, 1]."""
        ...

    def safety_check(
        self, clip_input: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP pixels ``[B, 3, S, S]``, images ``[B, H, W, 3]`` in [0, 1] -> (images with
        flagged ones black, bool flags ``[B]``)."""
        ...


# ---------------------------------------------------------------------------
# onnxruntime


def _numpy_dtype(ort_type: str) -> np.dtype:
    """onnxruntime's ``tensor(float16)`` -> numpy's float16 (ONNX's ``float`` is numpy's float32)."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype("float32" if name == "float" else name)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    import torch

    array = np.asarray(array)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


class OnnxComponents:
    """Components as onnxruntime sessions over ``<repository>/<model>/1/model.onnx``.

    Sessions open on first use (a text-to-image run never opens the VAE
    encoder). Input dtypes are read from each ONNX file, so an fp16 export
    works unchanged. ``onnxruntime`` sessions are safe to run from several
    threads.
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_num_threads: int = 0,
        version: str = "1",
    ) -> None:
        self.repository = Path(repository)
        self.providers = list(providers)
        self.intra_op_num_threads = intra_op_num_threads
        self.version = version
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _session(self, model: S.ModelSpec):
        with self._lock:
            if model.name not in self._sessions:
                import onnxruntime as ort

                path = self.repository / model.name / self.version / "model.onnx"
                if not path.is_file():
                    raise ComponentError(model.name, f"no ONNX file at {path}")
                options = ort.SessionOptions()
                options.intra_op_num_threads = self.intra_op_num_threads
                self._sessions[model.name] = ort.InferenceSession(
                    str(path), options, providers=self.providers
                )
            return self._sessions[model.name]

    def _run(self, model: S.ModelSpec, *tensors: torch.Tensor) -> list[torch.Tensor]:
        session = self._session(model)
        types = {i.name: _numpy_dtype(i.type) for i in session.get_inputs()}
        feeds = {
            t.name: x.detach().cpu().numpy().astype(types[t.name], copy=False)
            for t, x in zip(model.inputs, tensors, strict=True)
        }
        try:
            outputs = session.run([t.name for t in model.outputs], feeds)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ComponentError(model.name, str(e)) from e
        return [_to_torch(o) for o in outputs]

    def encode_text(self, input_ids, skip_layers, *, encoder="text_encoder"):
        return TextEncoding(*self._run(S.COMPONENTS[encoder], input_ids, skip_layers))

    def unet(self, sample, timestep, encoder_hidden_states, added=None, *, residuals=None):
        spec, tensors = unet_call(sample, timestep, encoder_hidden_states, added, residuals)
        return self._run(spec, *tensors)[0]

    def controlnet(
        self, name, sample, timestep, encoder_hidden_states, cond, scale, guess, added=None
    ):
        residuals = self._session_outputs(name)
        spec, tensors = controlnet_call(
            name, residuals, sample, timestep, encoder_hidden_states, cond, scale, guess, added
        )
        return self._run(spec, *tensors)

    def _session_outputs(self, name: str) -> int:
        """The number of residuals ControlNet model ``name`` returns (read from its file)."""
        return len(self._session(S.ModelSpec(name, (), ())).get_outputs())

    def vae_encode(self, image):
        return self._run(S.VAE_ENCODER, image)[0]

    def vae_decode(self, latents):
        return self._run(S.VAE_DECODER, latents)[0]

    def safety_check(self, clip_input, images):
        out_images, flags = self._run(S.SAFETY_CHECKER, clip_input, images)
        return out_images, flags


# ---------------------------------------------------------------------------
# diffusers modules


class DiffusersComponents:
    """Components as the torch modules of a diffusers Stable Diffusion (or SDXL) pipeline."""

    def __init__(
        self,
        *,
        unet,
        vae,
        text_encoder=None,
        text_encoder_2=None,
        safety_checker=None,
        controlnets: Mapping[str, Any] | None = None,
    ) -> None:
        # ControlNet modules by component name (pipeline.json's controlnets values)
        self.controlnets = dict(controlnets or {})
        self.modules = {
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "unet": unet,
            "vae": vae,
            "safety_checker": safety_checker,
        }

    @classmethod
    def from_pipeline(cls, pipe, safety_checker=None) -> DiffusersComponents:
        return cls(
            text_encoder=getattr(pipe, "text_encoder", None),
            text_encoder_2=getattr(pipe, "text_encoder_2", None),
            unet=pipe.unet,
            vae=pipe.vae,
            safety_checker=getattr(pipe, "safety_checker", None) or safety_checker,
        )

    def _dtype(self, name: str):
        return next(self.modules[name].parameters()).dtype

    def encode_text(self, input_ids, skip_layers, *, encoder="text_encoder"):
        """As diffusers' ``encode_prompt``: ``hidden_states[-(skip + 1)]``, the final layer
        norm of it, and output 0 when it is the pooled (projected) embedding."""
        import torch

        model = self.modules[encoder]
        with torch.no_grad():
            out = model(input_ids.to(torch.int64), output_hidden_states=True)
            layers = torch.stack(out.hidden_states)  # [layers + 1, B, L, D]
            picked = layers[len(layers) - 1 - skip_layers.long(), torch.arange(len(input_ids))]
            # transformers 5's CLIPTextModel is the text model; WithProjection wraps one.
            normed = getattr(model, "text_model", model).final_layer_norm(picked)
            pooled = out[0] if out[0].ndim == 2 else out.pooler_output
        return TextEncoding(picked.float(), normed.float(), pooled.float())

    def unet(self, sample, timestep, encoder_hidden_states, added=None, *, residuals=None):
        import torch

        dtype = self._dtype("unet")
        added = {k: v.to(dtype) for k, v in (added or {}).items()}
        timestep_cond = added.pop("timestep_cond", None)
        control = {}
        if residuals is not None:
            res = [r.to(dtype) for r in residuals]
            control = {
                "down_block_additional_residuals": res[:-1],
                "mid_block_additional_residual": res[-1],
            }
        with torch.no_grad():
            out = self.modules["unet"](
                sample.to(dtype),
                timestep,
                encoder_hidden_states=encoder_hidden_states.to(dtype),
                timestep_cond=timestep_cond,
                added_cond_kwargs=added or None,
                return_dict=False,
                **control,
            )[0]
        return out.float()

    def controlnet(
        self, name, sample, timestep, encoder_hidden_states, cond, scale, guess, added=None
    ):
        """The module with one float scale and guess mode: the batch's first (one request's)."""
        import torch

        module = self.controlnets[name]
        dtype = next(module.parameters()).dtype
        with torch.no_grad():
            down, mid = module(
                sample.to(dtype),
                timestep,
                encoder_hidden_states=encoder_hidden_states.to(dtype),
                controlnet_cond=cond.to(dtype),
                conditioning_scale=float(scale[0]),
                guess_mode=bool(guess[0]),
                added_cond_kwargs={k: v.to(dtype) for k, v in added.items()} if added else None,
                return_dict=False,
            )
        return [r.float() for r in (*down, mid)]

    def vae_encode(self, image):
        import torch

        vae = self.modules["vae"]
        with torch.no_grad():
            return vae.encode(image.to(self._dtype("vae"))).latent_dist.parameters.float()

    def vae_decode(self, latents):
        import torch

        vae = self.modules["vae"]
        with torch.no_grad():
            return vae.decode(latents.to(self._dtype("vae")), return_dict=False)[0].float()

    def safety_check(self, clip_input, images):
        import torch

        checker = self.modules["safety_checker"]
        if checker is None:
            raise ComponentError("safety_checker", "this pipeline has no safety checker")
        with torch.no_grad():
            out, flags = checker(
                clip_input=clip_input.to(self._dtype("safety_checker")), images=images.clone()
            )
        return out, torch.tensor(flags, dtype=torch.bool)

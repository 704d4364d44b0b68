"""The hand-written parts of every exported model repository.

``sd-triton-export`` copies these into the repository it writes; Triton never
loads this folder directly:

- ``sd_pipeline/``: the sampler loop, tensor contract, schedulers and request
  validation, shipped as ``<repo>/stable_diffusion/<N>/sd_pipeline`` and
  installed as the ``sd_pipeline`` package (one name in both places);
- ``stable_diffusion/model.py``: the pipeline model's Python-backend glue;
- ``onnx_host/model.py``, ``torch_host/model.py``: Python-backend models that
  run a component's ONNX file (onnxruntime) or its diffusers module (torch).

Installed as ``sd_triton.model_repository`` so the exporter finds these files
from a wheel as well as from a source checkout.
"""

"""sd-triton: Stable Diffusion served by NVIDIA Triton Inference Server.

The project's parts live in the top-level folders and are importable as
``sd_triton.<part>``: ``export`` (checkpoint -> model repository),
``pipeline`` (the sampler loop, shipped inside the model repository),
``server`` (launcher for the pip-installed tritonserver), ``client``
(gRPC client library and command line) and ``benchmarks``.
"""

__version__ = "0.1.0"

"""sd-triton: Stable Diffusion served by NVIDIA Triton Inference Server.

The project's parts live in the top-level folders and are importable as
``sd_triton.<part>``: ``export`` (checkpoint -> model repository),
``model_repository`` (the hand-written Triton models it copies in; the
sampler loop itself is the ``sd_pipeline`` package, shipped inside the
repository under that name), ``server`` (launcher for the pip-installed
tritonserver), ``client`` (gRPC client library and command line) and
``benchmarks``.
"""

__version__ = "0.1.0"

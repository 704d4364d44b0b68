"""Run the pip-installed ``tritonserver`` (from the nvidia-pytriton wheel) on a model repository."""

from .launcher import Ports, ServerError, TritonServer, main

__all__ = ["Ports", "ServerError", "TritonServer", "main"]

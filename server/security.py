"""Who may do what on a node: the admin key, the listening address and gRPC TLS.

Triton's admin APIs (model repository load/unload/index, shared memory,
logging, trace) can run code on the node (a ``load`` may carry a ``model.py``),
take models away or make the log record request data, so every server started
here restricts them to requests carrying the node's admin key
(``--http-restricted-api`` / ``--grpc-restricted-protocol``). Inference,
health, metadata, model configuration and statistics stay open. With no key
configured the admin APIs are restricted to a random key that is thrown away:
off, never open. docs/security.md is the threat model.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sd_pipeline.spec import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE_ENV,
    ADMIN_KEY_HEADER,
)

__all__ = [
    "ADMIN_APIS",
    "LOOPBACK",
    "GrpcTls",
    "SecurityError",
    "admin_args",
    "listen_args",
    "read_admin_key",
]

# Triton's names for the restricted groups (the same on HTTP and gRPC).
ADMIN_APIS = ("model-repository", "shared-memory", "logging", "trace")
LOOPBACK = "127.0.0.1"
MIN_KEY_LENGTH = 16
# Characters Triton's "<apis>:<header>=<key>" option and an HTTP header carry as they are.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]+")
_MAKE_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
# Triton flags the launcher sets itself; passing them through would undo its choices.
GUARDED_FLAGS = (
    "--http-restricted-api",
    "--grpc-restricted-protocol",
    "--model-control-mode",
    "--http-address",
    "--grpc-address",
    "--metrics-address",
    "--grpc-use-ssl",
    "--grpc-use-ssl-mutual",
    "--grpc-server-cert",
    "--grpc-server-key",
    "--grpc-root-cert",
)


class SecurityError(ValueError):
    """A key, address or TLS setting the launcher refuses; the message says why."""


def check_admin_key(key: str) -> str:
    if len(key) < MIN_KEY_LENGTH or not _KEY_PATTERN.fullmatch(key):
        raise SecurityError(
            f"the admin key must be at least {MIN_KEY_LENGTH} characters of A-Z a-z 0-9 . _ ~ + / = -"
            f" (make one with: {_MAKE_KEY})"
        )
    return key


def read_admin_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The node's admin key from ``SD_TRITON_ADMIN_KEY`` or the file ``SD_TRITON_ADMIN_KEY_FILE`` names.

    None when neither is set. A file (a Docker or Kubernetes secret) keeps the
    key out of the environment of every process started from the shell.
    """
    environ = os.environ if environ is None else environ
    value, path = environ.get(ADMIN_KEY_ENV), environ.get(ADMIN_KEY_FILE_ENV)
    if value and path:
        raise SecurityError(f"set {ADMIN_KEY_ENV} or {ADMIN_KEY_FILE_ENV}, not both")
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as e:
            raise SecurityError(f"{ADMIN_KEY_FILE_ENV}: cannot read {path}: {e.strerror}") from None
        if not value:
            raise SecurityError(f"{ADMIN_KEY_FILE_ENV}: {path} is empty")
    return check_admin_key(value) if value else None


def admin_args(key: str | None, model_control: str) -> list[str]:
    """Triton flags that put the admin APIs behind ``key`` on HTTP and gRPC.

    No key: the APIs are restricted to a random key nobody is told, and
    explicit model control (loading models through the API) is refused.
    """
    if key is None and model_control == "explicit":
        raise SecurityError(
            "explicit model control needs an admin key: without one anyone who reaches the "
            f"server could load models (run code) on it; set {ADMIN_KEY_ENV} or "
            f"{ADMIN_KEY_FILE_ENV} (make a key with: {_MAKE_KEY})"
        )
    key = secrets.token_urlsafe(32) if key is None else check_admin_key(key)
    group = f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}={key}"
    return [f"--http-restricted-api={group}", f"--grpc-restricted-protocol={group}"]


def listen_args(address: str) -> list[str]:
    """Bind HTTP, gRPC and metrics to ``address`` (Triton's own default is every interface)."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise SecurityError(
            f"--listen takes an IP address (127.0.0.1, 0.0.0.0, ::), not {address!r}"
        ) from None
    return [f"--{api}-address={address}" for api in ("http", "grpc", "metrics")]


def connect_host(address: str) -> str:
    """Where a local client reaches a server listening on ``address``."""
    if ipaddress.ip_address(address).is_unspecified:
        return LOOPBACK
    return f"[{address}]" if ":" in address else address


@dataclass(frozen=True)
class GrpcTls:
    """TLS on the gRPC port: the server's PEM certificate and key.

    ``client_ca``: also require a client certificate signed by this CA
    (mutual TLS). The HTTP and metrics ports stay plain text: keep them on
    loopback or behind a TLS proxy (docs/security.md).
    """

    cert: str | os.PathLike
    key: str | os.PathLike
    client_ca: str | os.PathLike | None = None

    def args(self) -> list[str]:
        files = {"cert": self.cert, "key": self.key, "client_ca": self.client_ca}
        for what, path in files.items():
            if path is not None and not Path(path).is_file():
                raise SecurityError(f"gRPC TLS {what}: {path} is not a file")
        out = [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={Path(self.cert).resolve()}",
            f"--grpc-server-key={Path(self.key).resolve()}",
        ]
        if self.client_ca is not None:
            out += [
                "--grpc-use-ssl-mutual=true",
                f"--grpc-root-cert={Path(self.client_ca).resolve()}",
            ]
        return out


def check_extra_args(extra: list[str] | tuple[str, ...]) -> None:
    """Refuse pass-through Triton flags that would override the launcher's security settings."""
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in GUARDED_FLAGS:
            raise SecurityError(
                f"{flag} is set by the launcher (admin key, --listen, --model-control, --grpc-tls-*); "
                "use those options instead"
            )

"""Start, wait for and stop the ``tritonserver`` that ships in the nvidia-pytriton wheel.

The wheel carries a complete Triton 2.51 server with the Python backend, so a
model repository can be served on any Linux machine with pip, no container
and no GPU. Tests, the demo and users without Docker all start it here::

    with TritonServer("build/model_repository") as server:
        print(server.grpc_url)          # "127.0.0.1:8001"

or from the shell, in the foreground::

    sd-triton-server build/model_repository --grpc-port 8001

Either way the server listens on loopback unless told otherwise (``listen=``,
``--listen``) and its admin APIs need the node's admin key (``server/security.py``,
docs/security.md). ``tritonserver=`` runs another installation's binary, as in
NVIDIA's image (``docker-compose.yml``).

What it takes to run the binary (see DESIGN.md): a backends folder laid out
as Triton expects, the interpreter's ``libpython`` and the wheel's bundled
libraries on ``LD_LIBRARY_PATH``, and this interpreter's ``bin/`` first on
``PATH`` so that the Python backend's stub picks up this environment's
packages.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sd_pipeline.spec import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE_ENV,
    ADMIN_KEY_GRPC_HEADER,
    ADMIN_KEY_HEADER,
)

from .security import (
    LOOPBACK,
    GrpcTls,
    SecurityError,
    admin_args,
    check_extra_args,
    connect_host,
    listen_args,
    read_admin_key,
)
from .watchdog import Watchdog

log = logging.getLogger(__name__)

SHM_PATTERN = "/dev/shm/triton_python_backend_shm_region_*"
# tritonserver's --exit-timeout-secs default, and what stop() waits beyond it.
TRITON_EXIT_TIMEOUT_S = 30.0
STOP_MARGIN_S = 30.0


class ServerError(RuntimeError):
    """The server could not be found, did not start, or died."""


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        """Three ports the OS says are free right now (for tests)."""
        socks = []
        try:
            for _ in range(3):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            return cls(*(s.getsockname()[1] for s in socks))
        finally:
            for s in socks:
                s.close()


def pytriton_root() -> Path:
    """Folder of the tritonserver distribution inside the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ServerError(
            "nvidia-pytriton is not installed; install the server extra: pip install 'sd-triton[server]'"
        ) from e
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise ServerError(f"no tritonserver binary under {root}")
    return root


def prepare_backends(dest: Path) -> Path:
    """Lay out ``dest/python/`` as Triton's --backend-directory expects."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the pytriton wheel has no Python backend stub for Python {version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        target = python_dir / src.name
        if not target.exists():
            shutil.copy2(src, target)
    return dest


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    libs = Path(pytriton_root()).parent.parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [str(libs), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in parts if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # One stub process per model instance; each would otherwise start as many
    # BLAS threads as there are cores.
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


class TritonServer:
    """A ``tritonserver`` process on a model repository; a context manager.

    ``ports=None`` picks free ports (tests); pass ``Ports()`` for the
    standard 8000/8001/8002. ``listen``: the address every port binds to
    (loopback by default; ``"0.0.0.0"`` exposes the node). ``admin_key``: the
    key the admin APIs require (None: read from the environment, see
    :func:`~sd_triton.server.security.read_admin_key`; none there: admin APIs
    off). ``model_control="explicit"`` (needs a key) starts with no model
    loaded unless named in ``load_models``. ``grpc_tls``: serve gRPC over TLS.
    ``tritonserver``: path of another installation's binary (its own backends
    and libraries) instead of the nvidia-pytriton wheel's.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        ports: Ports | None = None,
        model_control: str = "none",
        load_models: Sequence[str] = (),
        log_verbose: int = 0,
        log_file: str | os.PathLike | None = None,
        extra_args: Sequence[str] = (),
        listen: str = LOOPBACK,
        admin_key: str | None = None,
        grpc_tls: GrpcTls | None = None,
        tritonserver: str | os.PathLike | None = None,
    ) -> None:
        # Object storage (s3://, gs://, as://) is Triton's to read; a folder must exist here.
        self.repository: Path | str = str(repository)
        if "://" not in self.repository:
            self.repository = Path(repository).resolve()
            if not self.repository.is_dir():
                raise ServerError(f"model repository {self.repository} does not exist")
        self.ports = ports or Ports.free()
        self.model_control = model_control
        self.listen = listen
        self.grpc_tls = grpc_tls
        self.tritonserver = Path(tritonserver) if tritonserver else None
        try:
            self.admin_key = read_admin_key() if admin_key is None else admin_key
            # Checked now, not at start: a refused setting fails before anything runs.
            admin_args(self.admin_key, model_control)
            listen_args(listen)
            check_extra_args(extra_args)
        except SecurityError as e:
            raise ServerError(str(e)) from None
        self.load_models = tuple(load_models)
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self._workdir = Path(tempfile.mkdtemp(prefix="sd-triton-server-"))
        # "-": the server writes to this process's stdout (a container's log).
        self.log_to_stdout = str(log_file) == "-"
        self.log_path = Path(log_file) if log_file else self._workdir / "tritonserver.log"
        self._proc: subprocess.Popen | None = None
        self._log_handle = None

    # ------------------------------------------------------------------ urls
    @property
    def grpc_url(self) -> str:
        return f"{connect_host(self.listen)}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"{connect_host(self.listen)}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{connect_host(self.listen)}:{self.ports.metrics}/metrics"

    @property
    def http_admin_headers(self) -> dict[str, str]:
        """Headers that let an HTTP request through to the admin APIs (empty without a key)."""
        return {ADMIN_KEY_HEADER: self.admin_key} if self.admin_key else {}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """The same for gRPC (``headers=`` of tritonclient.grpc's calls)."""
        return {ADMIN_KEY_GRPC_HEADER: self.admin_key} if self.admin_key else {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ------------------------------------------------------------- lifecycle
    def command(self) -> list[str]:
        if self.tritonserver is not None:
            cmd = [str(self.tritonserver), f"--model-repository={self.repository}"]
        else:
            self._workdir.mkdir(parents=True, exist_ok=True)
            backends = prepare_backends(self._workdir / "backends")
            cmd = [
                str(pytriton_root() / "bin" / "tritonserver"),
                f"--model-repository={self.repository}",
                f"--backend-directory={backends}",
                "--pinned-memory-pool-byte-size=0",
                "--allow-gpu-metrics=false",
            ]
        cmd += [
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            *listen_args(self.listen),
            *admin_args(self.admin_key, self.model_control),
            *(self.grpc_tls.args() if self.grpc_tls else ()),
            f"--model-control-mode={self.model_control}",
            f"--log-verbose={self.log_verbose}",
        ]
        cmd += [f"--load-model={m}" for m in self.load_models]
        return cmd + list(self.extra_args)

    def start(self, *, wait: bool = True, timeout_s: float = 120.0) -> TritonServer:
        if self._proc is not None:
            raise ServerError("server already started")
        try:
            cmd = self.command()
        except SecurityError as e:
            raise ServerError(str(e)) from None
        log.info("starting %s", " ".join(_redact(cmd)))
        self._workdir.mkdir(parents=True, exist_ok=True)
        if not self.log_to_stdout:
            self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log_handle,
            stderr=None if self.log_to_stdout else subprocess.STDOUT,
            env=self._env(),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if wait:
            try:
                self.wait_until_ready(timeout_s)
            except BaseException:
                self.stop()
                raise
        return self

    def _env(self) -> dict[str, str]:
        """The server's environment, without the admin key (model code has no use for it)."""
        env = dict(os.environ) if self.tritonserver else server_env()
        env.pop(ADMIN_KEY_ENV, None)
        return env

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def is_live(self) -> bool:
        return self._get("/v2/health/live") == 200

    def wait_until_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the server and every model are ready; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ServerError(
                    f"tritonserver exited (code {code}) before it was ready:\n{self.log_tail()}"
                )
            if self.is_ready():
                log.info("tritonserver ready: grpc %s, http %s", self.grpc_url, self.http_url)
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_to_stdout:
            return "(the server's log is this process's output)"
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def exit_timeout_s(self) -> float:
        """How long tritonserver drains in-flight requests after SIGTERM (--exit-timeout-secs)."""
        value = None
        for arg, following in zip(self.extra_args, (*self.extra_args[1:], None), strict=False):
            if arg.startswith("--exit-timeout-secs="):
                value = arg.partition("=")[2]
            elif arg == "--exit-timeout-secs":
                value = following
        return TRITON_EXIT_TIMEOUT_S if value is None else float(value)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait; SIGKILL only as a last resort (then clean its /dev/shm regions).

        The default wait is the server's drain time plus :data:`STOP_MARGIN_S`
        (to unload the models), so a drain is never cut short.
        """
        if timeout_s is None:
            timeout_s = self.exit_timeout_s + STOP_MARGIN_S
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing it", timeout_s)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    _remove_orphan_shm()
            code = proc.returncode
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        # Backends copy and (unless a log_file was given) the log go with the process.
        shutil.rmtree(self._workdir, ignore_errors=True)
        return code

    def __enter__(self) -> TritonServer:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _redact(cmd: list[str]) -> list[str]:
    """The command line as logged: admin keys replaced."""
    marker = f":{ADMIN_KEY_HEADER}="
    return [a[: a.index(marker) + len(marker)] + "<key>" if marker in a else a for a in cmd]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the server when the process that started it dies.

    A test run killed midway, or a demo interrupted hard, must not leave a
    tritonserver (and its backend processes) running in the background.
    """
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _remove_orphan_shm() -> None:
    """Remove Python-backend shared-memory regions no live process holds open."""
    held = set()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    held.add(os.readlink(os.path.join(fd_dir, fd)))
    for path in glob.glob(SHM_PATTERN):
        if path not in held:
            with contextlib.suppress(OSError):
                os.unlink(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd-triton-server",
        description="Serve a model repository with the tritonserver from the nvidia-pytriton wheel, "
        "in the foreground. Options it does not know go to tritonserver as they are.",
        epilog=f"The admin key is read from {ADMIN_KEY_ENV} or from the file {ADMIN_KEY_FILE_ENV} "
        "names, never from the command line; without one the admin APIs are off. "
        "docs/security.md has the details.",
    )
    parser.add_argument("repository", help="model repository (output of sd-triton-export)")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    parser.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002))
    )
    parser.add_argument(
        "--listen",
        default=LOOPBACK,
        metavar="ADDRESS",
        help="address the three ports bind to (default %(default)s; 0.0.0.0 exposes the node)",
    )
    parser.add_argument(
        "--model-control",
        choices=("none", "poll", "explicit"),
        default="none",
        help="explicit (load/unload through the API) needs the admin key",
    )
    parser.add_argument(
        "--load-model", action="append", default=[], help="with --model-control explicit"
    )
    tls = parser.add_argument_group("gRPC TLS (the environment variable is the default)")
    for option, env, text in (
        ("--grpc-tls-cert", "SD_TRITON_GRPC_TLS_CERT", "server certificate (PEM): turns TLS on"),
        ("--grpc-tls-key", "SD_TRITON_GRPC_TLS_KEY", "server private key (PEM)"),
        ("--grpc-tls-client-ca", "SD_TRITON_GRPC_TLS_CLIENT_CA", "require client certificates signed by this CA"),
    ):  # fmt: skip
        tls.add_argument(
            option, default=os.environ.get(env) or None, metavar="FILE", help=f"{text} [{env}]"
        )
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument(
        "--log-file",
        metavar="PATH",
        help="the server's log (default: a temporary file; '-': this process's output, for containers)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for readiness"
    )
    parser.add_argument(
        "--tritonserver",
        metavar="BINARY",
        help="another installation's tritonserver (NVIDIA's image: /opt/tritonserver/bin/tritonserver)",
    )
    return parser


def server_from_args(args: argparse.Namespace, extra: Sequence[str]) -> TritonServer:
    """The server the command line describes; the admin key comes from the environment."""
    tls = None
    if args.grpc_tls_cert or args.grpc_tls_key or args.grpc_tls_client_ca:
        if not (args.grpc_tls_cert and args.grpc_tls_key):
            raise ServerError("gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key")
        tls = GrpcTls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca)
    return TritonServer(
        args.repository,
        ports=Ports(args.http_port, args.grpc_port, args.metrics_port),
        model_control=args.model_control,
        load_models=args.load_model,
        log_verbose=args.log_verbose,
        log_file=args.log_file,
        extra_args=extra,
        listen=args.listen,
        grpc_tls=tls,
        tritonserver=args.tritonserver,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        server = server_from_args(args, extra)
        server.start(timeout_s=args.timeout)
    except ServerError as e:
        print(f"sd-triton-server: {e}", file=sys.stderr)
        return 1
    admin = "admin APIs need the key" if server.admin_key else "admin APIs off (no key)"
    print(
        f"ready: gRPC {server.grpc_url}{' (TLS)' if server.grpc_tls else ''}  HTTP {server.http_url}"
        f"  metrics {server.metrics_url}  listening on {server.listen}; {admin}"
        f"  (log: {server.log_path}; Ctrl-C to stop)",
        flush=True,
    )
    return _serve_until_stopped(server)


def _serve_until_stopped(server: TritonServer) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    died = False
    watchdog = Watchdog(server)  # restarts tritonserver when a backend stub dies
    try:
        while not stop.wait(0.5):
            if server._proc is None or server._proc.poll() is not None:
                died = True
                print(
                    f"sd-triton-server: tritonserver exited:\n{server.log_tail()}", file=sys.stderr
                )
                break
            if not watchdog.check():
                died = True
                break
    finally:
        code = server.stop()
    return 0 if not died else (code or 1)


if __name__ == "__main__":
    sys.exit(main())

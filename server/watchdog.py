"""Notice a Python-backend stub that died under a running tritonserver, and heal the node.

Each Python-backend model instance (every component and pipeline model of an
sd-triton repository) runs in its own ``triton_python_backend_stub`` process,
a child of ``tritonserver``. When one dies (the OOM killer, a crash), Triton
2.51 does not notice: every image request then fails with "Stub process
'unet_0' is not healthy" while ``/v2/health/ready`` and the model's own
readiness keep answering 200, for as long as the process runs. Measured here.

The dead stub stays behind as a zombie child of ``tritonserver`` (Triton
reaps its stubs only when it unloads the instance), so a zombie
``triton_python_b`` (the kernel's 15-character name of the stub) among the
server's children means exactly "an instance whose process is gone". This
module looks for that, and :class:`Watchdog` restarts the server when it
sees it: SIGTERM (readiness drops at once; in-flight requests end with
UNAVAILABLE, which clients retry), SIGKILL after ``drain_s`` (the unload of
the dead instance waits for ``--exit-timeout-secs``, 30 s by default), then
a fresh start on the same ports.

Kubernetes runs ``tritonserver`` without this launcher; there the same test
is a probe command (:data:`PROBE_COMMAND`, used by the Helm chart):
readiness fails while a stub is dead, liveness fails and the kubelet
restarts the container.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

STUB_COMM = "triton_python_b"  # /proc/PID/comm of triton_python_backend_stub (15 chars)

# Exit status 1 while any stub in the container is a zombie, else 0.
PROBE_COMMAND = [
    "sh",
    "-c",
    f"! grep -qs '^[0-9]* ({STUB_COMM}) Z ' /proc/[0-9]*/stat",
]


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, parent pid) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return comm, state, int(ppid)


def stub_processes(server_pid: int) -> dict[int, str]:
    """The server's stub children: pid -> state (``S``, ``R``, ... ``Z`` for a dead one)."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat and stat[0] == STUB_COMM and stat[2] == server_pid:
            stubs[int(entry.name)] = stat[1]
    return stubs


def stub_instance(pid: int) -> str | None:
    """The model instance a live stub runs (``unet_0``, the name in Triton's errors), from its argv."""
    with contextlib.suppress(OSError, IndexError):
        # stub, model.py, shm region, shm sizes (2), parent pid, lib dir, ipc handle, instance name
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[8].decode()
    return None


def dead_stubs(server_pid: int) -> list[int]:
    """Stub children of the server that have exited but are still held by their instance."""
    return sorted(pid for pid, state in stub_processes(server_pid).items() if state == "Z")


class Watchdog:
    """Restart ``server`` (a :class:`~sd_triton.server.TritonServer`) when one of its stubs dies.

    Call :meth:`check` every ``poll`` (the launcher does, every 0.5 s). A
    dead stub must be seen on two checks in a row (a stub that an unload is
    reaping is a zombie for a moment). ``start_timeout_s``: how long the
    restarted server may take to be ready again.

    A restart heals a stub killed once (the OOM killer on one large request);
    a stub that dies again and again (a model that crashes every request, a
    node short of memory) would have the node restart forever. After
    ``max_restarts`` restarts within ``window_s``, :meth:`check` gives up
    (False, nothing restarted): the launcher exits non-zero and the
    orchestrator's restart policy, with its own backoff, takes over.
    """

    def __init__(
        self,
        server,
        *,
        drain_s: float = 10.0,
        start_timeout_s: float = 300.0,
        max_restarts: int = 3,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.drain_s = drain_s
        self.start_timeout_s = start_timeout_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.restarts = 0
        self._restarted_at: list[float] = []
        self._instances: dict[int, str] = {}
        self._suspects: set[int] = set()
        self._clock = clock

    def dead_instances(self) -> dict[int, str]:
        """Dead stubs seen on this check and the previous one: pid -> instance name."""
        pid = self.server.pid
        if pid is None:
            return {}
        stubs = stub_processes(pid)
        for stub, state in stubs.items():
            if state != "Z" and stub not in self._instances:
                self._instances[stub] = stub_instance(stub) or "?"
        dead = {p for p, state in stubs.items() if state == "Z"}
        confirmed, self._suspects = dead & self._suspects, dead
        return {p: self._instances.get(p, "?") for p in sorted(confirmed)}

    def check(self) -> bool:
        """Heal the server if a stub died; False when the restarted server did not come up."""
        dead = self.dead_instances()
        if not dead:
            return True
        names = ", ".join(f"{name} (pid {pid})" for pid, name in dead.items())
        start = self._clock()
        recent = [t for t in self._restarted_at if start - t < self.window_s]
        if len(recent) >= self.max_restarts:
            log.error(
                "watchdog: stub process of %s died after %d restarts in %.0f s; giving up "
                "(the orchestrator restarts the node)",
                names,
                len(recent),
                self.window_s,
            )
            return False
        self._restarted_at = [*recent, start]
        log.error("watchdog: stub process of %s died; restarting tritonserver", names)
        self.server.stop(timeout_s=self.drain_s)
        self._instances.clear()
        self._suspects.clear()
        try:
            self.server.start(timeout_s=self.start_timeout_s)
        except Exception as e:  # noqa: BLE001 - reported; the caller exits and its orchestrator takes over
            log.error("watchdog: tritonserver did not come back: %s", e)
            return False
        self.restarts += 1
        log.warning("watchdog: tritonserver ready again after %.1f s", self._clock() - start)
        return True

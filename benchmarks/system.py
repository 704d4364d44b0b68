"""What the numbers were measured on: machine, versions, and memory of a process tree."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import psutil

PACKAGES = (
    "torch",
    "onnxruntime",
    "onnxruntime-gpu",
    "diffusers",
    "transformers",
    "tritonclient",
    "nvidia-pytriton",
)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return None


def machine() -> dict:
    """CPU model, cores this process may use, RAM, GPU (if any), OS and Python."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_name(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def versions(server_version: str | None = None) -> dict[str, str]:
    """Installed versions of the packages that do the work, plus the server's own."""
    found = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    if server_version:
        found["tritonserver"] = server_version
    return found


def _label(proc: psutil.Process) -> str:
    """'tritonserver', or 'stub:<model>' for a Python-backend stub (its model path names the model)."""
    try:
        cmd = proc.cmdline()
    except (psutil.Error, OSError):
        return "?"
    if cmd and cmd[0].endswith("triton_python_backend_stub") and len(cmd) > 1:
        parts = Path(cmd[1]).parts  # <repo>/<model>/<version>/model.py
        return f"stub:{parts[-3]}" if len(parts) >= 3 else "stub"
    return Path(cmd[0]).name if cmd else proc.name()


def tree_memory(pid: int, *, tree: bool = True) -> dict[str, int]:
    """RSS (bytes) of a process and (``tree``) every descendant, by label; vanished ones are skipped."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if tree else [root]
    except psutil.Error:
        return {}
    out: dict[str, int] = {}
    for proc in procs:
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            continue
        label = _label(proc)
        out[label] = out.get(label, 0) + rss
    return out


def process_memory(pid: int) -> list[dict]:
    """RSS and USS (bytes) of a process and each descendant, labelled as in :func:`tree_memory`.

    USS (unique set size) is what the process alone holds: the memory one more
    such process would add, since shared libraries and the page cache are
    counted once on the machine, not per process.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        out.append({"label": _label(proc), "pid": proc.pid, "rss": info.rss, "uss": info.uss})
    return out


@dataclass
class MemorySampler:
    """Samples a process tree's total RSS in a background thread; keeps the peak and the breakdown there."""

    pid: int
    interval_s: float = 0.5
    tree: bool = True  # False: this process alone (the harness, whose child the server may be)
    peak_bytes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    last_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def sample(self) -> int:
        breakdown = tree_memory(self.pid, tree=self.tree)
        total = sum(breakdown.values())
        self.last_bytes = total
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_breakdown = total, breakdown
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def _busy_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _cpu_s(pid: int | None, *, tree: bool = True) -> float:
    """CPU seconds (user + system) of a process, and of its descendants with ``tree``."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if tree else [root]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


class CpuAccount:
    """CPU seconds used during a block: by the server's tree, by this process, by everyone else.

    On a shared machine, "others" (system-wide busy time minus the two) says
    how much foreign load a measurement ran under: ``others_cores`` is that
    load in cores on average over the block.
    """

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self.result: dict[str, float] = {}

    def _now(self) -> tuple[float, float, float, float]:
        own = _cpu_s(os.getpid(), tree=False)  # the server may be our child: not the tree
        return time.perf_counter(), _busy_s(), _cpu_s(self.server_pid), own

    def __enter__(self) -> CpuAccount:
        self._start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, server, own = (b - a for a, b in zip(self._start, self._now(), strict=True))
        others = max(busy - server - own, 0.0)
        self.result = {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(server, 3),
            "harness_cpu_s": round(own, 3),
            "others_cpu_s": round(others, 3),
            "others_cores": round(others / wall, 2) if wall else 0.0,
        }


def sum_accounts(results: list[dict[str, float]]) -> dict[str, float]:
    """Several :class:`CpuAccount` results as one (seconds added, cores recomputed)."""
    keys = ("wall_s", "server_cpu_s", "harness_cpu_s", "others_cpu_s")
    total = {k: round(sum(r.get(k, 0.0) for r in results), 3) for k in keys}
    wall = total["wall_s"]
    total["others_cores"] = round(total["others_cpu_s"] / wall, 2) if wall else 0.0
    return total

"""A bounded soak of the session server: mixed traffic from several clients at once.

A few hundred tiny-model requests of mixed sizes, schedulers, image counts,
cancellations and bad inputs from ``CLIENTS`` concurrent clients, bounded in
count and in time. Every good request must return the same image as when
sent alone (within one uint8 level), every bad one its INVALID_ARG, every
cancelled one a CancelledError (or its image, if it finished first). After
warm-up, the RSS of the server's process tree and the Python backend's
``/dev/shm`` regions must stay flat, and no backend process may die. The
figures are printed (run with ``-s``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from polling import metric, scrape, wait_until

from sd_triton.client import CancelledError, Client, InvalidRequestError

pytestmark = pytest.mark.server

CLIENTS = 4
REQUESTS = 200  # at most; the time budget may stop it earlier
WARMUP = 30
TIME_BUDGET_S = 75.0
MIN_REQUESTS = 60  # fewer than this in the budget means the server is stuck, not slow
RSS_GROWTH_LIMIT = 0.10  # of the warm RSS
SHM_GROWTH_LIMIT = 64 * 2**20

GOOD = [
    {"seed": 1, "height": 32, "width": 32, "num_inference_steps": 2},
    {"seed": 2, "height": 32, "width": 48, "num_inference_steps": 3, "scheduler": "euler_a"},
    {"seed": 3, "height": 48, "width": 32, "num_inference_steps": 2, "scheduler": "ddim"},
    {"seed": 4, "height": 32, "width": 32, "num_inference_steps": 3, "num_images_per_prompt": 2},
    {"seed": 5, "height": 64, "width": 64, "num_inference_steps": 2, "scheduler": "dpmpp_2m"},
    {"seed": 6, "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 1.0},
    {"seed": 7, "height": 16, "width": 32, "num_inference_steps": 2, "negative_prompt": "blur"},
]
BAD = [
    ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
    ({"scheduler": "nope"}, "unknown scheduler 'nope'"),
    ({"height": 30}, "height must be a positive multiple"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"prompt": "x" * 100_000}, "over this model's limit of 16384 bytes"),
    ({"num_images_per_prompt": 8, "num_inference_steps": 101, "height": 64}, "work budget"),
]
CANCEL = {"height": 64, "width": 64, "num_inference_steps": 40}


def _children(pid: int) -> list[int]:
    kids = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            kids += [int(c) for c in Path(task).read_text().split()]
    return kids


def server_tree(pid: int) -> set[int]:
    """``pid`` and its descendants (the Python backend's stub processes)."""
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += _children(p)
    return tree


def tree_rss(pid: int) -> tuple[int, set[int]]:
    """Summed RSS (bytes) and pids of ``pid`` and its descendants."""
    pids, total = server_tree(pid), 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total, pids


def shm_bytes(pid: int) -> int:
    """Allocated bytes of the /dev/shm regions the server's processes hold open."""
    paths = set()
    for p in server_tree(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{p}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        paths.add(target)
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += os.stat(path).st_blocks * 512  # allocated, not apparent, size
    return total


def finished_and_queued(metrics_url: str) -> tuple[float, float]:
    """(requests the pipeline model has finished, successes and failures; requests in its queue)."""
    text, model = scrape(metrics_url), "stable_diffusion"
    finished = metric(text, "nv_inference_request_success", model=model) + metric(
        text, "nv_inference_request_failure", model=model
    )
    return finished, metric(text, "nv_inference_pending_request_count", model=model)


def wait_until_quiet(metrics_url: str, finished_before: float, answered: int) -> None:
    """Return once the queue is empty and the server counts every request a client got an answer to.

    A cancelled request the client gave up on may still be finishing its
    current step, or may never have reached the server: those are not waited for.
    """

    def quiet():
        finished, queued = finished_and_queued(metrics_url)
        return queued == 0 and finished - finished_before >= answered

    wait_until(quiet, f"an empty queue and {answered} requests counted", timeout_s=30)


def one(url: str, kind: str, index: int, expected: dict) -> str:
    try:
        return _one(url, kind, index, expected)
    except Exception as e:  # noqa: BLE001 - counted and reported, then the test fails
        return f"UNEXPECTED {type(e).__name__}: {e}"[:200]


def _one(url: str, kind: str, index: int, expected: dict) -> str:
    with Client(url, timeout_s=120) as client:
        if kind == "good":
            options = GOOD[index]
            result = client.generate("a soak test", **options)
            got = np.stack([np.asarray(im) for im in result.images]).astype(int)
            diff = int(np.abs(got - expected[index]).max())
            return "good" if diff <= 1 else f"MISMATCH {index}: {diff}"
        if kind == "bad":
            inputs, message = BAD[index]
            options = {"height": 32, "width": 32, "num_inference_steps": 2, **inputs}
            prompt = options.pop("prompt", "a soak test")
            try:
                client.generate(prompt, **options)
            except InvalidRequestError as e:
                return "invalid" if message in str(e) else f"WRONG MESSAGE: {e}"
            return "BAD ACCEPTED"
        pending = client.submit("a cancelled soak test", seed=index, **CANCEL)
        # Not a wait for anything: cancel at a different moment each time (queued,
        # denoising, decoding), which is what the soak varies.
        time.sleep(random.Random(index).uniform(0.0, 0.3))
        pending.cancel()
        try:
            pending.result(timeout_s=120)
            return "finished before cancel"
        except CancelledError:
            return "cancelled"


def test_soak_mixed_traffic_stays_correct_and_flat(triton_server, triton_url):
    with Client(triton_url) as client:
        expected = {
            i: np.stack([np.asarray(im) for im in client.generate("a soak test", **o).images])
            for i, o in enumerate(GOOD)
        }
    rng = random.Random(20261122)
    plan = []
    for _ in range(REQUESTS):
        r = rng.random()
        kind = "good" if r < 0.7 else "bad" if r < 0.9 else "cancel"
        pool_size = {"good": len(GOOD), "bad": len(BAD), "cancel": 1000}[kind]
        plan.append((kind, rng.randrange(pool_size)))

    outcomes: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + TIME_BUDGET_S
    warm = {}

    def run(item):
        if time.monotonic() > deadline:
            return
        answer = one(triton_url, item[0], item[1], expected)
        with lock:
            outcomes[answer] += 1
            if sum(outcomes.values()) == WARMUP:
                warm["rss"], warm["pids"] = tree_rss(triton_server.pid)
                warm["shm"] = shm_bytes(triton_server.pid)

    rss_before, pids_before = tree_rss(triton_server.pid)
    shm_before = shm_bytes(triton_server.pid)
    finished_before, _ = finished_and_queued(triton_server.metrics_url)
    start = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(run, plan))
    elapsed = time.monotonic() - start
    wait_until_quiet(
        triton_server.metrics_url, finished_before, sum(outcomes.values()) - outcomes["cancelled"]
    )
    rss_after, pids_after = tree_rss(triton_server.pid)
    shm_after = shm_bytes(triton_server.pid)
    total = sum(outcomes.values())
    mib = 2**20
    print(
        f"\nsoak: {total} requests in {elapsed:.1f} s from {CLIENTS} clients: {dict(outcomes)}\n"
        f"server tree RSS: before {rss_before / mib:.0f} MiB, after warm-up "
        f"{warm.get('rss', 0) / mib:.0f} MiB, after {rss_after / mib:.0f} MiB; "
        f"/dev/shm: before {shm_before / mib:.1f} MiB, after warm-up "
        f"{warm.get('shm', 0) / mib:.1f} MiB, after {shm_after / mib:.1f} MiB; "
        f"processes {len(pids_before)} -> {len(pids_after)}"
    )
    assert total >= MIN_REQUESTS, outcomes
    bad = {k: v for k, v in outcomes.items() if k not in ("good", "invalid", "cancelled")}
    bad.pop("finished before cancel", None)
    assert not bad, outcomes
    assert pids_after == pids_before, "a backend process died or was replaced"
    assert rss_after <= warm["rss"] * (1 + RSS_GROWTH_LIMIT), (warm["rss"], rss_after)
    assert shm_after <= warm["shm"] + SHM_GROWTH_LIMIT, (warm["shm"], shm_after)
    with Client(triton_url) as client:
        assert client.is_ready()

"""StepMerger (sd_pipeline/step_merger.py): concurrent UNet calls merged into one run.

Fast, no server. Each test drives real threads deterministically: the run
function blocks the first run on an event while the other threads queue
behind it (the test waits until they are queued), so which calls go together
is fixed, not a matter of timing.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from sd_pipeline.step_merger import StepMerger

TIMEOUT_S = 10


def inputs(tag: int, rows: int) -> dict[str, np.ndarray]:
    """A call's inputs: ``rows`` rows that all say ``tag``."""
    return {"sample": np.full((rows, 3), tag, np.float32), "t": np.full((rows, 1), tag)}


class Recorder:
    """A ``run_batched`` that records its runs (thread, calls' tags) and answers each call
    with its own rows (sample + 1000, so a call that got another's rows shows it).

    ``hold``: the first run blocks until :attr:`release` is set. ``fail``: a tag ->
    the exception that call gets in the result list; ``raise_on``: a tag whose run
    raises for the whole batch.
    """

    def __init__(self, hold: bool = False, fail=None, raise_on=None):
        self.runs: list[tuple[int, list[int]]] = []
        self.observed: list[tuple[int, int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail = fail or {}
        self.raise_on = raise_on
        self.lock = threading.Lock()

    def __call__(self, batches):
        tags = [int(b["sample"][0, 0]) for b in batches]
        with self.lock:
            first = not self.runs
            self.runs.append((threading.get_ident(), tags))
        if first:
            self.started.set()
            assert self.release.wait(TIMEOUT_S), "the test never released the first run"
        if self.raise_on in tags:
            raise RuntimeError(f"run of {tags} failed")
        return [
            self.fail[tag] if tag in self.fail else {"out": b["sample"] + 1000, "t": b["t"]}
            for tag, b in zip(tags, batches, strict=True)
        ]

    def observe(self, calls: int, rows: int) -> None:
        self.observed.append((calls, rows))


def queued(merger: StepMerger) -> int:
    """Calls waiting for the next run (the merger's queue: the only way to know a thread
    has arrived without timing it)."""
    with merger._cond:
        return len(merger._queue)


def wait_queued(merger: StepMerger, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while queued(merger) != n:
        assert time.monotonic() < deadline, f"{queued(merger)} calls queued, expected {n}"
        time.sleep(0.001)


def call_in_thread(pool, merger, tag, rows) -> tuple[Future, Future]:
    """(the call's result, the ident of the thread that made it)."""
    ident: Future = Future()

    def call():
        ident.set_result(threading.get_ident())
        return merger(inputs(tag, rows))

    return pool.submit(call), ident


def assert_own_rows(result, tag: int, rows: int) -> None:
    np.testing.assert_array_equal(result["out"], np.full((rows, 3), tag + 1000, np.float32))
    np.testing.assert_array_equal(result["t"], np.full((rows, 1), tag))


def held_then_queued(merger, recorder, pool, calls):
    """The first of ``calls`` (tag, rows) runs and is held; the others queue behind it in
    order. Returns each call's (result future, thread ident future)."""
    (tag, rows), rest = calls[0], calls[1:]
    futures = [call_in_thread(pool, merger, tag, rows)]
    assert recorder.started.wait(TIMEOUT_S)
    for n, (tag, rows) in enumerate(rest, 1):
        futures.append(call_in_thread(pool, merger, tag, rows))
        wait_queued(merger, n)
    return futures


def test_a_lone_call_runs_at_once_in_the_callers_thread():
    recorder = Recorder()
    merger = StepMerger(recorder, max_batch=8, observe=recorder.observe)
    result = merger(inputs(7, 2))
    assert_own_rows(result, 7, 2)
    assert recorder.runs == [(threading.get_ident(), [7])]
    assert recorder.observed == [(1, 2)]
    assert queued(merger) == 0
    # And again: nothing left behind by the first call.
    assert_own_rows(merger(inputs(8, 1)), 8, 1)
    assert recorder.observed == [(1, 2), (1, 1)]


def test_calls_that_arrive_during_a_run_go_together_in_the_next():
    recorder = Recorder(hold=True)
    merger = StepMerger(recorder, max_batch=16, observe=recorder.observe)
    calls = [(1, 2), (2, 2), (3, 1), (4, 3)]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = held_then_queued(merger, recorder, pool, calls)
        assert recorder.runs[0][1] == [1] and len(recorder.runs) == 1
        recorder.release.set()
        results = [f.result(TIMEOUT_S) for f, _ in futures]
    for (tag, rows), result in zip(calls, results, strict=True):
        assert_own_rows(result, tag, rows)
    # Two runs: the first call alone, then the three that queued behind it in ONE run.
    assert [tags for _, tags in recorder.runs] == [[1], [2, 3, 4]]
    assert recorder.observed == [(1, 2), (3, 6)]
    # Each run happened on a caller's own thread: the first on its caller's, the merged
    # one on the thread of one of the calls it held (no thread of the merger's own).
    idents = [ident.result() for _, ident in futures]
    assert recorder.runs[0][0] == idents[0]
    assert recorder.runs[1][0] in idents[1:]
    assert queued(merger) == 0


def test_runs_hold_at_most_max_batch_rows():
    recorder = Recorder(hold=True)
    merger = StepMerger(recorder, max_batch=4, observe=recorder.observe)
    # Queued in this order behind the held run: 2 + 3 > 4, so 3 waits; 2 + 2 fits.
    calls = [(1, 1), (2, 2), (3, 3), (4, 2), (5, 4)]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = held_then_queued(merger, recorder, pool, calls)
        recorder.release.set()
        results = [f.result(TIMEOUT_S) for f, _ in futures]
    for (tag, rows), result in zip(calls, results, strict=True):
        assert_own_rows(result, tag, rows)
    runs = [tags for _, tags in recorder.runs]
    rows_of = dict(calls)
    assert all(sum(rows_of[t] for t in tags) <= 4 for tags in runs), runs
    assert sorted(t for tags in runs for t in tags) == [1, 2, 3, 4, 5]  # each call ran once
    # The queue's head first, with whatever fits after it; the rest in arrival order.
    assert runs == [[1], [2, 4], [3], [5]]
    assert recorder.observed == [(1, 1), (2, 4), (1, 3), (1, 4)]


def test_a_call_larger_than_max_batch_runs_alone():
    recorder = Recorder()
    merger = StepMerger(recorder, max_batch=2, observe=recorder.observe)
    assert_own_rows(merger(inputs(1, 5)), 1, 5)
    assert recorder.observed == [(1, 5)]


def test_a_failed_run_fails_the_calls_it_held_and_no_other():
    recorder = Recorder(hold=True, raise_on=3)
    merger = StepMerger(recorder, max_batch=16, observe=recorder.observe)
    calls = [(1, 1), (2, 2), (3, 2)]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = held_then_queued(merger, recorder, pool, calls)
        recorder.release.set()
        assert_own_rows(futures[0][0].result(TIMEOUT_S), 1, 1)
        for future, _ in futures[1:]:  # both calls of the failed run get its exception
            with pytest.raises(RuntimeError, match=r"run of \[2, 3\] failed"):
                future.result(TIMEOUT_S)
    assert recorder.observed == [(1, 1), (2, 4)]
    # The merger keeps working: a lone call, then another merged run.
    assert_own_rows(merger(inputs(4, 1)), 4, 1)
    assert recorder.observed[-1] == (1, 1)
    assert queued(merger) == 0


def test_a_failed_call_in_a_merged_run_fails_only_that_call():
    error = ValueError("call 3's inputs are bad")
    recorder = Recorder(hold=True, fail={3: error})
    merger = StepMerger(recorder, max_batch=16, observe=recorder.observe)
    calls = [(1, 1), (2, 2), (3, 2), (4, 1)]
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = held_then_queued(merger, recorder, pool, calls)
        recorder.release.set()
        with pytest.raises(ValueError) as raised:
            futures[2][0].result(TIMEOUT_S)
        assert raised.value is error
        for i in (0, 1, 3):
            tag, rows = calls[i]
            assert_own_rows(futures[i][0].result(TIMEOUT_S), tag, rows)
    assert [tags for _, tags in recorder.runs] == [[1], [2, 3, 4]]
    assert recorder.observed == [(1, 1), (3, 5)]
    assert_own_rows(merger(inputs(5, 2)), 5, 2)


def test_a_lone_call_gets_its_runs_exception():
    recorder = Recorder(raise_on=1)
    merger = StepMerger(recorder, max_batch=4)  # no observe: nothing to tell
    with pytest.raises(RuntimeError, match="failed"):
        merger(inputs(1, 1))
    assert_own_rows(merger(inputs(2, 1)), 2, 1)


def test_many_threads_each_get_their_own_rows():
    """No hold: whatever merges, every call gets its own rows and each ran exactly once."""
    recorder = Recorder()
    merger = StepMerger(recorder, max_batch=6, observe=recorder.observe)
    calls = [(tag, 1 + tag % 3) for tag in range(1, 41)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: merger(inputs(*c)), calls))
    for (tag, rows), result in zip(calls, results, strict=True):
        assert_own_rows(result, tag, rows)
    assert sorted(t for _, tags in recorder.runs for t in tags) == [t for t, _ in calls]
    assert sum(c for c, _ in recorder.observed) == len(calls)
    assert sum(r for _, r in recorder.observed) == sum(r for _, r in calls)
    assert all(r <= 6 for _, r in recorder.observed)


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_must_be_at_least_one(max_batch):
    with pytest.raises(ValueError, match=f"max_batch must be at least 1, got {max_batch}"):
        StepMerger(lambda batches: [], max_batch)


def test_a_run_that_answers_the_wrong_number_of_calls_fails_them_all_and_ends():
    """A run_batched that loses a call's result must not leave that call waiting forever
    (nor its thread re-running empty batches): every call of the run gets an error."""
    runs = []

    def short(batches):
        runs.append(len(batches))
        return [{"out": b["sample"]} for b in batches[:-1]] if len(batches) > 1 else batches

    merger = StepMerger(short, max_batch=4)
    hold, release = threading.Event(), threading.Event()

    def first(batches):  # the first run holds while two more calls queue behind it
        hold.set()
        assert release.wait(TIMEOUT_S)
        return short(batches)

    merger._run_batched = first
    with ThreadPoolExecutor(3) as pool:
        lone = pool.submit(merger, inputs(1, 1))
        assert hold.wait(TIMEOUT_S)
        merger._run_batched = short
        queued = [pool.submit(merger, inputs(tag, 1)) for tag in (2, 3)]
        deadline = time.monotonic() + TIMEOUT_S
        while len(merger._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        release.set()
        np.testing.assert_array_equal(lone.result(TIMEOUT_S)["sample"], inputs(1, 1)["sample"])
        for future in queued:
            with pytest.raises(RuntimeError, match="1 results for 2 calls"):
                future.result(TIMEOUT_S)
    assert runs == [1, 2]

"""The status daemon's loop against kopf's own stopper: it stops on the flag and leaves no failing task.

kopf, when the operator exits, waits for every task still running and re-raises what they raised; a
task ending in `TimeoutError` then fails the operator (the flaky kmock test of issues 10 and 12).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from kopf._core.intents.stoppers import DaemonStopper, DaemonStoppingReason

from federator.operator.daemon import daemon_loop

pytestmark = pytest.mark.asyncio
BOUND = 30.0  # generous: only a hang reaches it
log = logging.getLogger("test")


def others() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


def failed(tasks: set[asyncio.Task[Any]]) -> list[BaseException]:
    return [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]  # type: ignore[misc]


async def test_a_sleeping_daemon_leaves_no_task_that_fails_and_stops_on_the_flag() -> None:
    stopper = DaemonStopper()
    polled = asyncio.Event()
    count = 0

    async def poll() -> None:
        nonlocal count
        count += 1
        if count == 3:
            polled.set()

    before = others()
    loop = asyncio.ensure_future(daemon_loop(poll, stopped=stopper.async_waiter, interval=0.01, logger=log))
    await asyncio.wait_for(polled.wait(), BOUND)
    seen = others() - before - {loop}  # what the loop runs while it waits between polls
    assert seen, "the loop waits on the flag in a task"
    done_polling = count
    await asyncio.wait_for(_until(lambda: count >= done_polling + 3), BOUND)  # several intervals pass
    assert failed(seen) == []  # (kopf's `stopped.wait(interval)` task ended in TimeoutError here)

    stopper.set(reason=DaemonStoppingReason.OPERATOR_EXITING)
    await asyncio.wait_for(loop, BOUND)
    assert others() - before == set() and failed(seen) == []


async def test_a_poll_in_flight_is_abandoned_when_the_flag_is_set() -> None:
    stopper = DaemonStopper()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hanging_poll() -> None:  # a server that accepted the connection and never answers
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    before = others()
    loop = asyncio.ensure_future(daemon_loop(hanging_poll, stopped=stopper.async_waiter, interval=60.0, logger=log))
    await asyncio.wait_for(started.wait(), BOUND)
    stopper.set(reason=DaemonStoppingReason.RESOURCE_DELETED)
    await asyncio.wait_for(loop, BOUND)  # returns by itself: kopf never has to cancel it
    assert cancelled.is_set() and others() - before == set()


async def test_a_failing_poll_is_logged_and_polling_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    stopper = DaemonStopper()
    calls = 0

    async def flaky_poll() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("the API server went away")

    loop = asyncio.ensure_future(daemon_loop(flaky_poll, stopped=stopper.async_waiter, interval=0.01, logger=log))
    await asyncio.wait_for(_until(lambda: calls >= 3), BOUND)
    stopper.set(reason=DaemonStoppingReason.OPERATOR_EXITING)
    await asyncio.wait_for(loop, BOUND)
    assert [r.getMessage() for r in caplog.records if r.name == "test"] == [
        "status update failed: ConnectionResetError: the API server went away"]


async def test_a_loop_cancelled_by_kopf_cancels_its_poll() -> None:
    stopper = DaemonStopper()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hanging_poll() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    before = others()
    loop = asyncio.ensure_future(daemon_loop(hanging_poll, stopped=stopper.async_waiter, interval=60.0, logger=log))
    await asyncio.wait_for(started.wait(), BOUND)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert cancelled.is_set() and others() - before == set()


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.005)


async def test_a_wake_runs_the_next_step_at_once_and_a_failed_step_is_retried_sooner() -> None:
    stopper = DaemonStopper()
    wake = asyncio.Event()
    steps: list[str] = []
    fail_once = True

    async def step() -> None:
        nonlocal fail_once
        steps.append("step")
        if fail_once:
            fail_once = False
            raise RuntimeError("the API answered 500")

    loop = asyncio.ensure_future(daemon_loop(step, stopped=stopper.async_waiter, interval=3600.0, logger=log,
                                             wake=wake, wait_first=True, retry_after=0.01, what="resync"))
    await asyncio.sleep(0.05)
    assert steps == []  # it waits first (the create handler has just reconciled)
    wake.set()
    await asyncio.wait_for(_until(lambda: len(steps) == 2), BOUND)  # woken; failed; retried after 0.01 s
    await asyncio.sleep(0.05)
    assert len(steps) == 2 and not wake.is_set()  # then back to the hour-long interval
    wake.set()
    await asyncio.wait_for(_until(lambda: len(steps) == 3), BOUND)
    stopper.set(reason=DaemonStoppingReason.OPERATOR_EXITING)
    await asyncio.wait_for(loop, BOUND)

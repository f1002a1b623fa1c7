"""The loop of Federator's kopf daemons (status polls, resyncs): step, wait, repeat; stop as soon as
kopf's `stopped` flag is set.

Why not `await stopped.wait(interval)`: kopf runs that wait as a task of its own that ends with
`TimeoutError` every time the interval passes. When the operator exits, kopf collects the tasks still
running, waits for them and re-raises what they raised: a daemon that was sleeping then made the whole
operator exit with `TimeoutError` (the flaky operator test of issues 10 and 12). Here every task the
loop starts ends with None or a cancellation, a poll in flight is abandoned the moment the flag is set
(its HTTP reads are bounded by their own timeouts as well), and the loop returns by itself, well within
the daemon's cancellation timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

Step = Callable[[], Awaitable[None]]


async def _flag_set(stopped: Any) -> None:
    """Return when kopf sets the daemon's flag (a wait with no time limit ends only that way)."""
    await stopped.wait()


async def _guarded(step: Step, *, what: str, logger: logging.Logger | Any, quiet: Callable[[], bool]) -> bool:
    """One step whose task never ends with an error: failures are logged (a daemon outlives API hiccups)."""
    try:
        await step()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not quiet():  # the operator is exiting and closed its sessions under us: nothing to report
            logger.warning(f"{what} failed: {type(exc).__name__}: {exc}")
        return False
    return True


async def _finish(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _pause(flag: asyncio.Future[None], wake: asyncio.Event | None, timeout: float) -> None:
    """Wait `timeout` seconds, or until the flag is set or `wake` is (never raises a timeout)."""
    if wake is None:
        await asyncio.wait({flag}, timeout=timeout)
        return
    woken = asyncio.ensure_future(wake.wait())
    either: set[asyncio.Future[Any]] = {flag, woken}
    try:
        await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _finish(woken)


async def daemon_loop(
    step: Step, *, stopped: Any, interval: float, logger: logging.Logger | Any, what: str = "status update",
    closing: Callable[[], bool] = lambda: False, wake: asyncio.Event | None = None, wait_first: bool = False,
    retry_after: float | None = None,
) -> None:
    """Run `step()` every `interval` seconds until kopf sets `stopped` (or `closing()` turns true).

    `wake`, when set, runs the next step at once (a change that asks for it; a change during a step runs
    one more). `wait_first` waits before the first step; `retry_after` shortens the wait after a failed
    step. `closing()` turns true when the operator's cleanup has begun: its HTTP sessions are going away.
    """
    def done() -> bool:
        return bool(stopped) or closing()

    flag = asyncio.ensure_future(_flag_set(stopped))
    current: asyncio.Future[bool] | None = None
    try:
        if wait_first:
            await _pause(flag, wake, interval)
        while not done():
            if wake is not None:
                wake.clear()
            current = asyncio.ensure_future(_guarded(step, what=what, logger=logger, quiet=done))
            await asyncio.wait({current, flag}, return_when=asyncio.FIRST_COMPLETED)
            if not current.done():
                break  # stopped in the middle of a step: abandon it
            ok, current = current.result(), None
            if done():
                break
            await _pause(flag, wake, interval if ok or retry_after is None else min(interval, retry_after))
    finally:
        await _finish(flag, *([current] if current is not None else []))

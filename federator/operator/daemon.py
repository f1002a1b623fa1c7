"""The loop of a kopf status daemon: poll, wait, repeat; stop as soon as kopf's `stopped` flag is set.

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

Poll = Callable[[], Awaitable[None]]


async def _flag_set(stopped: Any) -> None:
    """Return when kopf sets the daemon's flag (a wait with no time limit ends only that way)."""
    await stopped.wait()


async def _guarded(poll: Poll, *, logger: logging.Logger | Any, quiet: Callable[[], bool]) -> None:
    """One poll whose task never ends with an error: failures are logged (a daemon outlives API hiccups)."""
    try:
        await poll()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not quiet():  # the operator is exiting and closed its sessions under us: nothing to report
            logger.warning(f"status update failed: {type(exc).__name__}: {exc}")


async def _finish(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def status_loop(
    poll: Poll, *, stopped: Any, interval: float, logger: logging.Logger | Any,
    closing: Callable[[], bool] = lambda: False,
) -> None:
    """Run `poll()` every `interval` seconds until kopf sets `stopped` (or `closing()` turns true).

    `closing()` turns true when the operator's cleanup has begun: its HTTP sessions are going away.
    """
    def done() -> bool:
        return bool(stopped) or closing()

    flag = asyncio.ensure_future(_flag_set(stopped))
    current: asyncio.Future[None] | None = None
    try:
        while not done():
            current = asyncio.ensure_future(_guarded(poll, logger=logger, quiet=done))
            await asyncio.wait({current, flag}, return_when=asyncio.FIRST_COMPLETED)
            if not current.done():
                break  # stopped in the middle of a poll: abandon it
            current = None
            if done():
                break
            await asyncio.wait({flag}, timeout=interval)  # never raises, creates no task of its own
    finally:
        await _finish(flag, *([current] if current is not None else []))

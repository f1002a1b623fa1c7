"""One background thread that runs calls in the order they were submitted, stopping at the first failure.

A receiver hands each chunk's checks (checksum, copy, NaN/Inf scan) to a `CheckThread` and goes back to
reading the stream, so the checks of one chunk overlap the arrival of the next. The calls run strictly in
order, so a running checksum can carry from one chunk to the next, and the first failure is the one a
sequential receiver would have hit first: after it, later calls are dropped unrun, and `stop` hands it back
for the receiver to raise. The thread ends on `stop`, and also when its owner is garbage-collected without
calling it (an aborted stream), so no thread outlives the stream it checked.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

THREAD_NAME = "federator-chunk-check"

_Call = tuple[Callable[..., None], tuple[Any, ...]]


class CheckThread:
    """Runs `submit`ted calls in order on its own thread. `depth` bounds the calls waiting (and so the
    received data they hold): `submit` blocks while that many are queued."""

    def __init__(self, depth: int = 4) -> None:
        self._calls: queue.Queue[_Call | None] = queue.Queue(depth)
        self._state = _State()
        self._thread = threading.Thread(target=_run, args=(self._calls, self._state), name=THREAD_NAME,
                                        daemon=True)
        self._thread.start()
        # an owner dropped mid-stream never calls stop: the sentinel still reaches the thread
        self._finalizer = weakref.finalize(self, _stop, self._calls, self._thread)

    @property
    def failed(self) -> bool:
        """True once a call has raised (cheap: no waiting)."""
        return self._state.error is not None

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._calls.put((fn, args))

    def stop(self) -> BaseException | None:
        """Wait for every submitted call to run (or be dropped after a failure), end the thread, and return
        the first exception a call raised, or None. Idempotent."""
        self._finalizer()
        return self._state.error


class _State:
    def __init__(self) -> None:
        self.error: BaseException | None = None


def _run(calls: queue.Queue[_Call | None], state: _State) -> None:
    while True:
        call = calls.get()
        if call is None:
            return
        if state.error is None:
            fn, args = call
            try:
                fn(*args)
            except BaseException as exc:  # handed to the owner, which raises it in its own thread
                state.error = exc


def _stop(calls: queue.Queue[_Call | None], thread: threading.Thread) -> None:
    calls.put(None)  # the thread keeps taking calls (dropping them after a failure), so this cannot block
    if thread is not threading.current_thread():
        thread.join()

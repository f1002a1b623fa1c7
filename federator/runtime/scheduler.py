"""Task scheduling: the round's task queue, the workers' leases, reassignment and dead-worker reaping.

`TaskBook` is the pure core: plain bookkeeping with no lock and no clock (callers pass `now`), tested on
its own (tests/unit/test_scheduler.py). `Dispatcher` adds what needs a lock and a clock: GetTask calls
parked until a task is queued, and reaping at most every `REAP_EVERY` seconds. The server owns round
control; it holds the shared lock whenever it calls into either.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

REAP_EVERY = 0.2  # seconds between scans for workers that stopped beating
MAX_TASK_ATTEMPTS = 3
MAX_WAIT_SECONDS = 10.0  # the longest a GetTask call is parked


@dataclass
class Task:
    task_id: str
    round: int
    client_id: str
    silo: str | None
    version: int
    state: str = "queued"  # queued | assigned | done | dropped | cancelled
    worker_id: str | None = None
    attempts: int = 0
    leases: int = 0  # how many times it was handed out: a late rejection must not requeue a newer lease


@dataclass
class WorkerInfo:
    worker_id: str
    name: str
    silo: str | None
    silo_samples: int
    last_seen: float
    task_id: str | None = None
    long_polls: int = 0  # GetTask calls of this worker parked in Dispatcher.next_task


class TaskBook:
    """The open round's tasks, the queue of those waiting for a worker, and who holds what.

    Rules: a worker runs one task at a time, and asking for another gives up the one it held; workers of
    simulated clients take any simulated client's task, a silo only its own; a task handed back by a
    dropped worker goes to the front of the queue, one given up or rejected to the back.
    `on_pending(n)` is called with the queue's length whenever it changes.
    """

    def __init__(self, on_pending: Callable[[int], None] = lambda n: None) -> None:
        self.workers: dict[str, WorkerInfo] = {}
        self.queue: deque[str] = deque()
        self.tasks: dict[str, Task] = {}
        self.open = False
        self._on_pending = on_pending

    def _changed(self) -> None:
        self._on_pending(len(self.queue))

    def pending(self) -> int:
        return len(self.queue)

    # ------------------------------------------------------------------------------------ rounds

    def start_round(self, tasks: dict[str, Task]) -> None:
        """Queue every task of a new round (the previous round's are forgotten)."""
        self.tasks = tasks
        self.open = True
        self.queue.clear()
        self.queue.extend(tasks)
        self._changed()

    def close_round(self) -> None:
        """No more assignments or accepted updates: unfinished tasks are cancelled."""
        self.open = False
        for t in self.tasks.values():
            if t.state in ("queued", "assigned"):
                t.state = "cancelled"
        self.queue.clear()
        self._changed()

    def end_round(self) -> None:
        self.tasks = {}
        self.open = False

    def is_current(self, task: Task) -> bool:
        return self.tasks.get(task.task_id) is task

    # ------------------------------------------------------------------------------------ leases

    def take(self, w: WorkerInfo) -> Task | None:
        """Assign `w` the next task it may take (giving up the one it held), or None."""
        if not self.open:
            return None
        self._give_up(w)
        for tid in self.queue:
            t = self.tasks[tid]
            if t.silo == w.silo:
                self.queue.remove(tid)
                t.state, t.worker_id = "assigned", w.worker_id
                t.leases += 1
                w.task_id = tid
                self._changed()
                return t
        return None

    def _give_up(self, w: WorkerInfo) -> None:
        if w.task_id is not None:
            held = self.tasks.get(w.task_id)
            if held is not None and held.state == "assigned" and held.worker_id == w.worker_id:
                held.state, held.worker_id = "queued", None
                self.queue.append(held.task_id)
                self._changed()
            w.task_id = None

    def holds(self, w: WorkerInfo, task_id: str) -> bool:
        """Whether `task_id` is assigned to `w` now (a heartbeat's task_valid)."""
        t = self.tasks.get(task_id)
        return t is not None and t.state == "assigned" and t.worker_id == w.worker_id

    def accept(self, task: Task, w: WorkerInfo) -> None:
        """`w`'s update for `task` was taken into the round."""
        task.state = "done"
        if w.task_id == task.task_id:
            w.task_id = None

    def retry(self, task: Task, lease: int | None = None) -> bool:
        """A rejected update: queue the task again, or drop it after MAX_TASK_ATTEMPTS. Only the lease the
        update was trained under counts (`lease`; None: the current one). Returns whether anything changed."""
        same_lease = lease is None or lease == task.leases
        if not (same_lease and task.state == "assigned" and self.is_current(task)):
            return False
        task.attempts += 1
        if task.attempts >= MAX_TASK_ATTEMPTS:
            task.state = "dropped"
        else:
            task.state, task.worker_id = "queued", None
            self.queue.append(task.task_id)
        self._changed()
        return True

    # ------------------------------------------------------------------------------------ workers

    def add_worker(self, w: WorkerInfo) -> None:
        self.workers[w.worker_id] = w

    def drop_worker(self, wid: str) -> WorkerInfo | None:
        """Forget a worker; the task it held goes to the front of the queue."""
        w = self.workers.pop(wid, None)
        if w is None:
            return None
        if w.task_id:
            t = self.tasks.get(w.task_id)
            if t is not None and t.state == "assigned" and t.worker_id == wid:
                t.state, t.worker_id = "queued", None
                self.queue.appendleft(t.task_id)
                self._changed()
        return w

    def dead_workers(self, now: float, dead_after: float) -> list[str]:
        """Workers silent for more than `dead_after` seconds. A worker parked in a long poll holds no task
        (asking gave it up) and returns within MAX_WAIT_SECONDS: its heartbeats, late when the server is
        busy, need not keep it alive meanwhile."""
        return [wid for wid, w in self.workers.items() if now - w.last_seen > dead_after and w.long_polls == 0]


class Dispatcher:
    """Parks GetTask calls until a task is queued, and throttles reaping; every call holds `lock`."""

    def __init__(self, book: TaskBook, lock: threading.RLock, over: Callable[[], bool], dead_after: float) -> None:
        self.book = book
        self.dead_after = dead_after  # seconds without a heartbeat before a worker counts as dead
        self.ready = threading.Condition(lock)  # tasks queued or the federation ended: wakes GetTask
        self.long_polls = 0  # GetTask calls parked here, each holding one gRPC thread
        self._over = over  # the federation ended (or the server is stopping): parked calls answer STOP
        self._next_reap = 0.0

    def wake(self) -> None:
        self.ready.notify_all()

    def next_task(self, w: WorkerInfo, wait: float) -> Task | str:
        """Assign the next task this worker may take; 'stop' when the federation is over, 'gone' when the
        worker was dropped, 'none' when nothing came within `wait` seconds (at most MAX_WAIT_SECONDS)."""
        deadline = time.monotonic() + max(0.0, min(wait, MAX_WAIT_SECONDS))
        with self.ready:
            while True:
                w.last_seen = time.monotonic()
                if self._over():
                    return "stop"
                if w.worker_id not in self.book.workers:
                    return "gone"
                task = self.book.take(w)
                if task is not None:
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "none"
                self.long_polls += 1
                w.long_polls += 1
                try:
                    self.ready.wait(remaining)
                finally:
                    self.long_polls -= 1
                    w.long_polls -= 1

    def reap_due(self) -> list[str]:
        """The dead workers to drop now, scanning at most every REAP_EVERY seconds (the round loop asks on
        every wake-up)."""
        now = time.monotonic()
        if now < self._next_reap:
            return []
        self._next_reap = now + REAP_EVERY
        return self.book.dead_workers(now, self.dead_after)

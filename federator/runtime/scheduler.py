"""Task scheduling: the round's task queue, the workers' leases, reassignment and dead-worker reaping.

`TaskBook` is the pure core: plain bookkeeping with no lock and no clock (callers pass `now`), tested on
its own (tests/unit/test_scheduler.py). `Dispatcher` adds what needs a lock and a clock: GetTask calls
parked until a task is queued, and reaping at most every `REAP_EVERY` seconds. The server owns round
control; it holds the shared lock whenever it calls into either.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

REAP_EVERY = 0.2  # seconds between scans for workers that stopped beating
MAX_TASK_ATTEMPTS = 3
MAX_WAIT_SECONDS = 10.0  # the longest a GetTask call is parked
# an idle worker takes the last task of a worker that holds at least this many: the one it trains and
# the next stay with it (it may have started the next before it hears of the move)
STEAL_FROM = 3


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
    held: list[str] = field(default_factory=list)  # its tasks of the open round, in the order it trains them
    revoked: set[str] = field(default_factory=set)  # tasks of its batch moved to an idle worker this round
    long_polls: int = 0  # GetTask calls of this worker parked in Dispatcher.next_task


class TaskBook:
    """The open round's tasks, the queue of those waiting for a worker, and who holds what.

    Lease rules:
    - a worker holds a batch: one task, or up to the `max_tasks` it asked for, bounded by its fair share
      of the round's open tasks (ceil(open / workers of simulated clients), counting at least
      `expected_workers`: clients.workers, so the first to join does not take round 1 while the others
      start), and the first to ask does not take a round's tasks while others wait; it trains them in
      order and uploads each on its own;
    - asking again gives up every task still held (to the back of the queue): a worker asks only when
      its batch is done;
    - a dropped worker (it left, or stopped beating) hands its tasks to the front of the queue;
    - a rejected update queues its task again (to the back), until MAX_TASK_ATTEMPTS;
    - an idle worker with nothing queued for it takes the last task of the worker holding the most, if
      that one holds at least STEAL_FROM (a straggler keeps at most STEAL_FROM - 1 while others idle); the
      donor learns it from `revoked` in its next heartbeat or upload reply, and an update it sends anyway
      is refused as reassigned;
    - workers of simulated clients take any simulated client's task, a silo only its own.
    `on_pending(n)` is called with the queue's length whenever it changes.
    """

    def __init__(self, on_pending: Callable[[int], None] = lambda n: None, expected_workers: int = 1) -> None:
        self.expected_workers = expected_workers
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
        for w in self.workers.values():
            w.held.clear()
            w.revoked.clear()
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

    def take(self, w: WorkerInfo, max_tasks: int = 1) -> list[Task]:
        """Give up what `w` held and assign it its next batch (empty: nothing for it now)."""
        if not self.open:
            return []
        self._give_up(w)
        want = self._share(w, max_tasks)
        picked: list[str] = []
        for tid in self.queue:
            if self.tasks[tid].silo == w.silo:
                picked.append(tid)
                if len(picked) == want:
                    break
        for tid in picked:
            self.queue.remove(tid)
        if picked:
            self._changed()
        elif w.silo is None:
            stolen = self._steal()
            if stolen is not None:
                picked.append(stolen)
        for tid in picked:
            t = self.tasks[tid]
            t.state, t.worker_id = "assigned", w.worker_id
            t.leases += 1
            w.held.append(tid)
        return [self.tasks[tid] for tid in picked]

    def _share(self, w: WorkerInfo, max_tasks: int) -> int:
        """How many tasks `w` may take now: its fair share of the open tasks, at least 1."""
        if max_tasks <= 1 or w.silo is not None:
            return 1
        peers = max(self.expected_workers, sum(1 for x in self.workers.values() if x.silo is None), 1)
        open_tasks = sum(1 for t in self.tasks.values() if t.silo is None and t.state in ("queued", "assigned"))
        return max(1, min(max_tasks, math.ceil(open_tasks / peers)))

    def _steal(self) -> str | None:
        """Take the last task of the worker of simulated clients that holds the most (at least STEAL_FROM)."""
        donor = max((x for x in self.workers.values() if x.silo is None and len(x.held) >= STEAL_FROM),
                    key=lambda x: len(x.held), default=None)
        if donor is None:
            return None
        tid = donor.held.pop()
        donor.revoked.add(tid)
        return tid

    def _give_up(self, w: WorkerInfo) -> None:
        back = [tid for tid in w.held if self.holds(w, tid)]
        for tid in back:
            self.tasks[tid].state, self.tasks[tid].worker_id = "queued", None
        self.queue.extend(back)
        w.held.clear()
        if back:
            self._changed()

    def holds(self, w: WorkerInfo, task_id: str) -> bool:
        """Whether `task_id` is assigned to `w` now (a heartbeat's task_valid)."""
        t = self.tasks.get(task_id)
        return t is not None and t.state == "assigned" and t.worker_id == w.worker_id

    def accept(self, task: Task, w: WorkerInfo) -> None:
        """`w`'s update for `task` was taken into the round."""
        task.state = "done"
        if task.task_id in w.held:
            w.held.remove(task.task_id)

    def retry(self, task: Task, lease: int | None = None) -> bool:
        """A rejected update: queue the task again, or drop it after MAX_TASK_ATTEMPTS. Only the lease the
        update was trained under counts (`lease`; None: the current one). Returns whether anything changed."""
        same_lease = lease is None or lease == task.leases
        if not (same_lease and task.state == "assigned" and self.is_current(task)):
            return False
        holder = self.workers.get(task.worker_id or "")
        if holder is not None and task.task_id in holder.held:
            holder.held.remove(task.task_id)
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
        """Forget a worker; the tasks it held go to the front of the queue, in their order."""
        w = self.workers.pop(wid, None)
        if w is None:
            return None
        back = [tid for tid in w.held if self.holds(w, tid)]
        for tid in back:
            self.tasks[tid].state, self.tasks[tid].worker_id = "queued", None
        self.queue.extendleft(reversed(back))
        w.held.clear()
        if back:
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

    def next_tasks(self, w: WorkerInfo, wait: float, max_tasks: int = 1) -> list[Task] | str:
        """Assign the next batch this worker may take (TaskBook.take); 'stop' when the federation is over,
        'gone' when the worker was dropped, 'none' when nothing came within `wait` seconds (at most
        MAX_WAIT_SECONDS)."""
        deadline = time.monotonic() + max(0.0, min(wait, MAX_WAIT_SECONDS))
        with self.ready:
            while True:
                w.last_seen = time.monotonic()
                if self._over():
                    return "stop"
                if w.worker_id not in self.book.workers:
                    return "gone"
                tasks = self.book.take(w, max_tasks)
                if tasks:
                    return tasks
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

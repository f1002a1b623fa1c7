"""The scheduler's pure core: queue, leases, reassignment, dead workers (no server, no gRPC)."""

from __future__ import annotations

from federator.runtime.scheduler import MAX_TASK_ATTEMPTS, Task, TaskBook, WorkerInfo


def book_with(n: int, silos: dict[str, str] | None = None) -> tuple[TaskBook, list[int]]:
    pending: list[int] = []
    book = TaskBook(on_pending=pending.append)
    tasks = {f"t{i}": Task(f"t{i}", 1, f"sim-{i}", None, 7) for i in range(n)}
    for name, silo in (silos or {}).items():
        tasks[name] = Task(name, 1, silo, silo, 7)
    book.start_round(tasks)
    return book, pending


def worker(book: TaskBook, wid: str, silo: str | None = None, seen: float = 0.0) -> WorkerInfo:
    w = WorkerInfo(wid, wid, silo, 0, seen)
    book.add_worker(w)
    return w


def test_tasks_go_out_in_queue_order_and_the_pending_count_follows() -> None:
    book, pending = book_with(3)
    a = worker(book, "a")
    assert pending == [3]
    t = book.take(a)
    assert t is not None and t.task_id == "t0" and t.state == "assigned" and t.worker_id == "a" and t.leases == 1
    assert pending[-1] == 2 and book.pending() == 2


def test_asking_again_gives_up_the_task_held() -> None:
    book, _ = book_with(2)
    a = worker(book, "a")
    first = book.take(a)
    second = book.take(a)
    assert first is not None and second is not None
    assert second.task_id == "t1" and first.state == "queued" and first.worker_id is None
    assert list(book.queue) == ["t0"]  # given up: to the back
    assert not book.holds(a, "t0") and book.holds(a, "t1")


def test_a_dropped_worker_hands_its_task_to_the_front_of_the_queue() -> None:
    book, _ = book_with(3)
    a, b = worker(book, "a"), worker(book, "b")
    held = book.take(a)
    assert held is not None
    assert book.drop_worker("a") is a
    assert list(book.queue) == ["t0", "t1", "t2"] and held.state == "queued"
    again = book.take(b)
    assert again is held and again.leases == 2
    assert book.drop_worker("a") is None  # already gone


def test_silos_take_only_their_own_task_and_workers_never_take_a_silos() -> None:
    book, _ = book_with(1, silos={"s-task": "hospital"})
    silo = worker(book, "s", silo="hospital")
    w = worker(book, "w")
    t = book.take(silo)
    assert t is not None and t.client_id == "hospital"
    t2 = book.take(w)
    assert t2 is not None and t2.client_id == "sim-0"
    assert book.take(w) is t2 and book.holds(silo, "s-task")  # the silo task is never offered to it


def test_a_rejected_update_requeues_its_task_until_the_attempts_run_out() -> None:
    book, _ = book_with(1)
    a = worker(book, "a")
    for attempt in range(1, MAX_TASK_ATTEMPTS + 1):
        t = book.take(a)
        assert t is not None
        assert book.retry(t, t.leases)
        assert t.attempts == attempt
    assert t.state == "dropped" and book.pending() == 0
    assert book.take(a) is None


def test_a_rejection_from_an_old_lease_does_not_touch_the_new_one() -> None:
    book, _ = book_with(1)
    a, b = worker(book, "a"), worker(book, "b")
    t = book.take(a)
    assert t is not None
    old = t.leases
    book.drop_worker("a")
    assert book.take(b) is t
    assert not book.retry(t, old)
    assert t.state == "assigned" and t.worker_id == "b" and t.attempts == 0


def test_closing_cancels_what_is_unfinished_and_takes_nothing_more() -> None:
    book, pending = book_with(3)
    a = worker(book, "a")
    t = book.take(a)
    assert t is not None
    book.accept(t, a)
    assert t.state == "done" and a.task_id is None
    other = book.take(a)
    book.close_round()
    assert pending[-1] == 0
    assert t.state == "done" and other is not None and other.state == "cancelled"
    assert all(x.state in ("done", "cancelled") for x in book.tasks.values())
    assert book.take(a) is None
    assert not book.retry(other)  # a late rejection after the close changes nothing


def test_dead_workers_are_the_silent_ones_not_parked_in_a_long_poll() -> None:
    book, _ = book_with(0)
    worker(book, "quiet", seen=0.0)
    parked = worker(book, "parked", seen=0.0)
    parked.long_polls = 1
    worker(book, "alive", seen=9.0)
    assert book.dead_workers(now=10.0, dead_after=5.0) == ["quiet"]

"""The scheduler's pure core: queue, leases, reassignment, dead workers (no server, no gRPC)."""

from __future__ import annotations

from federator.runtime.scheduler import MAX_TASK_ATTEMPTS, STEAL_FROM, Task, TaskBook, WorkerInfo


def book_with(n: int, silos: dict[str, str] | None = None) -> tuple[TaskBook, list[int]]:
    pending: list[int] = []
    book = TaskBook(on_pending=pending.append)
    tasks = {f"t{i}": Task(f"t{i}", 1, f"sim-{i}", None, 7) for i in range(n)}
    for name, silo in (silos or {}).items():
        tasks[name] = Task(name, 1, silo, silo, 7)
    book.start_round(tasks)
    return book, pending


def one(book: TaskBook, w: WorkerInfo) -> Task | None:
    """The old protocol: one task per request."""
    got = book.take(w)
    assert len(got) <= 1
    return got[0] if got else None


def worker(book: TaskBook, wid: str, silo: str | None = None, seen: float = 0.0) -> WorkerInfo:
    w = WorkerInfo(wid, wid, silo, 0, seen)
    book.add_worker(w)
    return w


def test_tasks_go_out_in_queue_order_and_the_pending_count_follows() -> None:
    book, pending = book_with(3)
    a = worker(book, "a")
    assert pending == [3]
    t = one(book, a)
    assert t is not None and t.task_id == "t0" and t.state == "assigned" and t.worker_id == "a" and t.leases == 1
    assert pending[-1] == 2 and book.pending() == 2


def test_asking_again_gives_up_the_task_held() -> None:
    book, _ = book_with(2)
    a = worker(book, "a")
    first = one(book, a)
    second = one(book, a)
    assert first is not None and second is not None
    assert second.task_id == "t1" and first.state == "queued" and first.worker_id is None
    assert list(book.queue) == ["t0"]  # given up: to the back
    assert not book.holds(a, "t0") and book.holds(a, "t1")


def test_a_dropped_worker_hands_its_task_to_the_front_of_the_queue() -> None:
    book, _ = book_with(3)
    a, b = worker(book, "a"), worker(book, "b")
    held = one(book, a)
    assert held is not None
    assert book.drop_worker("a") is a
    assert list(book.queue) == ["t0", "t1", "t2"] and held.state == "queued"
    again = one(book, b)
    assert again is held and again.leases == 2
    assert book.drop_worker("a") is None  # already gone


def test_silos_take_only_their_own_task_and_workers_never_take_a_silos() -> None:
    book, _ = book_with(1, silos={"s-task": "hospital"})
    silo = worker(book, "s", silo="hospital")
    w = worker(book, "w")
    t = one(book, silo)
    assert t is not None and t.client_id == "hospital"
    t2 = one(book, w)
    assert t2 is not None and t2.client_id == "sim-0"
    assert one(book, w) is t2 and book.holds(silo, "s-task")  # the silo task is never offered to it


def test_a_rejected_update_requeues_its_task_until_the_attempts_run_out() -> None:
    book, _ = book_with(1)
    a = worker(book, "a")
    for attempt in range(1, MAX_TASK_ATTEMPTS + 1):
        t = one(book, a)
        assert t is not None
        assert book.retry(t, t.leases)
        assert t.attempts == attempt
    assert t.state == "dropped" and book.pending() == 0
    assert one(book, a) is None


def test_a_rejection_from_an_old_lease_does_not_touch_the_new_one() -> None:
    book, _ = book_with(1)
    a, b = worker(book, "a"), worker(book, "b")
    t = one(book, a)
    assert t is not None
    old = t.leases
    book.drop_worker("a")
    assert one(book, b) is t
    assert not book.retry(t, old)
    assert t.state == "assigned" and t.worker_id == "b" and t.attempts == 0


def test_closing_cancels_what_is_unfinished_and_takes_nothing_more() -> None:
    book, pending = book_with(3)
    a = worker(book, "a")
    t = one(book, a)
    assert t is not None
    book.accept(t, a)
    assert t.state == "done" and a.held == []
    other = one(book, a)
    book.close_round()
    assert pending[-1] == 0
    assert t.state == "done" and other is not None and other.state == "cancelled"
    assert all(x.state in ("done", "cancelled") for x in book.tasks.values())
    assert one(book, a) is None
    assert not book.retry(other)  # a late rejection after the close changes nothing


def test_dead_workers_are_the_silent_ones_not_parked_in_a_long_poll() -> None:
    book, _ = book_with(0)
    worker(book, "quiet", seen=0.0)
    parked = worker(book, "parked", seen=0.0)
    parked.long_polls = 1
    worker(book, "alive", seen=9.0)
    assert book.dead_workers(now=10.0, dead_after=5.0) == ["quiet"]


# ------------------------------------------------------------------------------------ batches


def ids(tasks: list[Task]) -> list[str]:
    return [t.task_id for t in tasks]


def test_a_batch_is_bounded_by_the_fair_share_so_the_first_worker_does_not_take_the_round() -> None:
    book, pending = book_with(10)
    a, b = worker(book, "a"), worker(book, "b")
    first = book.take(a, max_tasks=16)
    assert ids(first) == [f"t{i}" for i in range(5)]  # ceil(10 open / 2 workers)
    assert a.held == ids(first) and all(t.state == "assigned" and t.worker_id == "a" for t in first)
    second = book.take(b, max_tasks=16)
    assert ids(second) == [f"t{i}" for i in range(5, 10)]  # the open tasks still count a's: 5 again
    assert pending[-1] == 0
    again = book.take(b, max_tasks=3)  # asking again gives b's batch up; it takes up to what it asked for
    assert ids(again) == ["t5", "t6", "t7"] and list(book.queue) == ["t8", "t9"]


def test_asking_for_a_batch_gives_up_every_task_still_held() -> None:
    book, _ = book_with(4)
    a = worker(book, "a")
    batch = book.take(a, max_tasks=3)
    assert ids(batch) == ["t0", "t1", "t2"]
    book.accept(batch[0], a)
    assert a.held == ["t1", "t2"]
    again = book.take(a, max_tasks=2)
    assert ids(again) == ["t3", "t1"]  # t1, t2 went to the back; t0 stays done
    assert batch[0].state == "done" and list(book.queue) == ["t2"]


def test_a_dropped_worker_hands_its_whole_batch_to_the_front_in_order() -> None:
    book, _ = book_with(6)
    a, b = worker(book, "a"), worker(book, "b")
    batch = book.take(a, max_tasks=16)
    assert ids(batch) == ["t0", "t1", "t2"]
    book.accept(batch[0], a)
    book.drop_worker("a")
    assert list(book.queue) == ["t1", "t2", "t3", "t4", "t5"]
    assert ids(book.take(b, max_tasks=2)) == ["t1", "t2"]


def test_a_rejected_task_of_a_batch_leaves_the_holder_and_goes_back_to_the_queue() -> None:
    book, _ = book_with(2)
    a = worker(book, "a")
    batch = book.take(a, max_tasks=2)
    assert book.retry(batch[0], batch[0].leases)
    assert a.held == ["t1"] and list(book.queue) == ["t0"] and batch[0].attempts == 1


def test_an_idle_worker_takes_the_last_task_of_a_straggler_holding_enough() -> None:
    book, _ = book_with(8)
    slow, fast = worker(book, "slow"), worker(book, "fast")
    held = book.take(slow, max_tasks=16)
    mine = book.take(fast, max_tasks=16)
    assert len(held) == len(mine) == 4
    for t in mine:
        book.accept(t, fast)
    stolen = book.take(fast, max_tasks=16)  # nothing queued: the straggler's last task moves
    assert ids(stolen) == ["t3"] and stolen[0].worker_id == "fast" and stolen[0].leases == 2
    assert slow.held == ["t0", "t1", "t2"] and slow.revoked == {"t3"}
    assert not book.holds(slow, "t3") and book.holds(fast, "t3")
    book.accept(stolen[0], fast)
    assert ids(book.take(fast, max_tasks=16)) == ["t2"]
    assert len(slow.held) == STEAL_FROM - 1
    book.accept(book.tasks["t2"], fast)
    assert book.take(fast, max_tasks=16) == []  # the straggler keeps the one it trains and the next
    assert slow.revoked == {"t2", "t3"}


def test_a_new_round_forgets_last_rounds_batches_and_moves() -> None:
    book, _ = book_with(6)
    a, b = worker(book, "a"), worker(book, "b")
    book.take(a, max_tasks=16)
    for t in book.take(b, max_tasks=16):
        book.accept(t, b)
    book.take(b, max_tasks=16)
    assert a.revoked
    book.close_round()
    book.start_round({"n0": Task("n0", 2, "sim-0", None, 8)})
    assert a.held == [] and a.revoked == set() and b.held == []


def test_the_share_counts_the_workers_expected_so_the_first_to_join_leaves_some_for_the_others() -> None:
    pending: list[int] = []
    book = TaskBook(on_pending=pending.append, expected_workers=2)
    book.start_round({f"t{i}": Task(f"t{i}", 1, f"sim-{i}", None, 7) for i in range(10)})
    first = worker(book, "first")
    assert len(book.take(first, max_tasks=16)) == 5  # alone so far, but clients.workers is 2
    assert len(book.take(first, max_tasks=16)) == 5  # gave its 5 up, and 10 are open again

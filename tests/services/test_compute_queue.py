import threading
import time

import torch

from core.services.compute_queue import ComputeQueue


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_at_most_slots_jobs_run_at_once_first_come_first_served():
    """Six jobs arrive one after the other (each is in line before the next starts) and each runs until the
    test lets it finish: two run at once, and each freed slot goes to the job that arrived first."""
    queue = ComputeQueue(slots=2)
    started, finish, done = [], [threading.Event() for _ in range(6)], [0]
    lock = threading.Lock()

    def work(i):
        with queue.job():
            with lock:
                started.append(i)
            finish[i].wait(10)
        with lock:
            done[0] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for i, thread in enumerate(threads):
        thread.start()
        _wait_for(lambda: queue.running + queue.waiting + done[0] >= i + 1)  # job i is running or in line
    _wait_for(lambda: len(started) == 2)
    assert sorted(started) == [0, 1] and queue.running == 2 and queue.waiting == 4
    for i in range(6):
        finish[i].set()
        _wait_for(lambda: len(started) == min(6, i + 3) and queue.running <= 2)
        assert started[2:] == list(range(2, min(6, i + 3)))  # the freed slot went to the first in line
    for thread in threads:
        thread.join()
    assert queue.running == 0 and not queue.busy()


def test_a_job_alone_uses_every_core_and_restores_the_thread_count():
    queue = ComputeQueue(slots=2)
    before = torch.get_num_threads()
    with queue.job() as ticket:
        assert ticket.threads == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_exclusive_waits_for_a_quiet_moment_or_says_it_did_not_get_one():
    queue = ComputeQueue(slots=2)
    release = threading.Event()

    def hold():
        with queue.job():
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.02)
    with queue.exclusive(timeout_s=0.05) as ticket:
        assert not ticket.exclusive  # someone else was running: the caller marks its figure
    release.set()
    holder.join()
    with queue.exclusive(timeout_s=0.5) as ticket:
        assert ticket.exclusive and queue.running == 2
    assert queue.running == 0
    with queue.job():  # a timed-out waiter did not block the queue
        pass


def test_a_waiter_polls_and_leaves_the_line_cleanly_when_its_poll_raises():
    queue = ComputeQueue(slots=1)
    release = threading.Event()
    polls = []

    def hold():
        with queue.job():
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.02)

    class Superseded(Exception):
        pass

    def poll():
        polls.append(1)
        if len(polls) == 2:
            raise Superseded  # what Streamlit does to a run a newer one replaces

    try:
        with queue.job(poll=poll):
            raise AssertionError("the job must not start")
    except Superseded:
        pass
    assert len(polls) == 2 and queue.waiting == 0
    release.set()
    holder.join()
    with queue.job():  # the line moves on
        assert queue.running == 1


def test_a_job_runs_at_background_priority_and_gets_its_priority_back():
    import os

    import pytest

    from core.services.compute_queue import JOB_NICENESS, background_priority_available

    if not background_priority_available():
        pytest.skip("this process may not raise a thread's priority back (not root, no CAP_SYS_NICE)")
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    queue = ComputeQueue(slots=2)
    with queue.job():
        assert os.getpriority(os.PRIO_PROCESS, tid) == min(19, before + JOB_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, tid) == before
    with queue.exclusive(timeout_s=0.5):  # a measurement runs at the caller's own priority
        assert os.getpriority(os.PRIO_PROCESS, tid) == before


def test_an_exception_in_a_job_still_restores_its_priority():
    import os

    import pytest

    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    with pytest.raises(RuntimeError):
        with ComputeQueue(slots=1).job():
            raise RuntimeError("boom")
    assert os.getpriority(os.PRIO_PROCESS, tid) == before


def test_default_slots_keeps_a_core_free_without_background_priority(monkeypatch):
    import core.services.compute_queue as cq

    monkeypatch.delenv(cq.SLOTS_ENV, raising=False)
    monkeypatch.setattr(cq.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cq, "background_priority_available", lambda: True)
    assert cq.default_slots() == 2
    monkeypatch.setattr(cq, "background_priority_available", lambda: False)
    assert cq.default_slots() == 1
    monkeypatch.setattr(cq.os, "cpu_count", lambda: 1)
    assert cq.default_slots() == 1  # never zero
    monkeypatch.setenv(cq.SLOTS_ENV, "3")
    assert cq.default_slots() == 3 and ComputeQueue().slots == 3
    monkeypatch.setenv(cq.SLOTS_ENV, "many")  # not a number: the default
    assert cq.default_slots() == 1

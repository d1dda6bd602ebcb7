

def test_freezing_startup_objects_leaves_later_garbage_collectable():
    import gc
    import weakref

    from core.common.memory import freeze_startup_objects

    frozen = freeze_startup_objects()
    assert frozen > 0 and gc.get_freeze_count() > 0  # frozen objects freed by refcount leave the count
    assert freeze_startup_objects() == frozen  # once per process

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle made after the freeze: only the collector frees it
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


def test_the_janitor_frees_cyclic_garbage_without_anyone_calling_the_collector():
    import gc
    import time
    import weakref

    import threading

    from core.common.memory import janitor_loop

    class Node:
        pass

    gc.disable()  # nothing but the janitor may collect
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        stop = threading.Event()
        thread = threading.Thread(target=janitor_loop, args=(0.05, stop), daemon=True)
        thread.start()
        deadline = time.monotonic() + 5
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gone() is None
        stop.set()
        thread.join(2)
        assert not thread.is_alive()
    finally:
        gc.enable()


def test_large_blocks_are_mapped_on_glibc():
    import ctypes.util

    import pytest

    from core.common.memory import map_large_blocks

    if ctypes.util.find_library("c") is None or "glibc" not in " ".join(__import__("platform").libc_ver()):
        pytest.skip("not glibc")
    assert map_large_blocks() is True


def test_the_janitor_runs_its_tasks_before_collecting_and_survives_a_failing_one(monkeypatch, caplog):
    import threading

    import core.common.memory as memory

    events = []
    two_rounds = threading.Event()
    monkeypatch.setattr(memory, "release_memory", lambda: (events.append("collect"),
                                                          two_rounds.set() if events.count("collect") == 2 else None))

    def broken():
        events.append("broken")
        raise RuntimeError("task failed")

    stop = threading.Event()
    thread = threading.Thread(target=memory.janitor_loop, args=(0.01, stop, (broken, lambda: events.append("task"))),
                              daemon=True)
    thread.start()
    assert two_rounds.wait(5)
    stop.set()
    thread.join(2)
    assert events[:6] == ["broken", "task", "collect"] * 2
    assert "task failed" in caplog.text



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

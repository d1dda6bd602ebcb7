"""Process memory: handing freed heap back to the OS, and reading the resident set size."""
from __future__ import annotations

import ctypes
import functools
import gc
import logging
import threading
from collections.abc import Callable

_LOGGER = logging.getLogger(__name__)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's per-thread malloc arenas (call before worker threads start); whether it applied.

    A server runs every session's script in its own thread; by default glibc gives busy
    threads their own arenas (up to 8 per core), and memory freed in one arena is not reused
    by another nor always returned to the OS, so the process grows with the number of
    sessions it has seen. Two arenas keep contention low on a small machine.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own ``mmap`` (glibc); whether it applied.

    glibc starts at 128 KiB but raises the threshold to the largest block freed so far (up to
    32 MiB), after which inference activations of a few MiB come from the heap, where freed
    blocks leave the process holding pages it no longer uses. A fixed threshold turns the
    raising off: a large tensor's pages go back to the OS when it is freed. Measured with
    ``benchmarks/load_test.py --users 8 --sync`` on ResNet-20: RSS 60 s after the users left
    +16 % above its start without, +7 % with (and peak 986 instead of 1294 MiB), for about a
    third more server CPU time (page faults on fresh pages).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; nothing elsewhere). Cheap: milliseconds."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    Without it the resident size still holds whatever an earlier step (say, an evaluation's
    large batches) freed but the allocator kept, so RSS readings wander by a hundred MiB.
    """
    gc.collect()
    trim_heap()


@functools.cache
def freeze_startup_objects() -> int:
    """Move every object alive now out of the cyclic garbage collector's reach, once per process.

    Call it after the heavy imports (torch, torchvision, plotly, pandas, Streamlit) and before
    any session work. A full collection holds the GIL while it walks every tracked object: with
    the app's ~430,000 objects that took 140–440 ms here, during which no other session's script
    and no websocket message moves. Frozen objects (``gc.freeze``) are skipped by collections (the
    janitor's below, Python's own; Streamlit's after every script run is off in
    ``.streamlit/config.toml``), and afterwards a collection took about 1 ms. Modules and their
    objects live as long as the process anyway; objects made later are collected as usual.
    Returns the number of objects frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


JANITOR_INTERVAL_S = 10.0
#: something the janitor runs before each collection, e.g. dropping a web server's expired sessions
JanitorTask = Callable[[], object]


@functools.cache
def start_memory_janitor(interval_s: float = JANITOR_INTERVAL_S, tasks: tuple[JanitorTask, ...] = ()) -> threading.Thread:
    """Start, once per process, a daemon thread that runs ``tasks`` and :func:`release_memory` every ``interval_s``.

    Why: a closed tab's session is dropped by the server after its TTL, but its objects sit in
    reference cycles, which only the cyclic collector frees; it runs when enough *new*
    allocations happen, or after a script run, so a server whose users have all left never
    runs it, and their memory stays. Each round costs a collection of the objects made since
    startup (see :func:`freeze_startup_objects`) and a ``malloc_trim``: milliseconds.
    ``tasks`` run first, in order, so what they let go of is collected in the same round; one
    that raises is logged and the round goes on.
    """
    thread = threading.Thread(target=janitor_loop, args=(interval_s, threading.Event(), tasks),
                              name="memory-janitor", daemon=True)
    thread.start()
    return thread


def janitor_loop(interval_s: float, stop: threading.Event, tasks: tuple[JanitorTask, ...] = ()) -> None:
    """Every ``interval_s`` until ``stop`` is set: each task, then :func:`release_memory` (the janitor's body)."""
    while not stop.wait(interval_s):
        for task in tasks:
            try:
                task()
            except Exception:  # a janitor that dies would leave every later round undone
                _LOGGER.exception("memory janitor task %r failed", task)
        release_memory()


def process_rss_bytes() -> int:
    """This process's resident set size now (psutil, the reading memory_profiler takes)."""
    import psutil

    return psutil.Process().memory_info().rss

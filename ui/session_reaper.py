"""Dropping Streamlit's expired disconnected sessions on time, so a server whose users have left gives their memory back.

Streamlit (1.67) keeps a closed tab's session for ``server.disconnectedSessionTTL`` seconds in
case the tab reconnects, in a ``MemorySessionStorage`` backed by a TTL cache. That cache treats
an expired entry as absent but removes it only when another session is saved, so after the last
user of a classroom leaves, every session they had (its ``st.session_state``, the pruned models
and engines in it, its script thread's state) stays in memory until someone new connects:
measured with ``benchmarks/load_test.py --users 30``, 23–28 of 30 sessions, about 100 MiB, were
still alive 60 s after everyone left. :func:`reap_expired_sessions` removes the expired entries
and shuts each session down as Streamlit's own ``close_session`` does; the memory janitor runs
it every round (``app.py``).

It reaches into Streamlit's private runtime (the session manager's storage and the runtime's
event loop); where those are not what this code expects (another Streamlit version, another
session storage) it does nothing and logs that once.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from streamlit import runtime

_LOGGER = logging.getLogger(__name__)
REAP_TIMEOUT_S = 5.0


def expire_sessions(cache: Any) -> int:
    """Remove ``cache``'s expired entries (a Streamlit ``TTLCache`` of ``SessionInfo``) and shut their sessions down.

    Returns how many were removed. Must run on the thread that owns the cache (the runtime's
    event loop): Streamlit reads and writes it there without a lock.
    """
    removed = cache.expire()
    for _, info in removed:
        info.session.shutdown()
    return len(removed)


@functools.cache
def _warn_unsupported(what: str) -> None:
    _LOGGER.warning("Expired Streamlit sessions are not reaped early: %s. They are freed when the next "
                    "session connects, as Streamlit does by itself.", what)


def _session_cache_and_loop() -> tuple[Any, asyncio.AbstractEventLoop] | None:
    """The running server's session TTL cache and event loop; None without a server or with unexpected internals."""
    if not runtime.exists():
        return None
    instance = runtime.get_instance()
    storage = getattr(getattr(instance, "_session_mgr", None), "_session_storage", None)
    cache = getattr(storage, "_cache", None)
    loop = getattr(getattr(instance, "_async_objs", None), "eventloop", None)
    if not callable(getattr(cache, "expire", None)):
        _warn_unsupported(f"the session storage is a {type(storage).__name__} without an expiring cache")
        return None
    if loop is None or loop.is_closed():
        return None  # the server is starting or stopping
    return cache, loop


def reap_expired_sessions(timeout_s: float = REAP_TIMEOUT_S) -> int:
    """Remove the server's expired disconnected sessions now, on its event loop; how many (0 without a server).

    Call it from any thread but the event loop's own (the janitor's); it waits up to
    ``timeout_s`` for the loop to do it.
    """
    found = _session_cache_and_loop()
    if found is None:
        return 0
    cache, loop = found

    async def on_loop() -> int:
        return expire_sessions(cache)

    return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(timeout_s)

"""Streamlit's expired disconnected sessions are dropped on time (``ui.session_reaper``)."""
from __future__ import annotations

import asyncio
import logging
import threading
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
from streamlit.runtime.memory_session_storage import MemorySessionStorage
from streamlit.runtime.session_manager import SessionInfo
from streamlit.runtime.websocket_session_manager import WebsocketSessionManager

import ui.session_reaper as reaper


class FakeSession:
    def __init__(self, name: str):
        self.id = name
        self.shut_down_on = None

    def shutdown(self) -> None:
        self.shut_down_on = threading.get_ident()


TTL_S = 15


def storage_with(*names: str, age_s: float) -> tuple[MemorySessionStorage, list[FakeSession]]:
    """A storage holding sessions saved ``age_s`` seconds ago (the storage's clock moved on)."""
    storage = MemorySessionStorage(ttl_seconds=TTL_S)
    sessions = [FakeSession(n) for n in names]
    for session in sessions:
        storage.save(SessionInfo(client=None, session=session, script_run_count=1))
    clock = storage._cache._timer
    storage._cache._timer = lambda: clock() + age_s
    return storage, sessions


def test_expired_sessions_are_removed_and_shut_down():
    storage, sessions = storage_with("a", "b", age_s=TTL_S + 1)
    assert storage.list() == [] and len(storage._cache._data) == 2  # Streamlit keeps them until the next save
    assert reaper.expire_sessions(storage._cache) == 2
    assert len(storage._cache._data) == 0 and all(s.shut_down_on is not None for s in sessions)


def test_sessions_within_their_ttl_stay():
    storage, sessions = storage_with("a", age_s=TTL_S - 5)
    assert reaper.expire_sessions(storage._cache) == 0
    assert storage.get("a") is not None and sessions[0].shut_down_on is None


@pytest.fixture
def running_loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop, thread
    loop.call_soon_threadsafe(loop.stop)
    thread.join(2)
    loop.close()


def fake_runtime(monkeypatch, instance) -> None:
    monkeypatch.setattr(reaper.runtime, "exists", lambda: instance is not None)
    monkeypatch.setattr(reaper.runtime, "get_instance", lambda: instance)


def test_the_reaper_works_on_the_servers_event_loop(monkeypatch, running_loop):
    loop, loop_thread = running_loop
    storage, sessions = storage_with("a", "b", "c", age_s=TTL_S + 1)
    fake_runtime(monkeypatch, SimpleNamespace(_session_mgr=SimpleNamespace(_session_storage=storage),
                                              _async_objs=SimpleNamespace(eventloop=loop)))
    assert reaper.reap_expired_sessions() == 3
    assert {s.shut_down_on for s in sessions} == {loop_thread.ident}  # where Streamlit uses the storage
    assert reaper.reap_expired_sessions() == 0


def test_without_a_server_or_with_other_internals_it_does_nothing(monkeypatch, running_loop, caplog):
    fake_runtime(monkeypatch, None)
    assert reaper.reap_expired_sessions() == 0
    reaper._warn_unsupported.cache_clear()
    fake_runtime(monkeypatch, SimpleNamespace(_session_mgr=SimpleNamespace(_session_storage=object()),
                                              _async_objs=SimpleNamespace(eventloop=running_loop[0])))
    with caplog.at_level(logging.WARNING):
        assert reaper.reap_expired_sessions() == 0
    assert "not reaped early" in caplog.text


def test_the_installed_streamlit_has_the_internals_the_reaper_uses():
    """Fails when a Streamlit upgrade moves them, instead of the reaper silently doing nothing."""
    storage = MemorySessionStorage()
    manager = WebsocketSessionManager(storage, MagicMock(), MagicMock(), MagicMock())
    assert manager._session_storage is storage and callable(storage._cache.expire)
    from streamlit.runtime.runtime import Runtime

    assert "_async_objs" in Runtime.__init__.__code__.co_names

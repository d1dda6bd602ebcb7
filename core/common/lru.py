"""A small thread-safe LRU mapping, for the process-wide caches that sessions share."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class LRUCache:
    """At most ``size`` entries; reading an entry makes it the most recent. Safe across threads."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"an LRU cache needs room for at least 1 entry, got {size}")
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def get_or_create(self, key: Hashable, factory):
        """The entry for ``key``, created with ``factory()`` under the lock if missing (one per key, ever)."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            value = self._data[key] = factory()
            while len(self._data) > self.size:
                self._data.popitem(last=False)
            return value

    def values(self) -> list:
        with self._lock:
            return list(self._data.values())

    def items(self) -> list[tuple]:
        with self._lock:
            return list(self._data.items())

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

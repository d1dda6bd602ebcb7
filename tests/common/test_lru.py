import pytest

from core.common.lru import LRUCache


def test_keeps_the_most_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    assert cache.get("missing", "default") == "default"
    cache.clear()
    assert len(cache) == 0


def test_needs_room():
    with pytest.raises(ValueError, match="at least 1"):
        LRUCache(0)


def test_get_or_create_makes_one_entry_per_key():
    cache = LRUCache(2)
    made = []
    first = cache.get_or_create("k", lambda: made.append(1) or object())
    assert cache.get_or_create("k", lambda: made.append(2) or object()) is first and made == [1]

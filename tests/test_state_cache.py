"""The prefix state cache: longest-prefix lookup, LRU order, the byte bound and its metrics."""

from __future__ import annotations

import numpy as np
import pytest

from server.metrics import Metrics
from server.state_cache import ENTRY_OVERHEAD, StateCache

LAYERS, HIDDEN, VOCAB = 2, 8, 30


def state(seed: float) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.full((LAYERS, HIDDEN), seed, dtype=np.float32),
        np.full((LAYERS, HIDDEN), -seed, dtype=np.float32),
    )


def logprobs(seed: float) -> np.ndarray:
    return np.full(VOCAB, seed, dtype=np.float32)


def entry_bytes(n_tokens: int) -> int:
    return 8 * n_tokens + 2 * 4 * LAYERS * HIDDEN + 4 * VOCAB + ENTRY_OVERHEAD


def ids(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int64)


def test_longest_cached_prefix_wins() -> None:
    cache = StateCache(1 << 20)
    cache.insert(ids(1, 2), state(1), logprobs(1))
    cache.insert(ids(1, 2, 3, 4), state(2), logprobs(2))
    cache.insert(ids(1, 2, 3, 4, 5, 6, 7), state(3), logprobs(3))
    hit = cache.lookup(ids(1, 2, 3, 4, 5, 6))
    assert hit is not None and hit.length == 4
    np.testing.assert_array_equal(hit.state[0], state(2)[0])
    np.testing.assert_array_equal(hit.logprobs, logprobs(2))
    exact = cache.lookup(ids(1, 2, 3, 4, 5, 6, 7))
    assert exact is not None and exact.length == 7
    assert cache.lookup(ids(9, 2, 3, 4)) is None  # same tail, different start
    assert cache.lookup(ids(1)) is None  # shorter than every entry
    assert (cache.hits, cache.misses) == (2, 2)


def test_entries_are_read_only_copies() -> None:
    cache = StateCache(1 << 20)
    s, lp, key = state(1), logprobs(1), ids(4, 5)
    cache.insert(key, s, lp)
    s[0][:] = 7
    lp[:] = 7
    key[0] = 9
    hit = cache.lookup(ids(4, 5))
    assert hit is not None
    assert hit.state[0][0, 0] == 1 and hit.logprobs[0] == 1
    with pytest.raises(ValueError):
        hit.logprobs[0] = 0


def test_hash_collision_is_a_miss_not_a_wrong_state() -> None:
    # Thue-Morse sequences collide under any polynomial hash modulo 2**64.
    thue_morse = np.array([bin(i).count("1") % 2 for i in range(2048)], dtype=np.int64)
    cache = StateCache(1 << 20)
    cache.insert(thue_morse, state(1), logprobs(1))
    assert cache.lookup(1 - thue_morse) is None
    hit = cache.lookup(thue_morse)
    assert hit is not None and hit.length == 2048


def test_byte_bound_holds_and_lru_evicts_the_oldest() -> None:
    metrics = Metrics()
    capacity = 3 * entry_bytes(3)
    cache = StateCache(capacity, metrics.engine_metrics("m", "1").state_cache)
    for t in range(3):
        cache.insert(ids(t, t, t), state(t), logprobs(t))
    assert cache.bytes == capacity and cache.evictions == 0
    assert cache.lookup(ids(0, 0, 0)) is not None  # 0 is now the most recently used
    cache.insert(ids(3, 3, 3), state(3), logprobs(3))
    assert cache.bytes <= capacity
    assert cache.evictions == 1
    assert cache.lookup(ids(1, 1, 1)) is None  # the least recently used went first
    assert cache.lookup(ids(0, 0, 0)) is not None
    for t in range(4, 40):
        cache.insert(ids(t, t, t, t, t), state(t), logprobs(t))
        assert cache.bytes <= capacity
    assert len(cache) == capacity // entry_bytes(5)
    registry = metrics.registry
    labels = {"model": "m"}
    assert registry.get_sample_value("rnnlm_state_cache_bytes", labels) == cache.bytes
    assert registry.get_sample_value("rnnlm_state_cache_evictions_total", labels) == (
        cache.evictions
    )
    assert registry.get_sample_value("rnnlm_state_cache_hits_total", labels) == cache.hits
    assert registry.get_sample_value("rnnlm_state_cache_misses_total", labels) == cache.misses


def test_reinserting_a_key_replaces_it() -> None:
    cache = StateCache(1 << 20)
    cache.insert(ids(1, 2), state(1), logprobs(1))
    cache.insert(ids(1, 2), state(5), logprobs(5))
    assert len(cache) == 1 and cache.bytes == entry_bytes(2)
    hit = cache.lookup(ids(1, 2))
    assert hit is not None and hit.logprobs[0] == 5


def test_zero_capacity_and_oversized_entries_store_nothing() -> None:
    off = StateCache(0)
    assert off.insert(ids(1), state(1), logprobs(1)) is None
    assert off.lookup(ids(1)) is None and off.misses == 1
    small = StateCache(entry_bytes(2))
    assert small.insert(ids(1, 2, 3), state(1), logprobs(1)) is None
    assert small.insert(ids(1, 2), state(1), logprobs(1)) is not None
    assert small.bytes == entry_bytes(2)
    assert small.lookup(ids()) is None  # an empty context is not a lookup
    assert small.hits == 0 and small.misses == 0
    with pytest.raises(ValueError, match="capacity"):
        StateCache(-1)


def test_find_gives_the_key_an_insert_can_reuse() -> None:
    cache = StateCache(1 << 20)
    cache.insert(ids(1, 2, 3), state(1), logprobs(1))
    hit, key = cache.find(ids(1, 2, 3, 4, 5))
    assert hit is not None and hit.length == 3 and key is not None
    cache.insert(ids(1, 2, 3, 4, 5), state(2), logprobs(2), key)
    again, same = cache.find(ids(1, 2, 3, 4, 5))
    assert again is not None and again.length == 5 and same == key
    assert cache.find(ids()) == (None, None)


def test_read_only_arrays_that_own_their_memory_are_kept_not_copied() -> None:
    cache = StateCache(1 << 20)
    tokens, lp = ids(7, 8), logprobs(3)
    s = state(3)
    for a in (tokens, lp, *s):
        a.setflags(write=False)
    entry = cache.insert(tokens, s, lp)
    assert entry is not None
    assert entry.tokens is tokens and entry.logprobs is lp and entry.state[0] is s[0]
    view = np.arange(6, dtype=np.int64)[:3]  # a read-only view of a longer array: copied
    view.setflags(write=False)
    entry = cache.insert(view, s, lp)
    assert entry is not None and entry.tokens is not view and entry.tokens.base is None


def test_many_cached_lengths_still_find_the_longest_prefix() -> None:
    cache = StateCache(1 << 24)
    for n in range(1, 200):
        cache.insert(np.arange(n, dtype=np.int64) + 1000, state(n), logprobs(n))
    cache.insert(ids(5, 6, 7), state(0), logprobs(0))
    hit = cache.lookup(np.array([5, 6, 7, *range(300)], dtype=np.int64))
    assert hit is not None and hit.length == 3  # found past 196 longer candidate lengths
    assert cache.lookup(np.arange(150, dtype=np.int64) + 1000).length == 150  # type: ignore[union-attr]

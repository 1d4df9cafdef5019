"""An LRU cache of recurrent states after token prefixes, bounded in bytes.

A context that extends a cached one (the predictive-typing pattern: the same sentence, one more
word) then costs only its new tokens, and an exact hit costs no run at all because the entry
also holds the next-token log-probs at the prefix's end. One cache belongs to one engine, that
is one model version, so the version is part of every key by construction.

Lookups hash every prefix of the context at once (a polynomial hash, vectorised in numpy with
wrapping uint64 arithmetic) and probe only the prefix lengths present in the cache, longest
first; a hit is confirmed by comparing the stored tokens, so a hash collision is only a miss.
Thread-safe: the engine looks up on the event loop and inserts from its batching thread.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# An odd 64-bit multiplier (from splitmix64) for the prefix hash.
_BASE = np.uint64(0x9E3779B97F4A7C15)
# Python object overhead charged per entry on top of its arrays, so many tiny entries still
# count against the byte bound.
ENTRY_OVERHEAD = 512


class CacheMetrics(Protocol):
    def cache_hit(self) -> None: ...
    def cache_miss(self) -> None: ...
    def cache_evict(self) -> None: ...
    def set_cache_bytes(self, n: int) -> None: ...


@dataclass(frozen=True)
class CachedPrefix:
    """The state after `tokens` (conditioned on eos) and the log-probs of the next token."""

    tokens: np.ndarray  # int64 [n], read-only
    state: tuple[np.ndarray, ...]  # one read-only float32 [layers, hidden] per state tensor
    logprobs: np.ndarray  # float32 [V], read-only
    nbytes: int

    @property
    def length(self) -> int:
        return len(self.tokens)


class StateCache:
    """Prefix -> (state, next-token log-probs), least recently used evicted first."""

    def __init__(self, capacity_bytes: int, metrics: CacheMetrics | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"state cache capacity must be >= 0 bytes, not {capacity_bytes}")
        self.capacity = capacity_bytes
        self._metrics = metrics
        self._entries: OrderedDict[tuple[int, int], CachedPrefix] = OrderedDict()
        self._length_counts: dict[int, int] = {}
        self._lengths: list[int] = []  # sorted distinct lengths present
        self._powers = np.ones(1, dtype=np.uint64)
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: np.ndarray) -> CachedPrefix | None:
        """The longest cached prefix of `tokens` (length >= 1), or None; counts a hit or miss."""
        if not len(tokens):
            return None
        found = None
        if self.capacity:
            hashes = self._prefix_hashes(tokens)
            with self._lock:
                found = self._find(tokens, hashes)
                if found is not None:
                    self._entries.move_to_end((found.length, int(hashes[found.length - 1])))
                    self.hits += 1
                else:
                    self.misses += 1
        else:
            with self._lock:
                self.misses += 1
        if self._metrics is not None:
            if found is not None:
                self._metrics.cache_hit()
            else:
                self._metrics.cache_miss()
        return found

    def insert(
        self, tokens: np.ndarray, state: tuple[np.ndarray, ...], logprobs: np.ndarray
    ) -> CachedPrefix | None:
        """Store a prefix's state and next-token log-probs (copied, read-only); evict to fit.

        Returns the stored entry, or None when it cannot fit at all (or `tokens` is empty).
        """
        if not len(tokens) or not self.capacity:
            return None
        tokens = _frozen(np.array(tokens, dtype=np.int64))
        state = tuple(_frozen(np.array(s, dtype=np.float32)) for s in state)
        logprobs = _frozen(np.array(logprobs, dtype=np.float32))
        nbytes = tokens.nbytes + sum(s.nbytes for s in state) + logprobs.nbytes + ENTRY_OVERHEAD
        if nbytes > self.capacity:
            return None
        entry = CachedPrefix(tokens, state, logprobs, nbytes)
        key = (len(tokens), int(self._prefix_hashes(tokens)[-1]))
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(old)
            self._entries[key] = entry
            self.bytes += nbytes
            count = self._length_counts.get(len(tokens), 0)
            if count == 0:
                bisect.insort(self._lengths, len(tokens))
            self._length_counts[len(tokens)] = count + 1
            while self.bytes > self.capacity:
                _, victim = self._entries.popitem(last=False)
                self._forget(victim)
                evicted += 1
            self.evictions += evicted
            total = self.bytes
        if self._metrics is not None:
            for _ in range(evicted):
                self._metrics.cache_evict()
            self._metrics.set_cache_bytes(total)
        return entry

    def _find(self, tokens: np.ndarray, hashes: np.ndarray) -> CachedPrefix | None:
        hash_list = hashes.tolist()
        for length in reversed(self._lengths[: bisect.bisect_right(self._lengths, len(tokens))]):
            entry = self._entries.get((length, hash_list[length - 1]))
            if entry is not None and np.array_equal(entry.tokens, tokens[:length]):
                return entry
        return None

    def _forget(self, entry: CachedPrefix) -> None:
        """Account for an entry already removed from `_entries` (lock held)."""
        self.bytes -= entry.nbytes
        count = self._length_counts[entry.length] - 1
        if count:
            self._length_counts[entry.length] = count
        else:
            del self._length_counts[entry.length]
            self._lengths.remove(entry.length)

    def _prefix_hashes(self, tokens: np.ndarray) -> np.ndarray:
        """hash(tokens[:i+1]) for every i: sum of (t_j + 1) * BASE**j, wrapping in uint64."""
        n = len(tokens)
        powers = self._powers
        if len(powers) < n:
            size = max(n, 2 * len(powers))
            powers = np.empty(size, dtype=np.uint64)
            powers[0] = 1
            powers[1:] = _BASE
            powers = np.cumprod(powers, dtype=np.uint64)
            self._powers = powers
        values = np.asarray(tokens, dtype=np.int64).astype(np.uint64) + np.uint64(1)
        return np.cumsum(values * powers[:n], dtype=np.uint64)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a

"""An LRU cache of recurrent states after token prefixes, bounded in bytes.

A context that extends a cached one (the predictive-typing pattern: the same sentence, one more
word) then costs only its new tokens, and an exact hit costs no run at all because the entry
also holds the next-token log-probs at the prefix's end. One cache belongs to one engine, that
is one model version, so the version is part of every key by construction.

Lookups hash every prefix of the context at once (a polynomial hash, vectorised in numpy with
wrapping uint64 arithmetic) and probe only the prefix lengths present in the cache, longest
first; a hit is confirmed by comparing the stored tokens, so a hash collision is only a miss.
`find` also returns the whole context's hash, so the engine's insert of the extended context
does not hash it again: a lookup and an insert cost a few vectorised passes over the tokens
and a handful of dictionary probes, not Python work per token.
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
_ONE = np.uint64(1)
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
    # The last layer's features at the prefix's last positions (the continuous cache's recall
    # needs them), when the entry was stored with them: read-only float32 [m, hidden].
    features: np.ndarray | None = None

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
        self._length_array: np.ndarray | None = None  # the same, for vectorised probes
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
        return self.find(tokens)[0]

    def find(self, tokens: np.ndarray) -> tuple[CachedPrefix | None, int | None]:
        """`lookup`, and the key of all of `tokens` for a later `insert` (None if empty)."""
        if not len(tokens):
            return None, None
        if not self.capacity:
            with self._lock:
                self.misses += 1
            if self._metrics is not None:
                self._metrics.cache_miss()
            return None, None
        found = None
        hashes = self._prefix_hashes(tokens)
        key = int(hashes[-1])
        with self._lock:
            if self._entries:
                found = self._find(tokens, hashes)
            if found is not None:
                self._entries.move_to_end((found.length, int(hashes[found.length - 1])))
                self.hits += 1
            else:
                self.misses += 1
        if self._metrics is not None:
            if found is not None:
                self._metrics.cache_hit()
            else:
                self._metrics.cache_miss()
        return found, key

    def insert(
        self,
        tokens: np.ndarray,
        state: tuple[np.ndarray, ...],
        logprobs: np.ndarray,
        key: int | None = None,
        features: np.ndarray | None = None,
    ) -> CachedPrefix | None:
        """Store a prefix's state and next-token log-probs (read-only copies); evict to fit.

        `key`: the one `find` gave for these tokens, saving a hash. Read-only arrays that own
        their memory are kept as they are (nobody can change them). Returns the stored entry,
        or None when it cannot fit at all (or `tokens` is empty).
        """
        if not len(tokens) or not self.capacity:
            return None
        tokens = _read_only(tokens, np.int64)
        state = tuple(_read_only(s, np.float32) for s in state)
        logprobs = _read_only(logprobs, np.float32)
        if features is not None:
            features = _read_only(features, np.float32)
        arrays = [tokens, *state, logprobs, *([] if features is None else [features])]
        nbytes = sum(a.nbytes for a in arrays) + ENTRY_OVERHEAD
        if nbytes > self.capacity:
            return None
        entry = CachedPrefix(tokens, state, logprobs, nbytes, features)
        if key is None:
            key = int(self._prefix_hashes(tokens)[-1])
        full = (len(tokens), key)
        evicted = 0
        with self._lock:
            old = self._entries.pop(full, None)
            if old is not None:
                self._forget(old)
            self._entries[full] = entry
            self.bytes += nbytes
            count = self._length_counts.get(len(tokens), 0)
            if count == 0:
                bisect.insort(self._lengths, len(tokens))
                self._length_array = None
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
        """The longest entry that is a prefix of `tokens` (lock held).

        Probes the cached lengths up to len(tokens), longest first: usually the first probe
        hits (the context the caller sent before), so a few are tried, from the sorted list,
        before the rest, whose hashes are then gathered in one go. (The rest's array is made
        only then: a session whose context grows adds a length on every call, and remaking
        the array of thousands of lengths for every lookup cost 20 to 50 us.)
        """
        end = bisect.bisect_right(self._lengths, len(tokens))
        near = self._lengths[max(0, end - 4) : end][::-1]
        found = self._probe(tokens, hashes, near)
        if found is not None or end <= 4:
            return found
        if self._length_array is None:
            self._length_array = np.array(self._lengths, dtype=np.int64)
        return self._probe(tokens, hashes, self._length_array[: end - 4][::-1].tolist())

    def _probe(
        self, tokens: np.ndarray, hashes: np.ndarray, lengths: list[int]
    ) -> CachedPrefix | None:
        """The first of `lengths` whose prefix of `tokens` is cached (lock held)."""
        if not lengths:
            return None
        keys = hashes[np.array(lengths, dtype=np.intp) - 1].tolist()
        for length, h in zip(lengths, keys, strict=True):
            entry = self._entries.get((length, h))
            # The key holds the length, so the lengths match: equal elements are enough.
            if entry is not None and (entry.tokens == tokens[:length]).all():
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
            self._length_array = None

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
        # The int64 ids' bits as uint64 (what a cast gives), one temporary, and the methods
        # rather than numpy's module functions (each a few Python calls on every lookup).
        values = np.asarray(tokens, dtype=np.int64).view(np.uint64) + _ONE
        values *= powers[:n]
        return values.cumsum(dtype=np.uint64)


def _read_only(a: np.ndarray, dtype: type) -> np.ndarray:
    """`a` itself when it is read-only and owns its memory, else a read-only copy."""
    if a.dtype == dtype and a.flags.owndata and not a.flags.writeable and a.flags.c_contiguous:
        return a
    out: np.ndarray = np.array(a, dtype=dtype)
    out.setflags(write=False)
    return out

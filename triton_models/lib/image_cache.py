"""An LRU of image features with a byte budget, shared by the threads of one vision_encoder process.

Entries are private read-only copies, so the bytes counted are the bytes held (a slice of a batched
run would keep the whole batch alive) and no caller can change what another one gets.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    inserts: int = 0
    entries: int = 0
    bytes: int = 0
    budget_bytes: int = 0


class FeatureCache:
    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the image cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._stats = CacheStats(budget_bytes=self.budget_bytes)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def get(self, key: bytes) -> np.ndarray | None:
        """The features stored under `key` (read-only), or None; counts a hit or a miss."""
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return features

    def put(self, key: bytes, features: np.ndarray) -> None:
        """Store a copy of `features`, evicting least recently used entries to stay within the budget.
        An entry larger than the whole budget is not stored."""
        size = int(features.nbytes)
        if size > self.budget_bytes:
            return
        entry = np.array(features, copy=True, order="C")
        entry.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._bytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._stats.evictions += 1
            self._entries[key] = entry
            self._bytes += size
            self._stats.inserts += 1

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**{**vars(self._stats), "entries": len(self._entries), "bytes": self._bytes})

"""A thread-safe LRU cache bounded by entries and by bytes, for the explorer's analyses.

Bounded both ways so that neither many small prompts nor a few long ones can grow the
server's memory without limit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch


class ByteLRU:
    """LRU mapping whose total size (as reported by the caller) stays under `max_bytes`
    (both limits >= 1: `ExplorerSettings` checks them)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, count: bool = True) -> Any | None:
        """The value, or None; `count=False` for a re-check that must not skew the stats."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += count
                return None
            self._data.move_to_end(key)
            self.hits += count
            return item[0]

    def get_or_compute(
        self, key: Hashable, compute: Callable[[], tuple[Any, int]], lock: threading.Lock
    ) -> Any:
        """The value, else `compute()` -> (value, nbytes) under `lock`, inserted. A caller that
        waited on the lock finds what the one before it computed (counted once, as a miss)."""
        hit = self.get(key)
        if hit is not None:
            return hit
        with lock:
            hit = self.get(key, count=False)
            if hit is None:
                hit, nbytes = compute()
                self.put(key, hit, nbytes)
            return hit

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Insert (an item larger than the whole budget is simply not kept)."""
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes > self.max_bytes:
                return
            self._data[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, size) = self._data.popitem(last=False)
                self._bytes -= size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in obj (nested dicts/lists/tuples), plus a small overhead."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 64

"""`SortedRuns`: a table of distinct sorted keys with a value per key in named columns, grown by appending.

The matcher's look-up tables (a blocking rule's blocks, a field's value codes, the id -> position map) are
searched a part at a time with `np.searchsorted`. Kept as one sorted array each, every part's new keys were
put in place with `np.insert`, which copies the whole table: a 2,000,000-row batch copied each key about
a hundred times, and the ever larger copies left holes in the malloc heap that the process kept.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

MAPPED_BYTES = 1 << 20  # arrays this large are memory maps of their own (see `SortedRuns._reserve`)


class SortedRuns:
    """Distinct keys with a value per key in each named column, stored as sorted runs.

    The keys an `append` adds, sorted, become a run of their own at the end of one buffer per column (its
    capacity doubled when full), and the newest runs are merged in place, by one stable sort of their keys
    (a merge of sorted runs, linear), as soon as they hold a `RATIO`-th of the run before them. So a key
    is copied a few times over the table's life instead of once per `append`, and a look-up searches a few
    runs. A key's place is its index in the buffer: `column(name)[place]` reads or updates its value, until
    the next `append` or `delete` moves keys.

    >>> table = SortedRuns(np.uint32, code=np.int32)
    >>> table.append(np.array([5, 9], dtype=np.uint32), code=np.array([0, 1]))
    >>> table.append(np.array([7], dtype=np.uint32), code=np.array([2]))
    >>> places = table.find(np.array([9, 7, 8], dtype=np.uint32))
    >>> places.tolist(), table.column("code")[places[:2]].tolist()  # two runs merged: 5, 7, 9
    ([2, 1, -1], [1, 2])
    """

    RATIO = 4  # newer runs holding a quarter of the run before them are merged into it

    def __init__(self, key_type: Any, **column_types: Any) -> None:
        self._arrays = {"keys": np.zeros(0, dtype=key_type)}
        self._arrays.update({name: np.zeros(0, dtype=kind) for name, kind in column_types.items()})
        self._size = 0
        self._starts: list[int] = []  # where each run begins; runs end where the next begins

    def __len__(self) -> int:
        return self._size

    def __getstate__(self) -> dict[str, Any]:
        """Pickles the keys held, not the spare capacity."""
        return {"arrays": {name: self.column(name).copy() for name in self._arrays}, "starts": self._starts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._arrays, self._starts = state["arrays"], state["starts"]
        self._size = len(self._arrays["keys"])

    @property
    def keys(self) -> np.ndarray:
        return self.column("keys")

    def column(self, name: str) -> np.ndarray:
        """The values of a column (or "keys") at every place: a view, which updates the table."""
        return self._arrays[name][: self._size]

    def in_key_order(self) -> dict[str, np.ndarray]:
        """Every column (and "keys") sorted by key: the same for tables holding the same keys and values,
        however they were appended."""
        order = np.argsort(self.keys, kind="stable")
        return {name: self.column(name)[order] for name in self._arrays}

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The place of each of these keys, -1 where it is not held; one search per run, newest first, of
        the keys not found yet (searched in sorted order, each search then starts where the one before
        ended)."""
        places = np.full(len(keys), -1, dtype=np.int64)
        if not self._size or not len(keys):
            return places
        keys = np.asarray(keys, dtype=self._arrays["keys"].dtype)
        order = np.argsort(keys)
        needles = keys[order]
        stored = self.keys
        ends = [*self._starts[1:], self._size]
        for start, end in zip(reversed(self._starts), reversed(ends), strict=True):
            run = stored[start:end]
            at = np.minimum(np.searchsorted(run, needles), len(run) - 1)
            hit = run[at] == needles
            places[order[hit]] = start + at[hit]
            if hit.all():
                break
            order, needles = order[~hit], needles[~hit]
        return places

    def append(self, keys: np.ndarray, **values: np.ndarray) -> None:
        """Adds distinct keys not held (in any order), with a value for each in every column."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        end = self._size + len(keys)
        self._reserve(end)
        for name, stored in self._arrays.items():
            stored[self._size : end] = (keys if name == "keys" else values[name])[order]
        self._starts.append(self._size)
        self._size = end
        self._merge_newest()

    def delete(self, places: np.ndarray) -> None:
        """Forgets the keys at these distinct places; the others keep their order. It moves what follows
        the first run touched: cheap for the newest keys (undoing the latest `append`), a copy of the
        table for old ones."""
        if not len(places):
            return
        places = np.sort(np.asarray(places, dtype=np.int64))
        starts = np.asarray(self._starts, dtype=np.int64)
        begin = int(starts[np.searchsorted(starts, places[0], side="right") - 1])
        keep = np.ones(self._size - begin, dtype=bool)
        keep[places - begin] = False
        for stored in self._arrays.values():
            kept = stored[begin : self._size][keep]
            stored[begin : begin + len(kept)] = kept
        self._size -= len(places)
        moved = starts - np.searchsorted(places, starts)  # each run's start less the keys deleted before it
        self._starts = [int(start) for start in np.unique(moved) if start < self._size]

    def _reserve(self, size: int) -> None:
        """Room for `size` keys: the capacity doubles when full. A large buffer is an anonymous memory map,
        not malloc's: the room not written yet is not resident, and an outgrown buffer goes back to the
        system at once instead of leaving a hole in the heap that the next, larger one does not fit."""
        capacity = len(self._arrays["keys"])
        if size <= capacity:
            return
        capacity = max(size, 2 * capacity, 1024)
        for name, stored in self._arrays.items():
            grown = _mapped(capacity, stored.dtype)
            grown[: self._size] = stored[: self._size]
            self._arrays[name] = grown

    def _merge_newest(self) -> None:
        """Merges the newest runs into one while they hold a `RATIO`-th or more of the run before them."""
        first, merged = len(self._starts) - 1, self._size - self._starts[-1]
        while first and self._starts[first] - self._starts[first - 1] < self.RATIO * merged:
            first -= 1
            merged = self._size - self._starts[first]
        if first == len(self._starts) - 1:
            return
        begin = self._starts[first]
        order = np.argsort(self.keys[begin:], kind="stable")  # sorted runs: timsort merges them
        for stored in self._arrays.values():
            # The reordered copy is as large as the table at times: mapped too (see `_reserve`).
            reordered = np.take(stored[begin : self._size], order, out=_mapped(len(order), stored.dtype))
            stored[begin : self._size] = reordered
        del self._starts[first + 1 :]


def _mapped(count: int, kind: Any) -> np.ndarray:
    """An array of `count` items in a private anonymous memory map (see `SortedRuns._reserve`) when it is
    `MAPPED_BYTES` or more; a smaller one from malloc, whose warm pages cost no fault to write."""
    size = count * np.dtype(kind).itemsize
    if size < MAPPED_BYTES:
        return np.empty(count, dtype=kind)
    return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE), dtype=kind, count=count)

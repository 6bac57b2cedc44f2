"""`SortedRuns`: a table of distinct sorted keys with a value per key in named columns, grown by appending.

The matcher's look-up tables (a blocking rule's blocks, a field's value codes, the id -> position map) are
searched a part at a time with `np.searchsorted`. Kept as one sorted array each, every part's new keys were
put in place with `np.insert`, which copies the whole table: a 2,000,000-row batch copied each key about
a hundred times, and the ever larger copies left holes in the malloc heap that the process kept.

A batch's near-unique order numbers and amounts give these tables a key per record (8 to 14 bytes each):
so each column is a `ColumnFile`, in an unlinked temporary file read through a shared memory map, which
is page cache rather than this process's anonymous memory, and whose pages `release` unmaps between parts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.duplicates.storage import ColumnFile


class SortedRuns:
    """Distinct keys with a value per key in each named column, stored as sorted runs.

    The keys an `append` adds, sorted, become a run of their own at the end of one buffer per column (its
    capacity doubled when full), and the newest runs are merged in place (a merge of sorted runs, linear)
    as soon as they hold a `RATIO`-th of the run before them. So a key is copied a few times over the
    table's life instead of once per `append`, and a look-up searches a few runs. A key's place is its
    index in the buffer: `take(name, places)` reads and `put` updates its value, until the next `append` or
    `delete` moves keys. Each buffer is a `ColumnFile` (in a file once it outgrows
    `ColumnFile.MEMORY_BYTES`); look-ups, reads, updates and large merges go a `ColumnFile` window at a
    time and unmap each after, so that they hold a window of a large table, not all of it (a part's keys
    lie all over it); `release` unmaps the pages used so far, and the values stay.

    >>> table = SortedRuns(np.uint32, code=np.int32)
    >>> table.append(np.array([5, 9], dtype=np.uint32), code=np.array([0, 1]))
    >>> table.append(np.array([7], dtype=np.uint32), code=np.array([2]))
    >>> places = table.find(np.array([9, 7, 8], dtype=np.uint32))
    >>> places.tolist(), table.column("code")[places[:2]].tolist()  # two runs merged: 5, 7, 9
    ([2, 1, -1], [1, 2])
    """

    RATIO = 4  # newer runs holding a quarter of the run before them are merged into it

    def __init__(self, key_type: Any, **column_types: Any) -> None:
        self._columns = {"keys": ColumnFile(key_type)}
        self._columns.update({name: ColumnFile(kind) for name, kind in column_types.items()})
        self._starts: list[int] = []  # where each run begins; runs end where the next begins

    def __len__(self) -> int:
        return len(self._columns["keys"])

    def __getstate__(self) -> dict[str, Any]:
        """Pickles the keys held as arrays, not the spare capacity nor the files."""
        return {"arrays": {name: self.column(name).copy() for name in self._columns}, "starts": self._starts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._columns = {name: ColumnFile(values.dtype) for name, values in state["arrays"].items()}
        for name, values in state["arrays"].items():
            self._columns[name].extend(values)
        self._starts = state["starts"]

    @property
    def keys(self) -> np.ndarray:
        return self.column("keys")

    def column(self, name: str) -> np.ndarray:
        """The values of a column (or "keys") at every place: a view, which updates the table."""
        return self._columns[name].view()

    def in_key_order(self) -> dict[str, np.ndarray]:
        """Every column (and "keys") sorted by key: the same for tables holding the same keys and values,
        however they were appended."""
        order = np.argsort(self.keys, kind="stable")
        return {name: self.column(name)[order] for name in self._columns}

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The place of each of these keys, -1 where it is not held; one search per run, newest first, of
        the keys not found yet (`_search`: a window of the run at a time)."""
        places = np.full(len(keys), -1, dtype=np.int64)
        if not len(self) or not len(keys):
            return places
        keys = np.asarray(keys, dtype=self._columns["keys"].dtype)
        order = np.argsort(keys)
        needles = keys[order]
        ends = [*self._starts[1:], len(self)]
        for start, end in zip(reversed(self._starts), reversed(ends), strict=True):
            at, hit = self._search(needles, start, end)
            places[order[hit]] = at[hit]
            if hit.all():
                break
            order, needles = order[~hit], needles[~hit]
        return places

    def take(self, name: str, places: np.ndarray) -> np.ndarray:
        """The values of a column (or "keys") at these places, read a window at a time (`ColumnFile.take`)."""
        return self._columns[name].take(places)

    def put(self, name: str, places: np.ndarray, values: np.ndarray) -> None:
        """Sets the values of a column at these distinct places, a window at a time (`ColumnFile.put`)."""
        self._columns[name].put(places, values)

    def _search(self, needles: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """`start + np.searchsorted(keys[start:end], needles)` for sorted needles, and whether the key there
        is the needle. A search of a part's keys all over a large run touches nearly every page of it, so
        the run is searched one `ColumnFile` window at a time, each unmapped after: the needles are cut by
        the first key of each window (read with one strided read), and each window searched for its own."""
        column = self._columns["keys"]
        stored = column.view()
        spans = column.spans(start, end)
        fences = stored[[first for first, _ in spans[1:]]]
        cuts = [0, *np.searchsorted(needles, fences).tolist(), len(needles)]
        at = np.empty(len(needles), dtype=np.int64)
        hit = np.zeros(len(needles), dtype=bool)
        for (first, last), low, high in zip(spans, cuts[:-1], cuts[1:], strict=True):
            if high > low:
                window, wanted = stored[first:last], needles[low:high]
                found = np.searchsorted(window, wanted)
                at[low:high] = first + found
                inside = np.flatnonzero(found < len(window))
                hit[low + inside] = window[found[inside]] == wanted[inside]
            column.release_window(first, last)
        return at, hit

    def append(self, keys: np.ndarray, **values: np.ndarray) -> None:
        """Adds distinct keys not held (in any order), with a value for each in every column."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._starts.append(len(self))
        for name, column in self._columns.items():
            column.extend((keys if name == "keys" else values[name])[order])
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
        keep = np.ones(len(self) - begin, dtype=bool)
        keep[places - begin] = False
        size = len(self) - len(places)
        for column in self._columns.values():
            stored = column.view()
            stored[begin:size] = stored[begin:][keep]
            column.truncate(size)
        moved = starts - np.searchsorted(places, starts)  # each run's start less the keys deleted before it
        self._starts = [int(start) for start in np.unique(moved) if start < size]

    def release(self) -> None:
        """Unmaps from this process the pages of the columns read or written so far (`ColumnFile.release`);
        the values stay in the files."""
        for column in self._columns.values():
            column.release()

    def _merge_newest(self) -> None:
        """Merges the newest runs into one while they hold a `RATIO`-th or more of the run before them: by
        one stable sort of their keys while they fit in a window (`_window`), else the newest two first
        (`_merge_into`), then each run before them with what those merged into."""
        first, merged = len(self._starts) - 1, len(self) - self._starts[-1]
        while first and self._starts[first] - self._starts[first - 1] < self.RATIO * merged:
            first -= 1
            merged = len(self) - self._starts[first]
        if first == len(self._starts) - 1:
            return
        if merged <= self._window():
            self._sort_from(self._starts[first])
        else:
            for run in reversed(range(first, len(self._starts) - 1)):
                self._merge_into(self._starts[run], self._starts[run + 1])
        del self._starts[first + 1 :]

    def _window(self) -> int:
        """Keys per `ColumnFile` window of the widest column: what a merge reads or writes at a time."""
        return min(column.window_items for column in self._columns.values())

    def _sort_from(self, begin: int) -> None:
        """Merges the runs from `begin` on (a window's worth at most) by one stable sort of their keys
        (of sorted runs: timsort merges them)."""
        order = np.argsort(self.keys[begin:], kind="stable")
        for column in self._columns.values():
            stored = column.view()[begin:]
            stored[:] = stored[order]

    def _merge_into(self, begin: int, middle: int) -> None:
        """Merges the sorted keys from `middle` on, and their values, into the sorted run from `begin`.

        At ~9 of 10 million keys a merge is the whole table: so it holds a window of it at a time, as a
        look-up does. The newer keys are copied aside (`_copied`), and the merged table is written from
        its end down: each `ColumnFile` window's worth of newer keys goes where `_search` finds it in the
        run (plus the newer keys before it), the run's keys between them move up, a window at a time,
        each unmapped after. A key of the run only moves up, so writing from the end never overwrites one
        still to be moved; the order kept is a place per newer key of one window, not per merged key."""
        newer = {name: _copied(column, middle, len(self)) for name, column in self._columns.items()}
        step = self._window()
        older_end, newer_end = middle, len(self) - middle  # what is still to be placed of each
        while newer_end:
            newer_start = max(0, newer_end - step)
            at, _ = self._search(newer["keys"].view()[newer_start:newer_end], begin, older_end)
            places = at + np.arange(newer_start, newer_end)  # where each of these newer keys goes
            low, high = int(places[0]), older_end + newer_end
            for end in range(high, low, -step):  # the merged items from `low` to `high`, a window each
                start = max(low, end - step)
                inside = slice(*np.searchsorted(places, [start, end]))
                from_newer = np.zeros(end - start, dtype=bool)
                from_newer[places[inside] - start] = True
                older_start = older_end - (end - start - int(from_newer.sum()))
                for name, column in self._columns.items():
                    stored, merged = column.view(), np.empty(end - start, dtype=column.dtype)
                    merged[from_newer] = newer[name].view()[newer_start:][inside]
                    merged[~from_newer] = stored[older_start:older_end]
                    stored[start:end] = merged
                    column.release(older_start, end)
                older_end = older_start
            for copy in newer.values():
                copy.release(newer_start, newer_end)
            newer_end = newer_start


def _copied(column: ColumnFile, start: int, end: int) -> ColumnFile:
    """A new `ColumnFile` of a column's items from `start` to `end` (in a file of its own once large,
    gone with the object), copied a window at a time, each unmapped after in both."""
    copy = ColumnFile(column.dtype)
    for first, last in column.spans(start, end):
        copy.extend(column.view()[first:last])
        column.release(first, last)
        copy.release(first - start, last - start)
    return copy

"""Index storage kept out of memory: `SpillBuffer`, an append-only byte buffer whose older part is in an
unlinked temporary file, and on it `RecordFile` (the raw field values of every indexed record) and
`FloatFile` (a float per record); `ColumnFile`, a NumPy column in such a file read through a memory map;
`Offsets`, the end offsets of items in a buffer in 4 bytes each (a `ColumnFile`).

The matcher needs a record's raw values only to show them (the values a duplicate flag quotes from the
record it duplicates), a few per hundred records; held in memory they were ~90 bytes per record, most of
a 2,000,000-row batch's index. They go to an anonymous temporary file instead, read back by offset; so do
the older part of its ids, value texts (`linkage._TextList`) and entry times.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import tempfile
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Never a byte of UTF-8 (nor of a lone surrogate written with "surrogatepass"): ends every cell.
_END = b"\xff"
_ENCODING, _ERRORS = "utf-8", "surrogatepass"
_FLOAT = struct.Struct("d")  # a `FloatFile` item, as `array("d")` packs it
# Arrow's own allocator keeps what it freed for reuse (a few MB more resident); the few short-lived arrays
# here come from malloc, which hands large blocks back at once.
_POOL = pa.system_memory_pool()


class ColumnFile:
    """An append-only NumPy column of one dtype that, once it outgrows `MEMORY_BYTES`, is held in an
    unlinked temporary file (`unlinked_file`) and read and written through a shared memory map of it.

    For the index's columns that grow with a batch, a few bytes per record each (end offsets of ids and
    value texts, value codes, block chains): in the file they are not this process's anonymous memory.
    The pages a part reads or writes are mapped into the process, and so count in its resident set, until
    `release` unmaps them (the page cache keeps them, and the file what was written); the matcher releases
    its columns before it indexes each part. A part's candidates lie all over a batch, so its reads touch
    nearly every page: `take` reads and `put` writes a `WINDOW_BYTES` window of the file at a time and
    unmaps each after, so that they hold one window resident; `spans` cuts a range where windows begin,
    for a sorted search a window at a time (`SortedRuns.find`), and `release` unmaps a range. `view` is
    the items as an array (writable: a change is kept); capacity doubles as the column grows (the file
    with `ftruncate`, then mapped again), and `truncate` only lowers the size (a matcher's rollback).
    Pickles as its items (the reference cache stores a matcher); equal to a column of the same dtype and
    items.

    >>> column = ColumnFile(np.int32)
    >>> column.extend(np.array([5, -1, 7])); column.view()[1] = 6; column.truncate(2)
    >>> column.view().tolist(), len(column), column.dtype.name
    ([5, 6], 2, 'int32')
    """

    MEMORY_BYTES = 1 << 16  # smaller columns stay in an array: a small matcher makes no files
    KEEP_BYTES = 1 << 20  # a column this small keeps its pages through a part (`release_window`)
    WINDOW_BYTES = 1 << 23  # `take`, `put` and a sorted search map this much of the file at a time (pages)

    def __init__(self, dtype: Any, directory: str | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.directory = directory  # where the file is made (None: the system's temporary folder)
        self.size = 0
        self._data = np.empty(0, dtype=self.dtype)  # the capacity: an array, or a view of the whole map
        self._map: mmap.mmap | None = None
        self._file: Any = None

    def __len__(self) -> int:
        return self.size

    def view(self) -> np.ndarray:
        """The items (a view: writing to it changes the column; do not keep it across an `extend`)."""
        return self._data[: self.size]

    def extend(self, values: np.ndarray) -> None:
        """Appends these values, cast to the column's dtype as an assignment casts them."""
        end = self.size + len(values)
        if end > len(self._data):
            self._grow(end)
        self._data[self.size : end] = values
        self.size = end

    def take(self, indices: np.ndarray) -> np.ndarray:
        """`view()[indices]`, read one window of the file at a time, each unmapped after."""
        items = self.view()
        if not self._windowed(indices):
            return items[indices]  # in memory, or an index out of range: as NumPy answers
        taken = np.empty(len(indices), dtype=self.dtype)
        for chosen in self._by_window(indices):
            taken[chosen] = items[indices[chosen]]
        return taken

    def put(self, indices: np.ndarray, values: np.ndarray) -> None:
        """`view()[indices] = values` (as many values as indices), written one window of the file at a time,
        each unmapped after: an update all over a large column holds one window of its pages."""
        items = self.view()
        if not self._windowed(indices):
            items[indices] = values  # in memory, or an index out of range: as NumPy does
            return
        values = np.asarray(values)
        for chosen in self._by_window(indices):
            items[indices[chosen]] = values[chosen]

    def _windowed(self, indices: np.ndarray) -> bool:
        """Whether `take`/`put` go a window at a time: the column is in a file and every index in range (else
        NumPy's own indexing answers, raising as it does)."""
        return self._map is not None and len(indices) > 0 and indices.min() >= 0 and indices.max() < self.size

    def spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The items from `start` to `stop` cut where the file's windows begin: (first, end) of each piece,
        in order. A sorted search reads a piece at a time and then `release`s it."""
        window = self.window_items
        cuts = [start, *range((start // window + 1) * window, stop, window), stop]
        return list(itertools.pairwise(cuts))

    @property
    def window_items(self) -> int:
        """Items per window of the file (`WINDOW_BYTES`)."""
        return max(1, self.WINDOW_BYTES // self.dtype.itemsize)

    def _by_window(self, indices: np.ndarray) -> Iterator[np.ndarray | slice]:
        """The places in `indices` of those in each window of the file in turn (a pass per window: a few,
        no sort); each window is unmapped once its places are used (`release_window`)."""
        window = self.window_items
        if self.size <= window:
            yield slice(None)
            self.release_window(0, self.size)
            return
        slabs = indices // window
        for slab in range(int(slabs.min()), int(slabs.max()) + 1):
            chosen = np.flatnonzero(slabs == slab)
            if len(chosen):
                yield chosen
                self.release_window(slab * window, (slab + 1) * window)

    def release_window(self, start: int, stop: int) -> None:
        """`release(start, stop)` after reading or writing that window, in a column of more than
        `KEEP_BYTES`. A smaller one stays mapped until its owner's `release` between parts, so that a
        part's several look-ups, reads and writes do not fault its pages in again each time."""
        if self.size * self.dtype.itemsize > self.KEEP_BYTES:
            self.release(start, stop)

    def truncate(self, size: int) -> None:
        """Keeps the first `size` items."""
        self.size = min(self.size, size)

    def widened(self, dtype: Any) -> ColumnFile:
        """This column if its dtype holds every value of `dtype`, else a copy of its items in the type that
        holds both (`np.promote_types`), which takes this column's place at the caller."""
        wide = np.promote_types(self.dtype, dtype)
        if wide == self.dtype:
            return self
        copy = ColumnFile(wide, self.directory)
        copy.extend(self.view())
        return copy

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Unmaps from this process the pages read or written so far of the items from `start` to `stop`
        (all by default; the pages that hold them, so a neighbour's too): the file keeps the items."""
        if self._map is None:
            return
        first = start * self.dtype.itemsize // mmap.PAGESIZE * mmap.PAGESIZE
        end = len(self._map) if stop is None else min(len(self._map), stop * self.dtype.itemsize)
        if end > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def _grow(self, items: int) -> None:
        """Makes room for `items` items: a capacity of twice the present one at least."""
        capacity = max(items, 2 * len(self._data), 1024)
        if capacity * self.dtype.itemsize <= self.MEMORY_BYTES:
            grown = np.empty(capacity, dtype=self.dtype)
            grown[: self.size] = self.view()
            self._data = grown
            return
        if self._file is None:
            self._file = unlinked_file(self.directory)
            write_at(self._file.fileno(), self.view().tobytes(), 0)
        # The views of the previous map (if any) still read and write the same file; it is unmapped when
        # the last of them goes.
        self._map = mapped_file(self._file, capacity * self.dtype.itemsize)
        self._data = np.frombuffer(self._map, dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {"dtype": self.dtype.str, "directory": self.directory, "data": self.view().tobytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickle made before the directory was kept has none: the system's temporary folder, as then.
        self.__init__(state["dtype"], state.get("directory"))
        self.extend(np.frombuffer(state["data"], dtype=self.dtype))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ColumnFile)
            and self.dtype == other.dtype
            and np.array_equal(self.view(), other.view())
        )


class Offsets:
    """The end offsets of a buffer's items (non-decreasing), 4 bytes each instead of 8: an offset is kept
    as its low 32 bits, and `wraps` lists the items at which the high part went up (an item as often as
    it went up), a few entries per 4 GiB. Per-record lists of a batch's index use it (ids, order numbers,
    the record file), where 8-byte offsets were ~12 bytes per record.

    >>> offsets = Offsets()
    >>> offsets.extend(np.array([3, 2**32 + 5, 2**32 + 9]))
    >>> offsets[1], offsets[-1], len(offsets), offsets.take(np.array([2, 0])).tolist()
    (4294967301, 4294967305, 3, [4294967305, 3])
    """

    def __init__(self) -> None:
        self.low = ColumnFile(np.uint32)  # grows with a batch: in a file
        self.wraps = array("q")

    def __len__(self) -> int:
        return len(self.low)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Offsets) and self.low == other.low and self.wraps == other.wraps

    def __getitem__(self, index: int) -> int:
        if index < 0:
            index += len(self.low)
        low = int(self.low.view()[index])  # IndexError past the end, as a list
        return low + (bisect_right(self.wraps, index) << 32)

    @property
    def last(self) -> int:
        """The last offset (0 when empty)."""
        return self[-1] if len(self.low) else 0

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The offsets at these places (an int64 array)."""
        indices = np.asarray(indices, dtype=np.int64)
        low = self.low.take(indices).astype(np.int64)
        if not self.wraps:
            return low
        return low + (np.searchsorted(np.frombuffer(self.wraps, dtype=np.int64), indices, "right") << 32)

    def extend(self, ends: np.ndarray) -> None:
        """Appends offsets (an int64 array, non-decreasing, from `last` on)."""
        if not len(ends):
            return
        high = np.asarray(ends, dtype=np.int64) >> 32
        steps = np.diff(high, prepend=self.last >> 32)
        if steps.any():
            self.wraps.extend(np.repeat(len(self.low) + np.arange(len(high)), steps).tolist())
        self.low.extend(ends & 0xFFFFFFFF)

    def truncate(self, size: int) -> None:
        """Keeps the first `size` offsets."""
        self.low.truncate(size)
        del self.wraps[bisect_right(self.wraps, size - 1) :]

    def release(self) -> None:
        """`ColumnFile.release` of the offsets."""
        self.low.release()


class SpillBuffer:
    """An append-only byte buffer whose older part is in an unlinked temporary file: the bytes from
    `spilled` on are in memory (`tail`), and once the tail holds `spill_bytes` it is written at the end of
    the file and memory starts again. The index's per-record lists that are read back rarely, and mostly
    near their end (ids, value texts, entry times, raw values), so keep only their latest bytes resident.

    `read` takes any byte range, across the border too, and `truncate` cuts to any size, into the file
    too (a matcher's rollback). The file is made at the first spill (`unlinked_file`), so a small buffer
    never has one; `spill_bytes` 0 keeps nothing in memory. Reads and writes use explicit offsets
    (`os.pread`/`os.pwrite`), so threads may share it; reading does not grow this process's memory the
    way touching a memory map's pages would (the operating system's page cache holds what was read).
    Pickles as its contents (the reference cache stores a matcher); equal to a buffer of the same bytes.

    >>> buffer = SpillBuffer(spill_bytes=4)
    >>> buffer.append(b"abc"); buffer.append(b"def"); buffer.append(b"g")
    >>> buffer.spilled, bytes(buffer.tail), buffer.read(2, 7), len(buffer)
    (6, b'g', b'cdefg', 7)
    >>> buffer.truncate(4); buffer.getvalue()
    b'abcd'
    """

    def __init__(self, spill_bytes: int, directory: str | None = None) -> None:
        self.spill_bytes = spill_bytes
        self.directory = directory  # where the file is made (None: the system's temporary folder)
        self.tail = bytearray()  # the bytes from `spilled` on
        self.spilled = 0  # bytes in the file
        self._file: Any = None

    def __len__(self) -> int:
        return self.spilled + len(self.tail)

    def append(self, data: bytes | bytearray) -> None:
        """Appends `data`, and writes the tail to the file once it holds `spill_bytes` or more."""
        if not data:
            return
        if self.tail or len(data) < self.spill_bytes:
            self.tail += data
            if len(self.tail) < self.spill_bytes:
                return
            data, self.tail = self.tail, bytearray()
        if self._file is None:
            self._file = unlinked_file(self.directory)
        write_at(self._file.fileno(), data, self.spilled)
        self.spilled += len(data)

    def read(self, start: int, end: int) -> bytes:
        """The bytes from `start` to `end` (0 <= start <= end <= len), from the file, memory or both."""
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"bytes {start}:{end} of {len(self)}")
        spilled = self.spilled
        if start >= spilled:
            return bytes(self.tail[start - spilled : end - spilled])
        head = os.pread(self._file.fileno(), min(end, spilled) - start, start)
        return head + self.tail[: end - spilled] if end > spilled else head

    def truncate(self, size: int) -> None:
        """Keeps the first `size` bytes (all of them if there are fewer)."""
        if size >= self.spilled:
            del self.tail[size - self.spilled :]
        else:
            os.ftruncate(self._file.fileno(), size)
            self.spilled, self.tail = size, bytearray()

    def getvalue(self) -> bytes:
        """All the bytes."""
        return self.read(0, len(self))

    def close(self) -> None:
        """Closes (and so removes) the file; what was spilled is gone."""
        if self._file is not None:
            self._file.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"spill_bytes": self.spill_bytes, "directory": self.directory, "data": self.getvalue()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickle made before the directory was kept has none: the system's temporary folder, as then.
        self.__init__(state["spill_bytes"], state.get("directory"))
        self.append(state["data"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpillBuffer) and self.getvalue() == other.getvalue()


class RecordFile:
    """An append-only list of records (each a fixed number of text cells) in a temporary file (a
    `SpillBuffer` that keeps nothing in memory), and the end offset of each record in memory (4 bytes per
    record, `Offsets`).

    The file is created unlinked (`tempfile.TemporaryFile`), so it is gone when the object is closed or
    collected and when the process ends in any way, a failure or a kill included. Pickles as its contents
    (the reference cache stores a matcher).

    >>> records = RecordFile(width=2)
    >>> records.extend([np.array(["R1", "R2"], dtype=object), np.array(["Jansen", ""], dtype=object)])
    >>> records[1], len(records)
    (['R2', ''], 2)
    >>> records.close()
    """

    def __init__(self, width: int, directory: str | None = None) -> None:
        self.width = width
        self.ends = Offsets()
        self._buffer = SpillBuffer(0, directory)

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def size(self) -> int:
        """Bytes written (the end of the last record)."""
        return self.ends.last

    def extend(self, columns: Sequence[np.ndarray]) -> None:
        """Appends records given column by column (`width` object arrays of text, equally long)."""
        if len(columns) != self.width:
            raise ValueError(f"records of {self.width} cells, got {len(columns)} columns")
        rows = len(columns[0]) if columns else 0
        if not rows:
            return
        joined = _joined_records(columns, rows)
        if joined is None:  # a lone surrogate (or not text): one cell at a time, as `_encoded_records` does
            data, lengths = _encoded_records(columns, rows, self.width)
        else:
            data, lengths = joined
        self._buffer.append(data)
        self.ends.extend(self.size + np.cumsum(lengths))

    def __getitem__(self, index: int) -> list[str]:
        """The cells of record `index` (0 <= index < len)."""
        if not 0 <= index < len(self.ends):
            raise IndexError(f"record {index} of {len(self.ends)}")
        start = self.ends[index - 1] if index else 0
        data = self._buffer.read(start, self.ends[index])
        return [cell.decode(_ENCODING, _ERRORS) for cell in data.split(_END)[:-1]]

    def truncate(self, size: int) -> None:
        """Keeps the first `size` records."""
        if size < len(self.ends):
            self.ends.truncate(size)
            self._buffer.truncate(self.size)

    def close(self) -> None:
        """Closes (and so removes) the file; the object is unusable afterwards."""
        self._buffer.close()

    def __getstate__(self) -> dict[str, Any]:
        data = self._buffer.getvalue()
        return {"width": self.width, "ends": self.ends, "directory": self._buffer.directory, "data": data}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.width, self.ends = state["width"], state["ends"]
        self._buffer = SpillBuffer(0, state.get("directory"))  # none in a pickle made before it was kept
        self._buffer.append(state["data"])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RecordFile)
            and (self.width, self.ends) == (other.width, other.ends)
            and self._buffer == other._buffer
        )


def _encoded_records(columns: Sequence[np.ndarray], rows: int, width: int) -> tuple[bytes, np.ndarray]:
    """`RecordFile`'s bytes for these records (each cell's UTF-8, "surrogatepass", then `_END`, row by row)
    and each record's length in bytes, one cell at a time: what `_joined_records` gives in one go."""
    cells = np.empty((rows, width), dtype=object)
    for column, values in enumerate(columns):
        cells[:, column] = values
    encoded = [cell.encode(_ENCODING, _ERRORS) for cell in cells.ravel().tolist()]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + len(_END)
    return _END.join(encoded) + _END, lengths.reshape(rows, width).sum(axis=1)


def _joined_records(columns: Sequence[np.ndarray], rows: int) -> tuple[bytes, np.ndarray] | None:
    """`_encoded_records`, whole columns at a time in Arrow (each column encoded to UTF-8 once, the cells of
    a record joined by `_END` with one more after the last); None where Arrow cannot give the same bytes:
    a lone surrogate (strict UTF-8 has none) or a cell that is not text (left to fail as before)."""
    try:
        arrays = [pa.array(values, type=pa.large_string(), memory_pool=_POOL) for values in columns]
    except (pa.ArrowException, UnicodeError, TypeError, ValueError):
        return None
    if any(array.null_count for array in arrays):
        return None
    cells = [array.cast(pa.large_binary(), memory_pool=_POOL) for array in arrays]
    # An empty cell last: the join then ends each record with `_END` too.
    cells.append(pa.array(np.zeros(rows, dtype="S1"), type=pa.large_binary(), memory_pool=_POOL))
    joined = pc.binary_join_element_wise(*cells, pa.scalar(_END, pa.large_binary()), memory_pool=_POOL)
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int64)[joined.offset : joined.offset + rows + 1]
    data = joined.buffers()[2]
    return data[offsets[0] : offsets[-1]].to_pybytes(), np.diff(offsets)


def encode_texts(texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """The texts' UTF-8 ("surrogatepass") end to end, and each one's length in bytes: in Arrow, one pass
    in C, unless a text holds a lone surrogate (then one text at a time, the same bytes).

    >>> data, lengths = encode_texts(["R1", "", "é"])
    >>> data, lengths.tolist()
    (b'R1\\xc3\\xa9', [2, 0, 2])
    """
    try:
        array = pa.array(texts, type=pa.large_string(), memory_pool=_POOL)
    except (pa.ArrowException, UnicodeError, TypeError, ValueError):
        array = None
    if array is None or array.null_count:
        encoded = [text.encode(_ENCODING, _ERRORS) for text in texts]
        return b"".join(encoded), np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    data = array.buffers()[2]
    body = data[offsets[0] : offsets[-1]].to_pybytes() if data is not None and len(array) else b""
    return body, np.diff(offsets)


def decode_slices(data: bytes | bytearray, starts: np.ndarray, ends: np.ndarray) -> list[str]:
    """The texts at these byte ranges of `data` (UTF-8, "surrogatepass"), in order: the ranges' bytes
    gathered with NumPy and decoded by Arrow in C, unless they are not strict UTF-8 (a lone surrogate:
    then one range at a time, as `bytes.decode`).

    >>> decode_slices(b"R1R22\\xc3\\xa9", np.array([2, 0, 5]), np.array([5, 2, 7]))
    ['R22', 'R1', 'é']
    """
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    lengths = ends - starts
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    source = np.frombuffer(data, dtype=np.uint8)
    # Each wanted byte's place in `data`: its range's start plus its place within the range.
    gathered = source[np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])]
    del source  # a view of a bytearray would keep it from growing
    texts = pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(offsets), pa.py_buffer(gathered))
    try:
        texts.validate(full=True)  # strict UTF-8
    except pa.ArrowInvalid:
        return [
            data[start:end].decode(_ENCODING, _ERRORS)
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
    return texts.to_numpy(zero_copy_only=False).tolist()


def unlinked_file(directory: str | None) -> Any:
    """A new temporary file, already without a name: its space is freed when it is closed."""
    # Held open for its buffer's life, closed by `SpillBuffer.close` or when collected.
    return tempfile.TemporaryFile(prefix="pipeline-records-", dir=directory)  # noqa: SIM115


def mapped_file(file: Any, size: int) -> mmap.mmap:
    """A shared memory map of an open file (`unlinked_file`) made `size` bytes long: its pages are page
    cache, not the process's anonymous memory. The map keeps the file's space after the file is closed."""
    os.ftruncate(file.fileno(), size)
    return mmap.mmap(file.fileno(), size)


def write_at(fd: int, data: bytes | bytearray, offset: int) -> None:
    """All of `data` at `offset` (`os.pwrite` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class FloatFile:
    """An append-only list of floats (8 bytes each) whose older part is in an unlinked temporary file (a
    `SpillBuffer`): the latest `SPILL_ITEMS` at most in memory. For per-record values read back a few per
    hundred records (a record's entry time, read for the reason of a link), which held in memory were 8
    bytes per record of a 2,000,000-row batch's index. Pickles as its contents.

    >>> times = FloatFile()
    >>> times.extend([1.5, 2.25, float("nan")])
    >>> times[1], times[-1] != times[-1], len(times)
    (2.25, True, 3)
    >>> times.truncate(1); len(times), times[0]
    (1, 1.5)
    """

    SPILL_ITEMS = 1 << 17

    def __init__(self) -> None:
        self._buffer = SpillBuffer(_FLOAT.size * self.SPILL_ITEMS)

    def __len__(self) -> int:
        return len(self._buffer) // _FLOAT.size

    @property
    def spilled(self) -> int:
        """Items in the file."""
        return self._buffer.spilled // _FLOAT.size

    def __getitem__(self, index: int) -> float:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        return _FLOAT.unpack(self._buffer.read(_FLOAT.size * index, _FLOAT.size * (index + 1)))[0]

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The items at these places (0 <= index < len), bit for bit, as a float64 array: those in memory
        at once, the others with a read each."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and not 0 <= indices.min() <= indices.max() < len(self):
            raise IndexError(f"items {indices.min()}..{indices.max()} of {len(self)}")
        values = np.empty(len(indices), dtype=np.float64)
        spilled, size = self.spilled, _FLOAT.size
        hot = indices >= spilled
        if hot.any():
            tail = np.frombuffer(self._buffer.tail, dtype=np.float64)
            values[hot] = tail[indices[hot] - spilled]
            del tail  # the view holds the tail, which cannot grow while it lives
        cold = np.flatnonzero(~hot)
        if len(cold):
            read = self._buffer.read
            data = b"".join(read(size * index, size * (index + 1)) for index in indices[cold].tolist())
            values[cold] = np.frombuffer(data, dtype=np.float64)
        return values

    def extend(self, values: Sequence[float]) -> None:
        self._buffer.append(array("d", values).tobytes())

    def truncate(self, size: int) -> None:
        """Keeps the first `size` items."""
        self._buffer.truncate(_FLOAT.size * size)

    def __getstate__(self) -> dict[str, Any]:
        return {"data": self._buffer.getvalue()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self._buffer.append(state["data"])

    def __eq__(self, other: object) -> bool:
        # Bit for bit, so that NaN (an unknown entry time) equals itself.
        return isinstance(other, FloatFile) and self._buffer == other._buffer

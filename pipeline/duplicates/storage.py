"""Index storage kept out of memory: `RecordFile`, the raw field values of every indexed record, and
`Offsets`, the end offsets of items in a buffer in 4 bytes each.

The matcher needs a record's raw values only to show them (the values a duplicate flag quotes from the
record it duplicates), a few per hundred records; held in memory they were ~90 bytes per record, most of
a 2,000,000-row batch's index. They go to an anonymous temporary file instead, read back by offset.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import numpy as np

# Never a byte of UTF-8 (nor of a lone surrogate written with "surrogatepass"): ends every cell.
_END = b"\xff"
_ENCODING, _ERRORS = "utf-8", "surrogatepass"


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
        self.low = array("I")
        self.wraps = array("q")

    def __len__(self) -> int:
        return len(self.low)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Offsets) and self.low == other.low and self.wraps == other.wraps

    def __getitem__(self, index: int) -> int:
        if index < 0:
            index += len(self.low)
        low = self.low[index]  # IndexError past the end, as a list
        return low + (bisect_right(self.wraps, index) << 32)

    @property
    def last(self) -> int:
        """The last offset (0 when empty)."""
        return self[-1] if self.low else 0

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The offsets at these places (an int64 array)."""
        indices = np.asarray(indices, dtype=np.int64)
        low = np.frombuffer(self.low, dtype=np.uint32)[indices].astype(np.int64)
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
        self.low.frombytes((ends & 0xFFFFFFFF).astype(np.uint32).tobytes())

    def truncate(self, size: int) -> None:
        """Keeps the first `size` offsets."""
        del self.low[size:]
        del self.wraps[bisect_right(self.wraps, size - 1) :]


class RecordFile:
    """An append-only list of records (each a fixed number of text cells) in a temporary file, and the
    end offset of each record in memory (4 bytes per record, `Offsets`).

    The file is created unlinked (`tempfile.TemporaryFile`), so it is gone when the object is closed or
    collected and when the process ends in any way, a failure or a kill included. Reads and writes use
    explicit offsets (`os.pread`/`os.pwrite`), so threads may share it. Reading a record does not grow
    this process's memory the way touching a memory map's pages would: the operating system's page
    cache holds what was read. Pickles as its contents (the reference cache stores a matcher).

    >>> records = RecordFile(width=2)
    >>> records.extend([np.array(["R1", "R2"], dtype=object), np.array(["Jansen", ""], dtype=object)])
    >>> records[1], len(records)
    (['R2', ''], 2)
    >>> records.close()
    """

    def __init__(self, width: int, directory: str | None = None) -> None:
        self.width = width
        self.ends = Offsets()
        self._file = unlinked_file(directory)

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
        cells = np.empty((rows, self.width), dtype=object)
        for column, values in enumerate(columns):
            cells[:, column] = values
        encoded = [cell.encode(_ENCODING, _ERRORS) for cell in cells.ravel().tolist()]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + len(_END)
        ends = self.size + np.cumsum(lengths.reshape(rows, self.width).sum(axis=1))
        write_at(self._file.fileno(), _END.join(encoded) + _END, self.size)
        self.ends.extend(ends)

    def __getitem__(self, index: int) -> list[str]:
        """The cells of record `index` (0 <= index < len)."""
        if not 0 <= index < len(self.ends):
            raise IndexError(f"record {index} of {len(self.ends)}")
        start = self.ends[index - 1] if index else 0
        data = os.pread(self._file.fileno(), self.ends[index] - start, start)
        return [cell.decode(_ENCODING, _ERRORS) for cell in data.split(_END)[:-1]]

    def truncate(self, size: int) -> None:
        """Keeps the first `size` records."""
        if size < len(self.ends):
            self.ends.truncate(size)
            os.ftruncate(self._file.fileno(), self.size)

    def close(self) -> None:
        """Closes (and so removes) the file; the object is unusable afterwards."""
        self._file.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"width": self.width, "ends": self.ends, "data": os.pread(self._file.fileno(), self.size, 0)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.width, self.ends = state["width"], state["ends"]
        self._file = unlinked_file(None)
        write_at(self._file.fileno(), state["data"], 0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordFile) and self.__getstate__() == other.__getstate__()


def unlinked_file(directory: str | None) -> Any:
    """A new temporary file, already without a name: its space is freed when it is closed."""
    # Held open for the matcher's life, closed by `RecordFile.close` or when collected.
    return tempfile.TemporaryFile(prefix="pipeline-records-", dir=directory)  # noqa: SIM115


def write_at(fd: int, data: bytes, offset: int) -> None:
    """All of `data` at `offset` (`os.pwrite` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class FloatFile:
    """An append-only list of floats (8 bytes each) whose older part is in an unlinked temporary file: the
    latest `SPILL_ITEMS` at most in memory. For per-record values read back a few per hundred records (a
    record's entry time, read for the reason of a link), which held in memory were 8 bytes per record of a
    2,000,000-row batch's index. Pickles as its contents.

    >>> times = FloatFile()
    >>> times.extend([1.5, 2.25, float("nan")])
    >>> times[1], times[-1] != times[-1], len(times)
    (2.25, True, 3)
    >>> times.truncate(1); len(times), times[0]
    (1, 1.5)
    """

    SPILL_ITEMS = 1 << 19

    def __init__(self) -> None:
        self.tail = array("d")  # the items from `spilled` on
        self.spilled = 0  # items in the file
        self._file: Any = None

    def __len__(self) -> int:
        return self.spilled + len(self.tail)

    def __getitem__(self, index: int) -> float:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        if index >= self.spilled:
            return self.tail[index - self.spilled]
        return array("d", os.pread(self._file.fileno(), 8, 8 * index))[0]

    def extend(self, values: Sequence[float]) -> None:
        self.tail.extend(values)
        if len(self.tail) >= self.SPILL_ITEMS:
            if self._file is None:
                self._file = unlinked_file(None)
            write_at(self._file.fileno(), self.tail.tobytes(), 8 * self.spilled)
            self.spilled += len(self.tail)
            self.tail = array("d")

    def truncate(self, size: int) -> None:
        """Keeps the first `size` items."""
        if size >= self.spilled:
            del self.tail[size - self.spilled :]
        else:
            os.ftruncate(self._file.fileno(), 8 * size)
            self.spilled, self.tail = size, array("d")

    def _bytes(self) -> bytes:
        head = os.pread(self._file.fileno(), 8 * self.spilled, 0) if self.spilled else b""
        return head + self.tail.tobytes()

    def __getstate__(self) -> dict[str, Any]:
        return {"data": self._bytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tail, self.spilled, self._file = array("d", state["data"]), 0, None

    def __eq__(self, other: object) -> bool:
        # Bit for bit, so that NaN (an unknown entry time) equals itself.
        return isinstance(other, FloatFile) and self._bytes() == other._bytes()

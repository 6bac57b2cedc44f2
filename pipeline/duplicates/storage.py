"""Index storage kept out of memory: `RecordFile`, the raw field values of every indexed record.

The matcher needs a record's raw values only to show them (the values a duplicate flag quotes from the
record it duplicates), a few per hundred records; held in memory they were ~90 bytes per record, most of
a 2,000,000-row batch's index. They go to an anonymous temporary file instead, read back by offset.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

# Never a byte of UTF-8 (nor of a lone surrogate written with "surrogatepass"): ends every cell.
_END = b"\xff"
_ENCODING, _ERRORS = "utf-8", "surrogatepass"


class RecordFile:
    """An append-only list of records (each a fixed number of text cells) in a temporary file, and the
    end offset of each record in memory (8 bytes per record).

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
        self.ends = array("q")
        self._file = _unlinked_file(directory)

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def size(self) -> int:
        """Bytes written (the end of the last record)."""
        return self.ends[-1] if self.ends else 0

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
        _write(self._file.fileno(), _END.join(encoded) + _END, self.size)
        self.ends.frombytes(ends.tobytes())

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
            del self.ends[size:]
            os.ftruncate(self._file.fileno(), self.size)

    def close(self) -> None:
        """Closes (and so removes) the file; the object is unusable afterwards."""
        self._file.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"width": self.width, "ends": self.ends, "data": os.pread(self._file.fileno(), self.size, 0)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.width, self.ends = state["width"], state["ends"]
        self._file = _unlinked_file(None)
        _write(self._file.fileno(), state["data"], 0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordFile) and self.__getstate__() == other.__getstate__()


def _unlinked_file(directory: str | None) -> Any:
    """A new temporary file, already without a name: its space is freed when it is closed."""
    # Held open for the matcher's life, closed by `RecordFile.close` or when collected.
    return tempfile.TemporaryFile(prefix="pipeline-records-", dir=directory)  # noqa: SIM115


def _write(fd: int, data: bytes, offset: int) -> None:
    """All of `data` at `offset` (`os.pwrite` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written

"""A process's memory: large blocks mapped from the system, free heap pages handed back, the cyclic collector
paused while many small objects are made, objects set aside on disk while not needed (`Spill`), and the
resident size now. glibc and Linux only; elsewhere each is a no-op (or NaN)."""

from __future__ import annotations

import ctypes
import gc
import pickle
import resource
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

# glibc's mallopt: allocations from this size on are mapped from the system and unmapped when freed.
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 4 << 20


def map_large_allocations() -> None:
    """Large blocks straight from the operating system and back to it when freed (glibc; elsewhere nothing).

    For a scoring process (the CLI's, and each `--workers` helper's). The duplicate matcher replaces its
    sorted index arrays, a few MB each and growing with the batch, at every chunk. glibc's default threshold
    rises to 32 MB after such a block is freed, so later ones came from the heap, whose freed holes the
    next, larger arrays did not fit: ~100 MB more at 500,000 rows. From 4 MB on: at 1 MB a chunk's own
    arrays were mapped too, 10% more CPU in page faults.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_free_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's `malloc_trim`; elsewhere nothing).

    Called between chunks and pieces: what a chunk's frames freed otherwise stays resident until reused,
    and the next chunk's transients land partly elsewhere, so a process's peak grew by the holes.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off inside the block, as it was after it: for work that makes many
    small objects and no cycles (loading a pickle of many containers, a matcher part's parsed values),
    which the collector would otherwise walk again and again while they are made."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def resident_mb() -> float:
    """This process's resident memory now (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return pages * resource.getpagesize() / 2**20


class Spill:
    """Objects set aside on disk (pickled into a temporary folder) while they are not needed, and taken back
    once: for an object that costs more to rebuild than to write and read, and too much memory to keep.
    A context manager; the folder is removed on leaving it.

    >>> with Spill() as spill:
    ...     where = spill.put({"a": [1, 2]})
    ...     spill.take(where)
    {'a': [1, 2]}
    """

    def __init__(self, prefix: str = "pipeline-spill-") -> None:
        self._folder = tempfile.TemporaryDirectory(prefix=prefix)
        self._count = 0

    def put(self, value: object) -> Path:
        """Writes `value` to a file of its own; the file's path, for `take`."""
        path = Path(self._folder.name) / f"{self._count}.pickle"
        self._count += 1
        with open(path, "wb") as fh:
            pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return path

    def take(self, path: Path) -> Any:
        """The value written to `path` (the file is removed: each is taken once)."""
        with collector_paused(), open(path, "rb") as fh:
            value = pickle.load(fh)  # noqa: S301 - a file this process wrote
        path.unlink()
        return value

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

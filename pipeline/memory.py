"""A process's memory: large blocks mapped from the system, free heap pages handed back, the cyclic collector
paused while many small objects are made, and the resident size now. glibc and Linux only; elsewhere each is
a no-op (or NaN)."""

from __future__ import annotations

import ctypes
import gc
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
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

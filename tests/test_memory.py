"""The process-memory helpers shared by `score`, `train`, the matcher and the reference cache."""

from __future__ import annotations

import gc
import math

import pytest

from pipeline.memory import collector_paused, map_large_allocations, release_free_memory, resident_mb


def test_the_collector_is_paused_inside_and_left_as_it_was_even_on_an_error() -> None:
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller that had it paused keeps it paused
    finally:
        gc.enable()


def test_resident_memory_grows_with_what_the_process_holds() -> None:
    map_large_allocations()
    before = resident_mb()
    assert math.isfinite(before) and before > 0
    block = bytearray(64 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    assert resident_mb() >= before + 60
    del block
    release_free_memory()
    assert resident_mb() < before + 60  # a mapped block goes back to the system when freed

"""The process-memory helpers shared by `score`, `train`, the matcher and the reference cache."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest

from pipeline.memory import Spill, collector_paused, map_large_allocations, release_free_memory, resident_mb


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


def test_a_spilled_object_comes_back_equal_once_and_the_folder_goes_with_the_spill() -> None:
    shared = np.arange(5.0)
    value = {"a": shared, "b": [shared, "text"], "c": {"nested": (1, 2)}}
    with Spill(prefix="test-spill-") as spill:
        first, second = spill.put(value), spill.put([1, 2, 3])
        assert first != second and first.exists() and first.parent.name.startswith("test-spill-")
        back = spill.take(first)
        assert not first.exists()  # each is taken once
        np.testing.assert_array_equal(back["a"], shared)
        assert back["b"][0] is back["a"]  # shared parts stay shared, as in the object written
        assert back["b"][1] == "text" and back["c"] == {"nested": (1, 2)}
        with pytest.raises(FileNotFoundError):
            spill.take(first)
    assert not second.exists() and not second.parent.exists()  # what was never taken goes too

"""`SortedRuns`: the look-up tables of the matcher's index, grown by appending sorted runs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from pipeline.duplicates.sorted_runs import SortedRuns
from pipeline.duplicates.storage import ColumnFile


def held(table: SortedRuns) -> dict[int, int]:
    items = table.in_key_order()
    assert (np.diff(items["keys"].astype(np.int64)) > 0).all()  # distinct, sorted
    return dict(zip(items["keys"].tolist(), items["value"].tolist(), strict=True))


@pytest.mark.parametrize(
    ("memory_bytes", "window_bytes"),
    [(0, 4096), (0, ColumnFile.WINDOW_BYTES), (ColumnFile.MEMORY_BYTES, 4096)],
)
def test_finds_updates_and_deletes_as_a_dict_does_across_appends_of_every_size(
    monkeypatch, memory_bytes, window_bytes
) -> None:
    """Appends of one key to thousands (merged into earlier runs or not), updates through `find`'s places
    and deletes of new and old keys: the table holds what a dict given the same steps holds, and finds
    each key where its value is; with its columns in files from the start, or in memory while small, and
    merged and searched in windows of 512 keys (many per merge and look-up) or in one."""
    monkeypatch.setattr(ColumnFile, "MEMORY_BYTES", memory_bytes)
    monkeypatch.setattr(ColumnFile, "WINDOW_BYTES", window_bytes)
    rng = np.random.default_rng(3)
    table, model = SortedRuns(np.uint64, value=np.int32), {}
    for step in range(60):
        fresh = np.setdiff1d(rng.integers(0, 50_000, int(rng.choice([1, 7, 300, 2_500]))), list(model))
        fresh = rng.permutation(fresh).astype(np.uint64)  # any order
        table.append(fresh, value=np.arange(len(fresh), dtype=np.int32) + step * 10_000)
        model.update(zip(fresh.tolist(), (np.arange(len(fresh)) + step * 10_000).tolist(), strict=True))
        probe = rng.integers(0, 50_000, 2_000).astype(np.uint64)
        places = table.find(probe)
        expected = [model.get(key, -1) for key in probe.tolist()]
        assert np.where(places >= 0, table.column("value")[places], -1).tolist() == expected
        assert (table.keys[places[places >= 0]] == probe[places >= 0]).all()
        if step % 5 == 1:  # an update lands where the key is held
            changed = np.unique(probe[places >= 0])[:50]
            table.column("value")[table.find(changed)] = -7
            model.update(dict.fromkeys(changed.tolist(), -7))
        if step % 7 == 3:  # deletes of the newest keys (a rollback) and of old ones
            gone = np.concatenate([fresh[: len(fresh) // 2], rng.choice(list(model), 20).astype(np.uint64)])
            gone = np.unique(gone)
            table.delete(table.find(gone))
            for key in gone.tolist():
                del model[key]
        assert len(table) == len(model) and held(table) == model
    assert len(table._starts) <= 8  # runs were merged: a few, not one per append


@pytest.mark.parametrize("memory_bytes", [0, ColumnFile.MEMORY_BYTES])
def test_pickles_what_it_holds_and_grows_on_after(monkeypatch, memory_bytes) -> None:
    """A pickled table (in files or in memory) loads as the same keys and values, in files of its own."""
    monkeypatch.setattr(ColumnFile, "MEMORY_BYTES", memory_bytes)
    table = SortedRuns(np.uint32, value=np.int32)
    table.append(np.array([9, 4], dtype=np.uint32), value=np.array([1, 2], dtype=np.int32))
    copy = pickle.loads(pickle.dumps(table))
    assert held(copy) == held(table) == {4: 2, 9: 1}
    copy.append(np.arange(10, 2_000, dtype=np.uint32), value=np.zeros(1_990, dtype=np.int32))
    assert len(copy) == 1_992 and copy.find(np.array([4, 1_999, 3], dtype=np.uint32)).tolist()[2] == -1
    assert held(table) == {4: 2, 9: 1}  # the copy shares nothing


def test_an_empty_table_finds_nothing_and_deletes_nothing() -> None:
    table = SortedRuns(np.uint64, value=np.int32)
    assert table.find(np.array([1, 2], dtype=np.uint64)).tolist() == [-1, -1]
    table.delete(np.zeros(0, dtype=np.int64))
    table.append(np.zeros(0, dtype=np.uint64), value=np.zeros(0, dtype=np.int32))
    assert len(table) == 0 and held(table) == {}


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc (Linux)")
def test_a_large_table_is_file_pages_that_release_unmaps_and_its_values_stay() -> None:
    """24 MiB of keys and values, appended a part at a time: they are in the table's files, and the merges
    of runs unmap the pages they wrote a window at a time (the newest part's stay mapped until `release`);
    afterwards the table still finds every key's value, takes updates and deletes, and grows on."""
    keys = np.random.default_rng(5).permutation(2_000_000).astype(np.uint64) * 7
    table = SortedRuns(np.uint64, value=np.int32)
    for part in np.array_split(np.arange(len(keys)), 8):
        table.append(keys[part], value=part.astype(np.int32))
    assert table._columns["keys"]._map is not None and len(table._starts) < 8  # in a file; runs merged
    assert mapped_kib(table, "keys") < 3 << 10  # the newest part's 2 MiB at most, not the 16 MiB
    table.release()
    assert mapped_kib(table, "keys") == mapped_kib(table, "value") == 0
    probe = np.arange(0, len(keys), 997)
    assert table.column("value")[table.find(keys[probe])].tolist() == probe.tolist()
    table.column("value")[table.find(keys[:3])] = -1
    table.delete(table.find(keys[3:10]))
    table.release()
    table.append(np.array([1], dtype=np.uint64), value=np.array([42], dtype=np.int32))
    found = table.find(np.concatenate([keys[:10], [1]]).astype(np.uint64))
    assert (found[3:10] == -1).all() and table.column("value")[found[[0, 1, 2, 10]]].tolist() == [-1] * 3 + [
        42
    ]
    assert len(table) == len(keys) - 7 + 1


def mapped_kib(table: SortedRuns, name: str) -> int:
    """The resident KiB of the memory map of one of the table's columns, from /proc/self/smaps: the pages
    of its file that this process has mapped (page cache the process holds), whatever else it maps."""
    column = table._columns[name]
    address = column._data.ctypes.data
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(bound, 16) for bound in head.split("-"))
                inside = low <= address < high
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise LookupError("the column's map is not in /proc/self/smaps")


def test_finds_takes_and_puts_across_window_borders_as_plain_numpy_does(monkeypatch) -> None:
    """Runs of many small windows (a window's first and last keys, keys between windows and past both
    ends among the probes): each probe's place is where the key is in the table's keys, values taken at
    the places are those appended, values put there read back, and nothing is found that is not held."""
    monkeypatch.setattr(ColumnFile, "MEMORY_BYTES", 0)
    monkeypatch.setattr(ColumnFile, "WINDOW_BYTES", 4096)  # 512 uint64 keys, 1,024 int32 values a window
    rng = np.random.default_rng(8)
    keys = rng.permutation(np.arange(1, 40_000, 3, dtype=np.uint64))  # 13,333 keys: ~26 windows
    table = SortedRuns(np.uint64, value=np.int32)
    for part in np.array_split(np.arange(len(keys)), [9_000, 11_000, 12_500]):  # runs of every size
        table.append(keys[part], value=part.astype(np.int32))
    assert len(table._starts) > 1
    stored = table.keys.copy()
    border = stored[np.arange(0, len(stored), 512)]
    probe = np.concatenate([border, border - 1, border + 1, [0, 40_000], rng.integers(0, 40_001, 3_000)])
    probe = rng.permutation(probe).astype(np.uint64)
    places = table.find(probe)
    expected = {key: place for place, key in enumerate(stored.tolist())}
    assert places.tolist() == [expected.get(key, -1) for key in probe.tolist()]
    held = places[places >= 0]
    position = {key: row for row, key in enumerate(keys.tolist())}
    assert table.take("value", held).tolist() == [position[key] for key in stored[held].tolist()]
    assert table.take("keys", held).tolist() == stored[held].tolist()
    distinct = np.unique(held)
    table.put("value", distinct, -distinct.astype(np.int32))
    assert table.column("value")[distinct].tolist() == (-distinct).tolist()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc (Linux)")
def test_merges_and_look_ups_over_a_large_table_hold_about_a_window_of_its_pages(monkeypatch) -> None:
    """Two merges of a 4 MiB part into the whole table, then a look-up of probes all over the 24 MiB
    table (keys 16 MiB, values 8 MiB; 1 MiB windows) and a read and an update of the values at every place
    found: each unmaps the pages it used after each window, so at no point (sampled before each unmapping,
    and after) do the keys' or the values' maps hold much more than a window, though each touches most
    pages of both (a merge: a window read, one written, and the new part until it is copied aside); the
    updates stay in the files."""
    monkeypatch.setattr(ColumnFile, "WINDOW_BYTES", 1 << 20)
    keys = np.random.default_rng(6).permutation(2_000_000).astype(np.uint64) * 5
    parts = np.array_split(np.arange(len(keys)), [1_000_000, 1_500_000])  # merged: all, then all
    table = SortedRuns(np.uint64, value=np.int32)
    table.append(keys[parts[0]], value=parts[0].astype(np.int32))
    table.release()
    peaks = {"keys": 0, "value": 0}
    release = ColumnFile.release

    def sampled_release(column: ColumnFile, *bounds: int) -> None:
        for name in peaks:
            peaks[name] = max(peaks[name], mapped_kib(table, name))
        release(column, *bounds)

    monkeypatch.setattr(ColumnFile, "release", sampled_release)
    for part in parts[1:]:
        table.append(keys[part], value=part.astype(np.int32))
        table.release()
    assert len(table._starts) == 1
    merged, peaks = dict(peaks), dict.fromkeys(peaks, 0)
    probe = np.arange(0, len(keys), 41)
    places = table.find(keys[probe])
    assert (table.take("value", places) == probe).all()
    table.put("value", places, -probe.astype(np.int32))
    sampled_release(table._columns["keys"], 0, 0)  # one last sample
    # A window, and the pages the kernel maps around each window's first key (up to 64 KiB each).
    assert 0 < peaks["keys"] <= 1024 + 16 * 64 and 0 < peaks["value"] <= 1024 + 16 * 64
    assert merged["keys"] <= 4096 + 2 * 1024 and merged["value"] <= 2048 + 2 * 1024  # not 16 and 8 MiB
    monkeypatch.setattr(ColumnFile, "release", release)
    assert (table.take("value", table.find(keys[probe])) == -probe).all()  # the updates stayed

"""`SortedRuns`: the look-up tables of the matcher's index, grown by appending sorted runs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.duplicates import sorted_runs
from pipeline.duplicates.sorted_runs import SortedRuns


def held(table: SortedRuns) -> dict[int, int]:
    items = table.in_key_order()
    assert (np.diff(items["keys"].astype(np.int64)) > 0).all()  # distinct, sorted
    return dict(zip(items["keys"].tolist(), items["value"].tolist(), strict=True))


@pytest.mark.parametrize("mapped_bytes", [0, sorted_runs.MAPPED_BYTES])
def test_finds_updates_and_deletes_as_a_dict_does_across_appends_of_every_size(
    monkeypatch, mapped_bytes
) -> None:
    """Appends of one key to thousands (merged into earlier runs or not), updates through `find`'s places
    and deletes of new and old keys: the table holds what a dict given the same steps holds, and finds
    each key where its value is; with its arrays in memory maps or from malloc."""
    monkeypatch.setattr(sorted_runs, "MAPPED_BYTES", mapped_bytes)
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


def test_pickles_what_it_holds_and_grows_on_after() -> None:
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

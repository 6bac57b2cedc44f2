"""`pipeline.duplicates.storage`: a byte buffer whose older part is in an unlinked temporary file, the
matcher's raw values and entry times on it, NumPy columns in such a file, and offsets in 4 bytes each."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest

from pipeline.duplicates import storage
from pipeline.duplicates.storage import (
    ColumnFile,
    FloatFile,
    Offsets,
    RecordFile,
    SpillBuffer,
    decode_slices,
    encode_texts,
)


def column(*cells: str) -> np.ndarray:
    values = np.empty(len(cells), dtype=object)
    values[:] = list(cells)
    return values


@pytest.mark.parametrize("spill", [0, 1, 5, 1 << 20])
def test_a_spill_buffer_reads_and_truncates_as_bytes_on_both_sides_of_its_spill(tmp_path, spill) -> None:
    """Every byte range, across the border between file and memory too, reads back as the bytes
    appended; truncating inside the tail, then inside the file, cuts the file, and appending goes on."""
    buffer = SpillBuffer(spill, str(tmp_path))
    expected = bytearray()
    for piece in [b"abc", b"", b"\xff\x00de", b"f" * 7, b"g", b"hij"]:
        buffer.append(piece)
        expected += piece
        assert len(buffer) == len(expected)
    # 5: "abc" waits, "abc\xff\x00de" spills, the 7 "f" go straight to the file, "ghij" waits.
    spilled = {0: 18, 1: 18, 5: 14, 1 << 20: 0}[spill]
    assert buffer.spilled == spilled and bytes(buffer.tail) == expected[spilled:]
    if spilled:
        assert os.fstat(buffer._file.fileno()).st_size == spilled and list(tmp_path.iterdir()) == []
    else:
        assert buffer._file is None  # a buffer that never spilled has no file
    for start in range(len(expected) + 1):
        for end in range(start, len(expected) + 1):
            assert buffer.read(start, end) == expected[start:end], (start, end)
    for start, end in [(0, len(expected) + 1), (3, 2), (-1, 2)]:
        with pytest.raises(IndexError):
            buffer.read(start, end)
    buffer.truncate(len(expected) + 5)  # more than it holds: unchanged
    assert buffer.getvalue() == expected
    buffer.truncate(16)  # in the tail (5, 1 << 20), in the file (0, 1)
    del expected[16:]
    assert buffer.getvalue() == expected and buffer.spilled == min(spilled, 16)
    buffer.truncate(5)
    del expected[5:]
    assert buffer.getvalue() == expected and buffer.spilled == min(spilled, 5)
    if spilled:
        assert os.fstat(buffer._file.fileno()).st_size == 5 and not buffer.tail
    buffer.append(b"klmnop")
    expected += b"klmnop"
    assert buffer.getvalue() == expected and buffer.read(3, 8) == expected[3:8] == b"\xff\x00klm"
    buffer.truncate(0)
    assert len(buffer) == 0 and buffer.getvalue() == b"" and buffer.spilled == 0
    buffer.close()


def test_a_pickled_spill_buffer_is_an_equal_copy_in_its_own_file_and_equality_is_by_bytes() -> None:
    buffer = SpillBuffer(4)
    buffer.append(b"ab")
    buffer.append(b"cdef")  # spilled
    buffer.append(b"g")  # in memory
    copy = pickle.loads(pickle.dumps(buffer))
    assert copy == buffer and copy.getvalue() == b"abcdefg" and copy.spill_bytes == 4
    assert copy.spilled == 7 and copy._file.fileno() != buffer._file.fileno()
    held = SpillBuffer(1 << 20)  # the same bytes all in memory
    held.append(b"abcdefg")
    assert held == buffer and held.spilled == 0
    held.truncate(6)
    held.append(b"h")
    assert held != buffer and held != b"abcdefh"
    buffer.close()  # closing the original leaves the copy readable
    assert copy.read(2, 7) == b"cdefg"
    copy.append(b"hi")
    assert copy.getvalue() == b"abcdefghi"
    copy.close()


def test_records_come_back_cell_for_cell_across_chunks_and_after_truncate(tmp_path) -> None:
    records = RecordFile(width=3, directory=str(tmp_path))
    odd = ["Müller & Zn.", "", "a\x1fb\nc", "\udcff lone surrogate", "€ 1.234,50", "x" * 5000]
    records.extend([column("R1", "R2"), column(odd[0], odd[1]), column(odd[2], odd[3])])
    records.extend([column("R3"), column(odd[4]), column(odd[5])])
    assert len(records) == 3
    assert records[0] == ["R1", odd[0], odd[2]]
    assert records[1] == ["R2", "", odd[3]]
    assert records[2] == ["R3", odd[4], odd[5]]
    records.truncate(1)  # as a matcher's rollback does
    assert len(records) == 1 and records.size == os.fstat(records._buffer._file.fileno()).st_size
    records.extend([column("R9"), column(""), column("z")])
    assert records[1] == ["R9", "", "z"]
    with pytest.raises(IndexError):
        records[2]
    with pytest.raises(ValueError, match="3 cells"):
        records.extend([column("R10")])
    records.close()


def test_a_pickled_record_file_is_an_equal_copy_in_its_own_file() -> None:
    records = RecordFile(width=2)
    records.extend([column("R1", "R2"), column("Jansen", "de Vries")])
    copy = pickle.loads(pickle.dumps(records))
    assert copy == records and copy[1] == ["R2", "de Vries"]
    assert copy._buffer._file.fileno() != records._buffer._file.fileno()
    records.close()
    assert copy[0] == ["R1", "Jansen"]  # closing the original leaves the copy readable
    copy.close()


def test_the_file_has_no_name_and_its_space_is_freed_on_close(tmp_path) -> None:
    records = RecordFile(width=1, directory=str(tmp_path))
    records.extend([column(*[f"R{i}" for i in range(1000)])])
    fd = records._buffer._file.fileno()
    assert os.fstat(fd).st_nlink == 0  # unlinked from the start: nothing is left after a crash or kill
    assert list(tmp_path.iterdir()) == []
    assert os.fstat(fd).st_size == records.size > 0
    records.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def resident_kib() -> dict[str, int]:
    """This process's resident anonymous and file-backed memory (KiB), from /proc/self/status."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) for name in ("RssAnon", "RssFile")}


def test_a_column_grows_into_its_file_and_reads_writes_takes_truncates_and_pickles_as_an_array(
    monkeypatch,
) -> None:
    """Past `MEMORY_BYTES` the column is a map of an unlinked file; its items read back as appended, an
    in-place change and a widening copy are kept, `take` across several windows gives what indexing
    gives, and a pickled copy is an equal column in its own file."""
    monkeypatch.setattr(ColumnFile, "MEMORY_BYTES", 4096)
    monkeypatch.setattr(ColumnFile, "WINDOW_BYTES", 8192)  # 2,048 int32 items per window
    values = np.arange(-1, 9_999, dtype=np.int64)
    column = ColumnFile(np.int32)
    for part in np.array_split(values, 7):
        column.extend(part)
    assert len(column) == len(values) and column._map is not None and column.view().dtype == np.int32
    assert os.fstat(column._file.fileno()).st_nlink == 0
    column.view()[3] = -7
    values[3] = -7
    assert column.view().tolist() == values.tolist()
    rng = np.random.default_rng(0)
    for indices in (rng.integers(0, len(values), 5_000), np.array([9_999, 0]), np.array([2_100, 2_050])):
        assert column.take(indices).tolist() == values[indices].tolist()
    column.release()
    assert column.take(np.arange(len(values))).tolist() == values.tolist()  # released: still in the file
    with pytest.raises(IndexError):
        column.take(np.array([len(values)]))
    copy = pickle.loads(pickle.dumps(column))
    assert copy == column and copy._file.fileno() != column._file.fileno()
    column.truncate(10)
    column.extend(np.array([5]))
    assert column.view().tolist() == [*values[:10].tolist(), 5] and copy != column
    widened = ColumnFile(np.int64)
    widened.extend(copy.view())
    assert widened.view().tolist() == values.tolist() and widened != copy  # dtypes differ
    assert copy.widened(np.int16) is copy and copy.widened(np.int32) is copy  # int32 holds them already
    wider = copy.widened(np.int64)
    assert wider == widened and wider is not copy and wider._map is not None  # a copy, in a file too
    assert ColumnFile(np.uint8).widened(np.uint16).dtype == np.uint16


def test_put_writes_what_indexing_writes_across_windows_and_the_values_stay(monkeypatch) -> None:
    """`put` of places all over a column of several windows (and a column of one window, and one still in
    memory), repeated places' last value winning as in NumPy: the column reads back as the array given
    the same assignments, after `release` too; `spans` cuts a range where the file's windows begin."""
    monkeypatch.setattr(ColumnFile, "MEMORY_BYTES", 4096)
    monkeypatch.setattr(ColumnFile, "WINDOW_BYTES", 8192)  # 1,024 int64 items per window
    rng = np.random.default_rng(4)
    for size in (300, 1_000, 9_000):  # in memory, one window of a file, nine windows
        expected = rng.integers(-50, 50, size)
        column = ColumnFile(np.int64)
        column.extend(expected)
        spread = rng.permutation(size)[: size // 3]
        for places in (spread, np.array([size - 1, 0]), np.array([1_023, 1_024, 1_023])):
            places = places[places < size]
            values = rng.integers(-9, 9, len(places))
            column.put(places, values)
            expected[places] = values
        column.put(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        with pytest.raises(IndexError):
            column.put(np.array([0, size]), np.array([1, 2]))
        column.release()
        assert column.view().tolist() == expected.tolist()
    assert column.spans(1_000, 3_100) == [(1_000, 1_024), (1_024, 2_048), (2_048, 3_072), (3_072, 3_100)]
    assert column.spans(2_048, 2_050) == [(2_048, 2_050)] and column.spans(5, 5) == [(5, 5)]


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="reads /proc (Linux)")
def test_a_pickled_column_makes_its_file_in_the_same_folder(tmp_path, monkeypatch) -> None:
    """The copy keeps the folder its column was given (a temporary folder on a larger disk, say); a
    pickle made before the folder was kept makes its file in the system's temporary folder."""
    monkeypatch.setattr(ColumnFile, "MEMORY_BYTES", 4096)
    column = ColumnFile(np.int64, str(tmp_path))
    column.extend(np.arange(1_000))
    copy = pickle.loads(pickle.dumps(column))
    assert copy == column and copy.directory == str(tmp_path)
    assert os.readlink(f"/proc/self/fd/{copy._file.fileno()}").startswith(f"{tmp_path}/")
    older = ColumnFile.__new__(ColumnFile)
    older.__setstate__({"dtype": "<i8", "data": column.view().tobytes()})
    assert older == column and older.directory is None


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="reads /proc (Linux)")
def test_a_pickled_spill_buffer_or_record_file_makes_its_file_in_the_same_folder(tmp_path) -> None:
    """As a column's copy (above): the folder is kept, and an older pickle without it still loads."""
    buffer = SpillBuffer(0, str(tmp_path))
    buffer.append(b"abc")
    copy = pickle.loads(pickle.dumps(buffer))
    assert copy == buffer and copy.directory == str(tmp_path) and copy.spilled == 3
    assert os.readlink(f"/proc/self/fd/{copy._file.fileno()}").startswith(f"{tmp_path}/")
    older = SpillBuffer.__new__(SpillBuffer)
    older.__setstate__({"spill_bytes": 0, "data": b"abc"})
    assert older == buffer and older.directory is None and older.spilled == 3
    records = RecordFile(width=1, directory=str(tmp_path))
    records.extend([column("R1", "R2")])
    copied = pickle.loads(pickle.dumps(records))
    assert copied == records and copied._buffer.directory == str(tmp_path)
    assert os.readlink(f"/proc/self/fd/{copied._buffer._file.fileno()}").startswith(f"{tmp_path}/")
    state = records.__getstate__()
    del state["directory"]
    older_records = RecordFile.__new__(RecordFile)
    older_records.__setstate__(state)
    assert older_records == records and older_records._buffer.directory is None
    elsewhere = RecordFile(width=1)  # equality is by contents, wherever the file is
    elsewhere.extend([column("R1", "R2")])
    assert elsewhere == records and elsewhere != RecordFile(width=2)
    for item in (buffer, copy, older, records, copied, older_records):
        item.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_a_large_column_taken_all_over_holds_neither_heap_nor_mapped_pages_afterwards() -> None:
    """32 MiB of items: appending them does not grow the process's anonymous memory by their size, and
    after a `take` of indices all over the column (as a part's candidates are) its pages are unmapped."""
    items = 8 << 20
    column = ColumnFile(np.int32)
    before = resident_kib()
    for _ in range(8):
        column.extend(np.arange(items // 8, dtype=np.int32))
    column.release()
    grown = resident_kib()
    assert grown["RssAnon"] - before["RssAnon"] < 8 << 10  # 32 MiB of items, under 8 MiB of heap
    indices = np.random.default_rng(1).integers(0, items, 100_000)
    assert (column.take(indices) == indices % (items // 8)).all()
    assert resident_kib()["RssFile"] - grown["RssFile"] < 4 << 10  # not the 32 MiB its reads touched


def test_offsets_past_4_gib_come_back_exact_and_truncate() -> None:
    """Each offset is kept in 32 bits and the places where the high part went up: items of several GiB,
    and more than one wrap at one item, still give back every offset."""
    ends = np.array([0, 5, 2**32 - 1, 2**32, 2**32 + 7, 3 * 2**32 + 1, 3 * 2**32 + 1, 2**40], dtype=np.int64)
    offsets = Offsets()
    offsets.extend(ends[:3])
    offsets.extend(ends[3:])
    assert len(offsets) == len(ends) and offsets.last == 2**40
    assert [offsets[i] for i in range(len(ends))] == ends.tolist()
    assert offsets[-2] == 3 * 2**32 + 1
    assert offsets.take(np.array([7, 3, 0, 5])).tolist() == ends[[7, 3, 0, 5]].tolist()
    with pytest.raises(IndexError):
        offsets[len(ends)]
    copy = pickle.loads(pickle.dumps(offsets))
    assert copy == offsets
    offsets.truncate(4)
    assert [offsets[i] for i in range(4)] == ends[:4].tolist() and offsets.last == 2**32
    offsets.extend(np.array([2**33], dtype=np.int64))
    assert offsets[4] == 2**33 and offsets.take(np.array([4, 2])).tolist() == [2**33, 2**32 - 1]
    assert copy != offsets
    offsets.truncate(0)
    assert len(offsets) == 0 and offsets.last == 0 and not offsets.wraps


@pytest.mark.parametrize("spill", [2, 1 << 19])
def test_a_float_file_gives_back_each_value_bit_for_bit_around_its_spill_and_truncates(monkeypatch, spill):
    monkeypatch.setattr(FloatFile, "SPILL_ITEMS", spill)
    values = [0.1, -2.5e300, float("nan"), 19_700.041666666668, 5e-324]
    floats = FloatFile()
    floats.extend(values[:3])
    floats.extend(values[3:])
    assert len(floats) == 5 and (floats.spilled == 5 if spill == 2 else floats.spilled == 0)
    got = [floats[i] for i in range(5)]
    assert [v for v in got if not math.isnan(v)] == [v for v in values if not math.isnan(v)]
    assert math.isnan(got[2]) and floats[-1] == 5e-324
    places = [4, 0, 2, 3, 2]  # all from the file (spill 2) or all from memory
    assert floats.take(np.array(places)).tobytes() == np.array([values[i] for i in places]).tobytes()
    assert floats.take(np.array([], dtype=np.int64)).shape == (0,)
    with pytest.raises(IndexError):
        floats.take(np.array([0, 5]))
    copied = pickle.loads(pickle.dumps(floats))
    assert copied == floats and copied[3] == values[3]
    with pytest.raises(IndexError):
        floats[5]
    floats.truncate(2)
    assert len(floats) == 2 and floats[1] == values[1] and floats != copied
    floats.extend([7.0])
    assert [floats[i] for i in range(3)] == [0.1, -2.5e300, 7.0]
    assert floats.take(np.array([2, 0, 1])).tolist() == [7.0, 0.1, -2.5e300]


# Texts that test the encodings' edges: empty, accents, a CJK character, an emoji (4 bytes), a NUL, the
# separator's neighbours in Latin-1, and a lone surrogate (only "surrogatepass" encodes it).
AWKWARD = ["", "R1", "jan de vri\u00ebs", "\u4e2d", "\U0001f600 ok", "a\x00b", "\u00fe\u00ff", "tail "]


def random_texts(seed: int, n: int, surrogate: bool) -> list[str]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(AWKWARD), n).tolist()
    texts = [AWKWARD[i] + str(j) * (j % 3) for j, i in enumerate(picks)]
    if surrogate:
        texts[n // 2] = "x\udc80y"
    return texts


@pytest.mark.parametrize("surrogate", [False, True])
def test_records_are_written_byte_for_byte_as_one_cell_at_a_time(surrogate) -> None:
    """Whole columns encoded in Arrow give the bytes and record lengths of the per-cell encoding, with a
    lone surrogate too (there the per-cell encoding is used)."""
    rows, width = 500, 4
    columns = [column(*random_texts(seed, rows, surrogate and seed == 2)) for seed in range(width)]
    expected = storage._encoded_records(columns, rows, width)
    joined = storage._joined_records(columns, rows)
    assert (joined is None) == surrogate
    records = RecordFile(width)
    records.extend(columns)
    assert records._buffer.getvalue() == expected[0]
    assert np.diff(records.ends.take(np.arange(rows)), prepend=0).tolist() == expected[1].tolist()
    if joined is not None:
        assert joined[0] == expected[0] and joined[1].tolist() == expected[1].tolist()
    assert records[rows // 2] == [values[rows // 2] for values in columns]
    assert records[rows - 1] == [values[rows - 1] for values in columns]


def test_records_of_a_cell_that_is_not_text_fail_as_before() -> None:
    with pytest.raises(AttributeError):
        RecordFile(2).extend([column("a", "b"), np.array([None, "x"], dtype=object)])


@pytest.mark.parametrize("surrogate", [False, True])
def test_texts_encode_and_decode_as_utf8_with_surrogatepass(surrogate) -> None:
    texts = random_texts(7, 2000, surrogate)
    data, lengths = encode_texts(texts)
    assert data == b"".join(text.encode("utf-8", "surrogatepass") for text in texts)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    order = np.random.default_rng(1).permutation(len(texts))
    assert decode_slices(data, starts[order], ends[order]) == [texts[i] for i in order]
    # A bytearray (a spill buffer's tail) can still grow afterwards: no view of it is left behind.
    tail = bytearray(data)
    assert decode_slices(tail, starts[:3], ends[:3]) == texts[:3]
    tail += b"more"
    assert encode_texts([])[0] == b"" and not len(encode_texts([])[1])
    assert decode_slices(data, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)) == []

import pandas as pd
import pytest

from pipeline.config import config_from_dict
from pipeline.exceptions import ConfigError, InputFileError, SchemaError
from pipeline.ingest import (
    ReadOptions,
    SharedValues,
    cell_text,
    check_unique_ids,
    detect_format,
    iter_table,
    read_table,
    require_columns,
)


def write(tmp_path, text: str | bytes, name: str = "records.csv"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def test_every_cell_is_text_and_empty_is_missing(tmp_path):
    path = write(tmp_path, 'record_id,code,amount,note\n007,NA,1.50,"a, ""quoted""\nline"\n8,,null,\n')
    frame = read_table(path)
    assert frame.to_dict("records") == [
        {"record_id": "007", "code": "NA", "amount": "1.50", "note": 'a, "quoted"\nline'},
        {"record_id": "8", "code": "", "amount": "null", "note": ""},
    ]
    assert all(dtype is object or str(dtype) == "object" for dtype in frame.dtypes)


def test_chunks_keep_row_numbers_and_order(tmp_path):
    rows = "".join(f"{i},x{i}\n" for i in range(7))
    chunks = list(iter_table(write(tmp_path, "record_id,v\n" + rows), chunk_rows=3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert list(chunks[2].index) == [6]
    assert pd.concat(chunks)["record_id"].tolist() == [str(i) for i in range(7)]


def test_header_only_gives_one_empty_chunk_with_columns(tmp_path):
    chunks = list(iter_table(write(tmp_path, "record_id,v\n")))
    assert len(chunks) == 1 and chunks[0].empty and list(chunks[0].columns) == ["record_id", "v"]


def test_utf8_bom_and_unicode(tmp_path):
    frame = read_table(write(tmp_path, "\ufeffrecord_id,name\n1,Ærø Ünïcødé 北京\n"))
    assert list(frame.columns) == ["record_id", "name"]
    assert frame.at[0, "name"] == "Ærø Ünïcødé 北京"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "file is empty"),
        ("record_id,v\n1,a,b\n", "row 1 (line 2) has 3 cells, the header has 2"),
        ("record_id,v\n1,a\n2\n", "row 2 (line 3) has 1 cells"),
        ("record_id,record_id\n1,2\n", "names column 'record_id' twice"),
        (b"record_id,v\n1,caf\x81\n", "line 2 is not UTF-8 text (byte 17), nor Windows-1252"),
    ],
)
def test_bad_files_name_the_file_and_row(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(InputFileError) as info:
        read_table(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        read_table(tmp_path / "absent.csv")
    with pytest.raises(InputFileError, match="is a folder"):
        read_table(tmp_path)


def test_parquet_is_read_as_text(tmp_path):
    path = tmp_path / "records.parquet"
    pd.DataFrame({"record_id": ["01", "02"], "n": [1, None], "s": ["NA", None]}).to_parquet(path)
    frame = read_table(path)
    assert frame["record_id"].tolist() == ["01", "02"]
    assert frame["n"].tolist()[1] == "" and frame["s"].tolist() == ["NA", ""]


def test_parquet_that_is_not_parquet(tmp_path):
    path = write(tmp_path, "not parquet at all", name="x.parquet")
    with pytest.raises(InputFileError, match="not a readable Parquet file"):
        read_table(path)


def test_required_columns_and_unique_ids():
    frame = pd.DataFrame({"record_id": ["a", "b", "a"]}, dtype=object)
    with pytest.raises(SchemaError, match="missing column 'amount'"):
        require_columns(frame, ["record_id", "amount"], source="f.csv", what="configured")
    with pytest.raises(SchemaError, match="row 3: record_id 'a' appears more than once"):
        check_unique_ids(frame["record_id"], source="f.csv", id_column="record_id")
    with pytest.raises(SchemaError, match="row 1: empty 'record_id'"):
        check_unique_ids(pd.Series(["", "x"], dtype=object), source="f.csv", id_column="record_id")


def test_ids_checked_against_earlier_chunks_are_added_only_when_none_repeats() -> None:
    """`check_unique_ids` with a `SeenIds` checks and adds a chunk's ids with one hashing and look-up; a
    chunk refused for an id repeated within it or from an earlier chunk adds none of its ids."""
    from pipeline.ingest import SeenIds

    seen = SeenIds()
    check_unique_ids(pd.Series(["a", "b"], index=[0, 1]), source="f.csv", id_column="id", seen=seen)
    with pytest.raises(SchemaError, match=r"^f.csv: row 5: id 'c' appears more than once$"):
        check_unique_ids(
            pd.Series(["c", "d", "c"], index=[2, 3, 4]), source="f.csv", id_column="id", seen=seen
        )
    with pytest.raises(SchemaError, match=r"^f.csv: row 5: id 'b' appears more than once$"):
        check_unique_ids(
            pd.Series(["e", "f", "b"], index=[2, 3, 4]), source="f.csv", id_column="id", seen=seen
        )
    assert (
        len(seen) == 2
        and seen.contains(["a", "b", "c", "d", "e", "f"]).tolist() == [True, True] + [False] * 4
    )
    check_unique_ids(pd.Series(["c", "d"], index=[2, 3]), source="f.csv", id_column="id", seen=seen)
    assert seen.contains(["c", "d", "e"]).tolist() == [True, True, False]
    assert seen.add(["e", "a", "g"]).tolist() == [False, True, False] and len(seen) == 4


# ------------------------------------------------------------------------ files as departments export them

ROWS = [
    {"record_id": "007", "name": "Café Ærø", "amount": "1.234,50", "note": 'a "quoted"\nline'},
    {"record_id": "08", "name": "€ 5 NA", "amount": "", "note": "NA"},
]


def export(tmp_path, delimiter: str, encoding: str, name: str = "export.csv"):
    """The rows as a spreadsheet program writes them: quoted where needed, CRLF line ends."""
    import csv
    import io

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(ROWS[0]), delimiter=delimiter, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(ROWS)
    return write(tmp_path, text.getvalue().encode(encoding), name=name)


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "cp1252"])
def test_every_separator_and_encoding_is_detected_and_read_exactly(tmp_path, delimiter, encoding):
    path = export(tmp_path, delimiter, encoding)
    fmt = detect_format(path)
    assert (fmt.kind, fmt.delimiter, fmt.encoding) == (
        "csv",
        delimiter,
        "utf-8" if "utf" in encoding else "cp1252",
    )
    assert read_table(path).to_dict("records") == ROWS


def test_detection_is_not_fooled_by_separators_inside_values(tmp_path):
    # Dutch amounts hold commas, a note holds semicolons; the header decides.
    path = write(tmp_path, "id;amount;note\n1;1.234,50;a,b\n2;7,00;c|d\n")
    assert read_table(path)["amount"].tolist() == ["1.234,50", "7,00"]
    path = write(tmp_path, 'id,note\n1,"x;y;z"\n2,a;b\n', name="comma.csv")
    assert read_table(path)["note"].tolist() == ["x;y;z", "a;b"]


def test_a_single_column_file_is_read(tmp_path):
    assert read_table(write(tmp_path, "record_id\n1\n2\n"))["record_id"].tolist() == ["1", "2"]


def test_chunks_of_a_detected_cp1252_file_keep_row_numbers(tmp_path):
    rows = "".join(f"{i};caf\xe9 {i}\r\n" for i in range(7))
    path = write(tmp_path, ("record_id;v\r\n" + rows).encode("cp1252"))
    chunks = list(iter_table(path, chunk_rows=3))
    assert [list(c.index) for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    assert pd.concat(chunks)["v"].tolist() == [f"caf\xe9 {i}" for i in range(7)]


def test_config_overrides_detection(tmp_path, caplog):
    # Valid UTF-8 that was really written as Windows-1252 cannot be told apart; the config decides.
    path = write(tmp_path, "id|name\n1|Ã©\n".encode("cp1252"))
    assert read_table(path)["name"].tolist() == ["é"]
    assert read_table(path, options=ReadOptions(encoding="windows-1252"))["name"].tolist() == ["Ã©"]
    # Both `,` and `|` split every row into two cells: detection takes `,` and says so; the config decides.
    path = write(tmp_path, "id|name, city\n1|Jansen, Utrecht\n", name="both.csv")
    assert list(read_table(path).columns) == ["id|name", " city"]
    assert "separators ',' and '|' both fit" in caplog.text
    frame = read_table(path, options=ReadOptions(delimiter="|"))
    assert frame.to_dict("records") == [{"id": "1", "name, city": "Jansen, Utrecht"}]


def test_config_keys_are_validated_and_normalised():
    base = {"name": "orders", "fields": {"amount": {"type": "number"}}}
    config = config_from_dict({**base, "delimiter": "tab", "encoding": "Windows-1252", "sheet": "Orders"})
    assert (config.delimiter, config.encoding, config.sheet) == ("\t", "cp1252", "Orders")
    assert ReadOptions.from_config(config) == ReadOptions(delimiter="\t", encoding="cp1252", sheet="Orders")
    assert ReadOptions.from_config(config_from_dict(base)) == ReadOptions()
    with pytest.raises(ConfigError, match=r"key `delimiter`: delimiter ':' is not one of"):
        config_from_dict({**base, "delimiter": ":"})
    with pytest.raises(
        ConfigError, match=r"key `encoding`: encoding 'klingon' is unknown; use utf-8 or cp1252"
    ):
        config_from_dict({**base, "encoding": "klingon"})


@pytest.mark.parametrize(
    ("content", "options", "expected"),
    [
        # The configured separator leaves the header one column that holds another separator.
        (
            b"id;name\n1;x\n",
            {"delimiter": ","},
            ["separator ',' (set in the config)", "set `delimiter: ';'`"],
        ),
        # Rows that do not line up under the detected separator.
        (
            b"id;name;note\n1;a;b\n2;c;d;e\n",
            {},
            ["row 2 (line 3) has 4 cells, the header has 3", "separator ';' (detected)", "double quotes"],
        ),
        (b"id,name\n1,a\n", {"delimiter": "\t"}, ["separator tab (set in the config)", "`delimiter: ','`"]),
        # Under the configured separator a row does not line up; another separator would line it up.
        (
            b"id\tcode|nr\n1\tx\n",
            {"delimiter": "|"},
            ["row 1 (line 2) has 1 cells", 'set `delimiter: "\\t"`'],
        ),
        (b"id;name\n1;b\n2;x;y\n", {"delimiter": ";"}, ["row 2 (line 3) has 3 cells", "check `delimiter`"]),
        # Bytes that are neither UTF-8 nor Windows-1252, and a file that mixes the two.
        (
            b"id,name\n1,\xe9\n2,\x9d\n",
            {},
            [
                "line 2 is not UTF-8 text (byte 10)",
                "nor Windows-1252 (byte 0x9d on line 3)",
                "save the file as UTF-8",
            ],
        ),
        (
            "id,name\n1,é\n2,".encode() + b"\xe9\n",
            {},
            ["line 3 is not UTF-8", "but line 2 is", "set `encoding: cp1252`"],
        ),
        # The configured encoding does not fit the bytes.
        (
            "id,name\n1,é\n".encode("cp1252"),
            {"encoding": "utf-8"},
            ["line 2 is not UTF-8 text", "encoding UTF-8 set in the config", "cp1252 for Windows-1252"],
        ),
    ],
)
def test_a_wrong_guess_is_never_silent(tmp_path, content, options, expected):
    path = write(tmp_path, content)
    with pytest.raises(InputFileError) as info:
        read_table(path, options=ReadOptions(**options))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_an_old_xls_and_a_damaged_xlsx_are_refused(tmp_path):
    with pytest.raises(
        InputFileError, match=r"old Excel \.xls workbook; save it from Excel as \.xlsx or CSV"
    ):
        read_table(write(tmp_path, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100, name="old.xls"))
    with pytest.raises(InputFileError, match=r"not a readable \.xlsx workbook"):
        read_table(write(tmp_path, "record_id\n1\n", name="fake.xlsx"))


# ----------------------------------------------------------------------------------------------------- Excel


def workbook(tmp_path, sheets: dict[str, list[list[object]]], name: str = "export.xlsx"):
    from openpyxl import Workbook

    book = Workbook()
    book.remove(book.active)
    for title, rows in sheets.items():
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(row)
    path = tmp_path / name
    book.save(path)
    return path


def test_xlsx_cells_become_the_text_a_csv_export_holds(tmp_path):
    import datetime as dt

    path = workbook(
        tmp_path,
        {
            "Orders": [
                ["record_id", "amount", "count", "ordered", "entered", "paid", "note"],
                ["007", 1234.5, 3, dt.date(2024, 7, 2), dt.datetime(2024, 7, 2, 9, 57), True, "NA"],
                ["008", 12.0, 10**15, dt.datetime(2024, 7, 3), dt.datetime(2024, 7, 3, 0, 0, 1), False, None],
                [None, None, None, None, None, None, None],  # an empty row, skipped like a blank line
                ["009", None, -0.1, None, None, None, "line\nbreak"],
            ],
            "Other": [["x"], ["y"]],
        },
    )
    frame = read_table(path)
    assert frame.to_dict("records") == [
        {
            "record_id": "007",
            "amount": "1234.5",
            "count": "3",
            "ordered": "2024-07-02",
            "entered": "2024-07-02T09:57:00",
            "paid": "TRUE",
            "note": "NA",
        },
        {
            "record_id": "008",
            "amount": "12",
            "count": "1000000000000000",
            "ordered": "2024-07-03",
            "entered": "2024-07-03T00:00:01",
            "paid": "FALSE",
            "note": "",
        },
        {
            "record_id": "009",
            "amount": "",
            "count": "-0.1",
            "ordered": "",
            "entered": "",
            "paid": "",
            "note": "line\nbreak",
        },
    ]
    assert all(str(dtype) == "object" for dtype in frame.dtypes)
    assert read_table(path, options=ReadOptions(sheet="Other")).to_dict("records") == [{"x": "y"}]


def test_xlsx_chunks_keep_row_numbers_and_short_rows_are_padded(tmp_path):
    path = workbook(tmp_path, {"S": [["record_id", "v", "w"], *[[f"0{i}", i] for i in range(5)]]})
    chunks = list(iter_table(path, chunk_rows=2))
    assert [list(c.index) for c in chunks] == [[0, 1], [2, 3], [4]]
    assert pd.concat(chunks).to_dict("list") == {
        "record_id": ["00", "01", "02", "03", "04"],
        "v": ["0", "1", "2", "3", "4"],
        "w": [""] * 5,
    }


def test_xlsx_header_only_and_empty_sheets(tmp_path):
    chunks = list(iter_table(workbook(tmp_path, {"S": [["record_id", "v"]]})))
    assert len(chunks) == 1 and chunks[0].empty and list(chunks[0].columns) == ["record_id", "v"]
    path = workbook(tmp_path, {"Leeg": []}, name="empty.xlsx")
    with pytest.raises(InputFileError, match=r"empty\.xlsx: sheet 'Leeg' is empty"):
        read_table(path)


def test_xlsx_errors_name_the_sheet_row_and_fix(tmp_path):
    path = workbook(tmp_path, {"A": [["record_id", "v"], ["1", "x", "stray"]], "B": [["x"]]})
    with pytest.raises(InputFileError, match=r"row 1 \(sheet 'A' row 2\) has a value in column C, beyond"):
        read_table(path)
    with pytest.raises(
        InputFileError, match=r"has no sheet 'Orders' \(set in the config\); its sheets are 'A', 'B'"
    ):
        read_table(path, options=ReadOptions(sheet="Orders"))


def test_a_workbook_named_csv_is_read_as_a_workbook(tmp_path):
    path = workbook(tmp_path, {"S": [["record_id"], ["01"]]}, name="export.csv")
    assert detect_format(path).kind == "xlsx"
    assert read_table(path)["record_id"].tolist() == ["01"]


def test_cell_text_examples():
    import datetime as dt

    assert [cell_text(v) for v in (0.1 + 0.2, 1e-7, -3.0, dt.time(8, 30), 5)] == [
        "0.30000000000000004",
        "1e-07",
        "-3",
        "08:30:00",
        "5",
    ]


@pytest.mark.parametrize("clash", [False, True])
def test_seen_ids_find_exactly_the_ids_added_even_when_one_hash_clashes(monkeypatch, clash) -> None:
    import numpy as np

    from pipeline.ingest import SeenIds, check_unique_ids

    if clash:  # every id the same first hash: only the second tells them apart
        real = SeenIds._hashes

        def one_key(self, ids):
            keys, checks = real(self, ids)
            return np.zeros(len(keys), dtype=np.uint64), checks

        monkeypatch.setattr(SeenIds, "_hashes", one_key)
    seen = SeenIds()
    assert seen.contains(["a"]).tolist() == [False]
    seen.add(["b", "a"])  # a clash within a chunk
    seen.add(pd.Series(["c"]))  # and with an earlier chunk's id
    assert len(seen) == 3
    assert len(seen.clashes) == (2 if clash else 0)  # the side table holds the ids the sorted table cannot
    assert seen.contains(["c", "x", "a", "b", "y"]).tolist() == [True, False, True, True, False]
    check_unique_ids(pd.Series(["x", "y"]), source="batch.csv", id_column="id", seen=seen)  # and adds them
    with pytest.raises(SchemaError, match=r"batch.csv: row 2: id 'c' appears more than once"):
        check_unique_ids(pd.Series(["z", "c"]), source="batch.csv", id_column="id", seen=seen)
    assert seen.contains(["x", "y", "z"]).tolist() == [True, True, False]


def test_seen_ids_over_many_chunks_answer_as_a_set_of_the_ids_would() -> None:
    from pipeline.ingest import SeenIds

    seen, added = SeenIds(), set()
    for chunk in range(40):  # enough appended runs that the table merges some of them
        ids = [f"R{chunk}-{i}" for i in range(chunk * 7 % 50)]
        asked = [*ids[::3], f"R{chunk - 1}-1", f"R{chunk + 1}-1", f"X{chunk}"]
        assert seen.contains(asked).tolist() == [i in added for i in asked]
        seen.add(ids)
        added.update(ids)
    assert len(seen) == len(added) and not seen.clashes
    assert seen.contains(sorted(added)).all()


def test_shared_values_share_repeated_cells_across_chunks_and_change_nothing(tmp_path):
    rows = "".join(f"R{i},{'Delft' if i % 3 else 'Gouda'},{i * 7}\n" for i in range(10))
    path = write(tmp_path, "record_id,city,amount\n" + rows)
    shared = SharedValues()
    chunks = [shared.chunk(chunk) for chunk in iter_table(path, chunk_rows=5)]
    together = pd.concat(chunks)
    plain = read_table(path)
    pd.testing.assert_frame_equal(together, plain)
    assert list(together.index) == list(range(10))
    assert all(str(dtype) == "object" for dtype in together.dtypes)
    cities = together["city"].tolist()
    assert cities[1] is cities[4] is cities[5] is cities[8], "one string per value, across chunks"
    assert cities[0] is cities[9] and cities[0] is not cities[1]
    # Mostly distinct columns are left as read: no lookup table for them.
    assert set(shared.values) == {"city"}
    pd.testing.assert_frame_equal(read_table(path, share_repeated=True), plain)


def test_encoding_is_checked_across_decode_blocks(tmp_path):
    """A character split by a border of the check's blocks is UTF-8; a bad byte blocks later is reported
    on its own line."""
    from pipeline.ingest import _DECODE_BLOCK

    head = b"id,name\n1,"
    # "€" (three bytes) begins at the first block's last byte.
    first = head + b"a" * (_DECODE_BLOCK - 1 - len(head)) + "€ ß\n".encode()
    rest = "".join(f"{i},café\n" for i in range(2, _DECODE_BLOCK // 4)).encode()
    path = write(tmp_path, first + rest)
    assert detect_format(path).encoding == "utf-8"
    bad = write(tmp_path, first + rest + b"0,caf\xe9\n", name="bad.csv")
    assert bad.stat().st_size > 2 * _DECODE_BLOCK
    with pytest.raises(InputFileError, match=f"line {_DECODE_BLOCK // 4 + 1} is not UTF-8"):
        read_table(bad)

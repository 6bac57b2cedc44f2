import pandas as pd
import pytest

from pipeline.exceptions import InputFileError, SchemaError
from pipeline.ingest import check_unique_ids, iter_table, read_table, require_columns


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
        (b"record_id,v\n1,caf\xe9\n", "line 2 is not UTF-8"),
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
    with pytest.raises(SchemaError, match="'b' appears more than once"):
        check_unique_ids(pd.Series(["b"], dtype=object), source="f.csv", id_column="record_id", seen={"b"})

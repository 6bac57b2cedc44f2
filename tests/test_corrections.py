import pandas as pd
import pytest

from pipeline.corrections import (
    cell_labels,
    duplicate_clusters,
    duplicate_pairs,
    merges,
    replay_backwards,
    validate_log,
)
from pipeline.exceptions import CorrectionsLogError


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, dtype=object).fillna("")


STORED = frame(
    [
        {"record_id": "1", "code": "C-1", "amount": "10.00"},
        {"record_id": "2", "code": "C-2", "amount": "20.00"},
        {"record_id": "3", "code": "C-2", "amount": "20.00"},
    ]
)


def log(rows: list[dict]) -> pd.DataFrame:
    return validate_log(frame(rows))


def test_replay_undoes_edits_latest_first():
    entries = log(
        [
            # Entered empty, corrected to C-9 on the 2nd, corrected again to C-1 on the 5th.
            {
                "record_id": "1",
                "action": "edit",
                "field": "code",
                "old_value": "C-9",
                "new_value": "C-1",
                "corrected_at": "2024-01-05T10:00:00",
            },
            {
                "record_id": "1",
                "action": "edit",
                "field": "code",
                "old_value": "",
                "new_value": "C-9",
                "corrected_at": "2024-01-02T10:00:00",
            },
            {
                "record_id": "2",
                "action": "edit",
                "field": "amount",
                "old_value": "200.00",
                "new_value": "20.00",
                "corrected_at": "2024-01-03T10:00:00",
            },
            {"record_id": "3", "action": "merge", "merged_into": "2", "corrected_at": "2024-01-03T11:00:00"},
        ]
    )
    entered, stats = replay_backwards(STORED, entries, id_column="record_id")
    assert entered["code"].tolist() == ["", "C-2", "C-2"]
    assert entered["amount"].tolist() == ["10.00", "200.00", "20.00"]
    assert STORED["code"].tolist() == ["C-1", "C-2", "C-2"], "input must not be changed"
    assert STORED["amount"].tolist() == ["10.00", "20.00", "20.00"], "input must not be changed"
    assert (stats.edits_applied, stats.merges, stats.edits_unknown_record) == (3, 1, 0)
    # The unedited columns are shared with the input, not copied: a later write must still not reach it.
    entered.loc[0, "record_id"] = "changed"
    assert STORED["record_id"].tolist() == ["1", "2", "3"]


def test_replay_without_timestamps_uses_log_order():
    entries = log(
        [
            {"record_id": "1", "action": "edit", "field": "code", "old_value": "", "new_value": "C-9"},
            {"record_id": "1", "action": "edit", "field": "code", "old_value": "C-9", "new_value": "C-1"},
        ]
    )
    entered, _ = replay_backwards(STORED, entries, id_column="record_id")
    assert entered.at[0, "code"] == ""


def test_unknown_records_and_fields_are_counted_not_applied():
    entries = log(
        [
            {"record_id": "99", "action": "edit", "field": "code", "old_value": "x", "new_value": "y"},
            {"record_id": "1", "action": "edit", "field": "colour", "old_value": "x", "new_value": "y"},
        ]
    )
    entered, stats = replay_backwards(STORED, entries, id_column="record_id")
    assert entered.equals(STORED)
    assert (stats.edits_unknown_record, stats.edits_unknown_field) == (1, 1)


def test_cell_labels_first_old_last_new_and_reverts_dropped():
    entries = log(
        [
            {"record_id": "1", "action": "edit", "field": "code", "old_value": "", "new_value": "C-9"},
            {"record_id": "1", "action": "edit", "field": "code", "old_value": "C-9", "new_value": "C-1"},
            {
                "record_id": "2",
                "action": "edit",
                "field": "amount",
                "old_value": "20.00",
                "new_value": "2.00",
            },
            {
                "record_id": "2",
                "action": "edit",
                "field": "amount",
                "old_value": "2.00",
                "new_value": "20.00",
            },
        ]
    )
    labels = cell_labels(entries, STORED["record_id"])
    assert labels.to_dict("records") == [
        {"record_id": "1", "field": "code", "old_value": "", "new_value": "C-1"}
    ]


def test_merge_chains_form_one_cluster_with_implied_pairs():
    entries = log(
        [
            {"record_id": "A", "action": "merge", "merged_into": "B"},
            {"record_id": "B", "action": "merge", "merged_into": "C"},
            {"record_id": "D", "action": "merge", "merged_into": "E"},
            {"record_id": "F", "action": "merge", "merged_into": "F"},
        ]
    )
    clusters = duplicate_clusters(merges(entries))
    assert clusters["A"] == clusters["B"] == clusters["C"] == "C"
    assert clusters["D"] == "E" and "F" not in clusters
    assert duplicate_pairs(merges(entries)) == {
        frozenset(p) for p in (("A", "B"), ("A", "C"), ("B", "C"), ("D", "E"))
    }


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"record_id": "1", "action": "delete"}, "action 'delete' is not one of"),
        ({"record_id": "1", "action": "edit", "field": ""}, "`edit` row has an empty 'field'"),
        ({"record_id": "1", "action": "merge", "merged_into": ""}, "`merge` row has an empty 'merged_into'"),
        ({"record_id": "", "action": "confirm"}, "empty record_id"),
        ({"record_id": "1", "action": "confirm", "corrected_at": "yesterday"}, "is not ISO 8601"),
    ],
)
def test_bad_log_rows_name_the_row(row, message):
    with pytest.raises(CorrectionsLogError) as info:
        validate_log(frame([{"record_id": "0", "action": "confirm"}, row]), source="log.csv")
    assert "log.csv: row 2" in str(info.value) and message in str(info.value)


def test_missing_action_column():
    with pytest.raises(Exception, match="missing column 'action'"):
        validate_log(frame([{"record_id": "1"}]), source="log.csv")


def test_actions_are_case_insensitive():
    assert log([{"record_id": "1", "action": " Merge ", "merged_into": "2"}])["action"].tolist() == ["merge"]


def test_confirmed_records_are_whole_record_confirmations_never_corrected_later() -> None:
    from pipeline.corrections import confirmed_records

    log = validate_log(
        pd.DataFrame(
            {
                "record_id": ["A", "B", "C", "C", "D"],
                "action": ["confirm", "confirm", "confirm", "edit", "confirm"],
                "field": ["", "amount", "", "amount", ""],
                "old_value": ["", "", "", "1", ""],
                "new_value": ["", "", "", "2", ""],
                "merged_into": ["", "", "", "", "A"],
            },
            dtype=object,
        )
    )
    # B confirmed one cell, C was corrected after all, D was a rejected duplicate of A
    assert confirmed_records(log) == {"A"}

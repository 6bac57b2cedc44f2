"""The summary's and report's counts of the flags, taken flag by flag as flags.csv is written."""

import pandas as pd

from pipeline import schema as s
from pipeline.report import TOP_FLAGS, TOP_REASONS, FlagTally
from pipeline.score import FlagRuns


def _flags(rows: list[tuple[int, str, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "_row": row,
                s.FLAG_RECORD_ID: f"R{row}",
                s.FLAG_KIND: kind,
                s.FLAG_FIELD: field,
                s.FLAG_VALUE: "v",
                s.FLAG_SUGGESTION: suggestion,
                s.FLAG_MATCH_ID: "",
                s.FLAG_SCORE: score,
                s.FLAG_REASON: "why",
                s.FLAG_SUGGEST_EMPTY: "false",
            }
            for row, kind, field, suggestion, score in rows
        ]
    )


def test_the_tally_counts_what_the_whole_flag_frame_would_give(tmp_path) -> None:
    """Kinds, error fields, suggestions, distinct records, the top groups (ties included: more groups than
    `TOP_REASONS`, several of one size) and the queue's first flags, as pandas counts them on flags.csv
    read back whole (what the job did before)."""
    fields = [f"f{i:02d}" for i in range(TOP_REASONS + 3)]
    rows = []
    for i, field in enumerate(fields):  # group sizes 1, 1, 2, 2, 3, 3, ...: ties at the cut
        for j in range(i // 2 + 1):
            rows.append((100 * i + j, "error", field, "x" if j % 2 else "", 0.5 + 0.01 * j))
    rows += [(5, "duplicate", "", "", 0.99), (5, "anomaly", "", "", 0.7), (7, "anomaly", "", "", 0.2)]
    runs = FlagRuns(tmp_path / "runs", run_flags=7)
    runs.add(_flags(rows[:20]))
    runs.add(_flags(rows[20:]))
    tally = FlagTally()
    assert runs.merge_into(tmp_path / "flags.csv", tally) == len(rows) == len(tally)

    flags = pd.read_csv(tmp_path / "flags.csv", dtype=str, keep_default_na=False)
    errors = flags[flags[s.FLAG_KIND] == s.KIND_ERROR]
    assert dict(tally.kinds) == flags[s.FLAG_KIND].value_counts().to_dict()
    assert tally.per_field() == errors[s.FLAG_FIELD].value_counts().sort_index().to_dict()
    assert tally.with_suggestion == (errors[s.FLAG_SUGGESTION] != "").sum() > 0
    assert tally.records() == flags[s.FLAG_RECORD_ID].nunique() == len(rows) - 1  # row 5 twice
    top = flags.groupby([s.FLAG_KIND, s.FLAG_FIELD]).size().sort_values(ascending=False).head(TOP_REASONS)
    assert tally.top_groups() == top.reset_index(name="count").to_dict(orient="records")
    assert len(tally.top_groups()) == TOP_REASONS
    pd.testing.assert_frame_equal(tally.top_flags(), flags.head(TOP_FLAGS).astype(object))


def test_an_empty_queue_counts_nothing(tmp_path) -> None:
    tally = FlagTally()
    assert FlagRuns(tmp_path / "runs").merge_into(tmp_path / "flags.csv", tally) == 0
    assert (len(tally), tally.records(), tally.per_field(), tally.top_groups()) == (0, 0, {}, [])
    assert tally.top_flags().columns.tolist() == list(s.FLAG_COLUMNS)


def test_the_rows_flagged_are_counted_once_each_in_a_bit_per_row() -> None:
    """Rows in no order, repeated, on both sides of each byte's border and far apart: `records` is the
    number of distinct rows, held in about a bit per row up to the last one flagged."""
    rows = [8, 7, 0, 999_999, 8, 15, 16, 7, 123_457, 0, 999_999, 1]
    tally = FlagTally()
    for row in rows:
        tally.add(["R", "anomaly", "", "", "", "", "0.5000", "", "false"], row=row)
    assert (len(tally), tally.records()) == (len(rows), len(set(rows)))
    assert 1_000_000 // 8 <= len(tally.flagged) <= 2 * 1_000_000 // 8

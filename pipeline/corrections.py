"""The corrections log: validating it, and replaying it backwards to recover records as entered.

The history holds records as currently stored, after staff corrected them. Undoing every `edit`, latest
first, gives each record as it was typed in; those are the inputs the models must learn to judge, and the
edits and merges are their labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline import schema as s
from pipeline.exceptions import CorrectionsLogError
from pipeline.ingest import DETECT, ReadOptions, read_table, require_columns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayStats:
    """What replaying the log did; counts only, safe to log."""

    edits_applied: int
    edits_unknown_record: int
    edits_unknown_field: int
    merges: int
    merges_unknown_record: int


def load_log(path: str | Path, *, options: ReadOptions = DETECT) -> pd.DataFrame:
    """Reads and validates a corrections log; absent optional columns are added empty."""
    log = read_table(path, options=options)
    return validate_log(log, source=str(path))


def validate_log(log: pd.DataFrame, *, source: str = "corrections log") -> pd.DataFrame:
    """Checks the log's columns and rows; returns a copy with every contract column present."""
    require_columns(log, s.LOG_REQUIRED_COLUMNS, source=source, what="required in a corrections log")
    log = log.copy()
    for column in s.LOG_COLUMNS:
        if column not in log.columns:
            log[column] = s.MISSING
    actions = log[s.LOG_ACTION].str.strip().str.lower()
    unknown = log.index[~actions.isin(s.ACTIONS)]
    if len(unknown):
        row = unknown[0]
        raise CorrectionsLogError(
            f"{source}: row {row + 1}: action {log.at[row, s.LOG_ACTION]!r} "
            f"is not one of {', '.join(s.ACTIONS)}"
        )
    log[s.LOG_ACTION] = actions
    for action, column in ((s.ACTION_EDIT, s.LOG_FIELD), (s.ACTION_MERGE, s.LOG_MERGED_INTO)):
        lacking = log.index[(actions == action) & (log[column] == s.MISSING)]
        if len(lacking):
            raise CorrectionsLogError(
                f"{source}: row {lacking[0] + 1}: `{action}` row has an empty {column!r}"
            )
    empty_id = log.index[log[s.LOG_RECORD_ID] == s.MISSING]
    if len(empty_id):
        raise CorrectionsLogError(f"{source}: row {empty_id[0] + 1}: empty record_id")
    if (log[s.LOG_CORRECTED_AT] != s.MISSING).any():
        stamps = pd.to_datetime(
            log[s.LOG_CORRECTED_AT].replace(s.MISSING, None), errors="coerce", format="ISO8601", utc=True
        )  # utc: a log may mix times with and without an offset (review rows carry one)
        bad = log.index[stamps.isna() & (log[s.LOG_CORRECTED_AT] != s.MISSING)]
        if len(bad):
            row = bad[0]
            raise CorrectionsLogError(
                f"{source}: row {row + 1}: corrected_at {log.at[row, s.LOG_CORRECTED_AT]!r} is not ISO 8601"
            )
    return log


def edits(log: pd.DataFrame) -> pd.DataFrame:
    """The `edit` rows in replay order (by `corrected_at` when given, else log order)."""
    rows = log[log[s.LOG_ACTION] == s.ACTION_EDIT]
    return _chronological(rows)


def merges(log: pd.DataFrame) -> pd.DataFrame:
    """The `merge` rows as (record_id, merged_into), without self-merges and repeats."""
    rows = log[(log[s.LOG_ACTION] == s.ACTION_MERGE) & (log[s.LOG_RECORD_ID] != log[s.LOG_MERGED_INTO])]
    return rows[[s.LOG_RECORD_ID, s.LOG_MERGED_INTO]].drop_duplicates().reset_index(drop=True)


def _chronological(rows: pd.DataFrame) -> pd.DataFrame:
    if (rows[s.LOG_CORRECTED_AT] != s.MISSING).all() and len(rows):
        stamps = pd.to_datetime(rows[s.LOG_CORRECTED_AT], format="ISO8601", utc=True)
        order = stamps.reset_index(drop=True).sort_values(kind="stable").index
        return rows.iloc[order]
    return rows


def replay_backwards(
    stored: pd.DataFrame, log: pd.DataFrame, *, id_column: str
) -> tuple[pd.DataFrame, ReplayStats]:
    """Returns the records as they were entered, by undoing the log's edits latest first.

    `stored` is not changed. Edits of unknown records or columns are counted and skipped: a log often
    reaches further back than the exported history.

    >>> stored = pd.DataFrame({"record_id": ["1"], "code": ["C-1"]}, dtype=object)
    >>> log = validate_log(pd.DataFrame({"record_id": ["1"], "action": ["edit"], "field": ["code"],
    ...                                  "old_value": [""], "new_value": ["C-1"]}, dtype=object))
    >>> replay_backwards(stored, log, id_column="record_id")[0]["code"].tolist()
    ['']
    """
    # Not a deep copy: the columns no edit touches stay shared with `stored` (copy-on-write keeps `stored`
    # unchanged), the edited ones are replaced whole below.
    entered = stored.copy(deep=False)
    position = pd.Series(range(len(stored)), index=stored[id_column].to_numpy())
    edit_rows = edits(log)
    known_record = edit_rows[s.LOG_RECORD_ID].isin(position.index)
    known_field = edit_rows[s.LOG_FIELD].isin(stored.columns) & (edit_rows[s.LOG_FIELD] != id_column)
    usable = edit_rows[known_record & known_field]
    columns = {name: entered[name].to_numpy(copy=True) for name in usable[s.LOG_FIELD].unique()}
    # Latest first, so a cell edited twice ends at the value it was first entered with.
    for record_id, field, old_value in zip(
        usable[s.LOG_RECORD_ID].to_numpy()[::-1],
        usable[s.LOG_FIELD].to_numpy()[::-1],
        usable[s.LOG_OLD_VALUE].to_numpy()[::-1],
        strict=True,
    ):
        columns[field][position[record_id]] = old_value
    for name, values in columns.items():
        entered[name] = values
    merge_rows = merges(log)
    stats = ReplayStats(
        edits_applied=len(usable),
        edits_unknown_record=int((~known_record).sum()),
        edits_unknown_field=int((known_record & ~known_field).sum()),
        merges=len(merge_rows),
        merges_unknown_record=int(
            (
                ~merge_rows[s.LOG_RECORD_ID].isin(position.index)
                | ~merge_rows[s.LOG_MERGED_INTO].isin(position.index)
            ).sum()
        ),
    )
    if stats.edits_unknown_record or stats.edits_unknown_field:
        logger.warning(
            "skipped %d edits of records not in the history and %d of unknown columns",
            stats.edits_unknown_record,
            stats.edits_unknown_field,
        )
    return entered, stats


def cell_labels(log: pd.DataFrame, ids: pd.Series) -> pd.DataFrame:
    """One row per (record, field) staff corrected, with the first entered and the last corrected value.

    Cells edited back to what was entered (a reverted edit) are not errors and are dropped.
    """
    rows = edits(log)
    rows = rows[rows[s.LOG_RECORD_ID].isin(set(ids))]
    grouped = rows.groupby([s.LOG_RECORD_ID, s.LOG_FIELD], sort=False)
    labels = pd.DataFrame(
        {
            s.LOG_OLD_VALUE: grouped[s.LOG_OLD_VALUE].first(),
            s.LOG_NEW_VALUE: grouped[s.LOG_NEW_VALUE].last(),
        }
    ).reset_index()
    return labels[labels[s.LOG_OLD_VALUE] != labels[s.LOG_NEW_VALUE]].reset_index(drop=True)


def cluster_roots(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find over linked pairs: maps every linked id to its cluster's root.

    The second id of a pair is the one kept, so where the pairs are merges (`A` merged into `B`) the root
    is the record finally kept.
    """
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for child, kept in pairs:
        a, b = find(child), find(kept)
        if a != b:
            parent[a] = b
    return {node: find(node) for node in list(parent)}


def duplicate_clusters(merge_rows: pd.DataFrame) -> dict[str, str]:
    """Maps every record in a merge chain to its cluster's root (the record finally kept).

    `A merged_into B` and `B merged_into C` put A, B and C in one cluster rooted at C.
    """
    return cluster_roots(zip(merge_rows[s.LOG_RECORD_ID], merge_rows[s.LOG_MERGED_INTO], strict=True))


def duplicate_pairs(merge_rows: pd.DataFrame) -> set[frozenset[str]]:
    """Every pair of records in the same merge cluster (so chains imply pairs)."""
    members: dict[str, list[str]] = {}
    for node, root in duplicate_clusters(merge_rows).items():
        members.setdefault(root, []).append(node)
    pairs: set[frozenset[str]] = set()
    for group in members.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                pairs.add(frozenset((a, b)))
    return pairs


def confirmed_cells(log: pd.DataFrame) -> pd.DataFrame:
    """The cells staff reviewed and found right: one row per (record_id, field) with the confirmed value.

    These are `confirm` rows that name a field (a rejected error flag); the value is `new_value` (or
    `old_value` when only that is given). A cell edited later than it was confirmed is not confirmed.
    Training uses them as known negatives, so the same false alarm does not come back.
    """
    columns = [s.LOG_RECORD_ID, s.LOG_FIELD, "value"]
    rows = _chronological(log[log[s.LOG_FIELD] != s.MISSING])
    rows = rows[rows[s.LOG_ACTION].isin((s.ACTION_CONFIRM, s.ACTION_EDIT))]
    if not len(rows):
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    last = rows.groupby([s.LOG_RECORD_ID, s.LOG_FIELD], sort=False).tail(1)
    last = last[last[s.LOG_ACTION] == s.ACTION_CONFIRM]
    value = last[s.LOG_NEW_VALUE].where(last[s.LOG_NEW_VALUE] != s.MISSING, last[s.LOG_OLD_VALUE])
    return pd.DataFrame(
        {s.LOG_RECORD_ID: last[s.LOG_RECORD_ID], s.LOG_FIELD: last[s.LOG_FIELD], "value": value},
        columns=columns,
    ).reset_index(drop=True)


def confirmed_records(log: pd.DataFrame) -> set[str]:
    """Records staff reviewed as a whole and found right: `confirm` rows naming neither a field nor a
    matched record (a rejected anomaly flag). A record edited or merged later is left out."""
    rows = log[
        (log[s.LOG_ACTION] == s.ACTION_CONFIRM)
        & (log[s.LOG_FIELD] == s.MISSING)
        & (log[s.LOG_MERGED_INTO] == s.MISSING)
    ]
    corrected = log.loc[log[s.LOG_ACTION] != s.ACTION_CONFIRM, s.LOG_RECORD_ID]
    return set(rows[s.LOG_RECORD_ID]) - set(corrected)


def rejected_pairs(log: pd.DataFrame) -> set[frozenset[str]]:
    """Pairs of records staff reviewed and found *not* to be duplicates: `confirm` rows with a
    `merged_into` (a rejected duplicate flag names the record it was matched with there).

    A pair that was also merged (before or after) is a duplicate after all and is left out.
    """
    rows = log[(log[s.LOG_ACTION] == s.ACTION_CONFIRM) & (log[s.LOG_MERGED_INTO] != s.MISSING)]
    pairs = {
        frozenset((a, b))
        for a, b in zip(rows[s.LOG_RECORD_ID], rows[s.LOG_MERGED_INTO], strict=True)
        if a != b
    }
    return pairs - duplicate_pairs(merges(log))


def review_rows(log: pd.DataFrame) -> pd.DataFrame:
    """The log rows `feedback` wrote from review decisions (`source` = `review`), with `seconds` as float
    (0 where empty). Empty when the log has no `source` column."""
    if s.LOG_SOURCE not in log.columns:
        return log.iloc[0:0].assign(**{s.LOG_SECONDS: pd.Series(dtype=float)})
    rows = log[log[s.LOG_SOURCE].astype(str).str.strip().str.lower() == s.SOURCE_REVIEW]
    raw = rows[s.LOG_SECONDS] if s.LOG_SECONDS in rows.columns else pd.Series("", index=rows.index)
    seconds = pd.to_numeric(raw.replace(s.MISSING, None), errors="coerce").fillna(0.0).clip(lower=0)
    return rows.assign(**{s.LOG_SECONDS: seconds.astype(float)})

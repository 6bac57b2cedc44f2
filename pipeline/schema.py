"""The contract's vocabulary: column names, actions, flag kinds and field types.

Every string that appears in the contract (`docs/CONTRACT.md`) lives here, so a rename is one edit
and no module spells a column by hand.
"""

from __future__ import annotations

from typing import Final, Literal

# Corrections log (contract section 1).
LOG_RECORD_ID: Final = "record_id"
LOG_ACTION: Final = "action"
LOG_FIELD: Final = "field"
LOG_OLD_VALUE: Final = "old_value"
LOG_NEW_VALUE: Final = "new_value"
LOG_MERGED_INTO: Final = "merged_into"
LOG_CORRECTED_AT: Final = "corrected_at"
LOG_COLUMNS: Final = (
    LOG_RECORD_ID,
    LOG_ACTION,
    LOG_FIELD,
    LOG_OLD_VALUE,
    LOG_NEW_VALUE,
    LOG_MERGED_INTO,
    LOG_CORRECTED_AT,
)
LOG_REQUIRED_COLUMNS: Final = (LOG_RECORD_ID, LOG_ACTION)

ACTION_EDIT: Final = "edit"
ACTION_MERGE: Final = "merge"
ACTION_CONFIRM: Final = "confirm"
ACTIONS: Final = (ACTION_EDIT, ACTION_MERGE, ACTION_CONFIRM)

# Output of `score` (contract section 3).
DUPLICATE_OF: Final = "duplicate_of"
DUPLICATE_SCORE: Final = "duplicate_score"
CLUSTER_ID: Final = "cluster_id"
ERROR_FIELDS: Final = "error_fields"
ERROR_SCORE: Final = "error_score"
ANOMALY_SCORE: Final = "anomaly_score"
NEEDS_REVIEW: Final = "needs_review"
RECORD_COLUMNS: Final = (
    DUPLICATE_OF,
    DUPLICATE_SCORE,
    CLUSTER_ID,
    ERROR_FIELDS,
    ERROR_SCORE,
    ANOMALY_SCORE,
    NEEDS_REVIEW,
)
ERROR_FIELD_SEPARATOR: Final = ";"
# Not outputs: columns of `linkage.Matcher.match`'s links holding the matcher's index positions of the
# record `duplicate_of` names (-1: none) and of the other reference records the row duplicates beside it (a
# tuple), which the error model's matched values take into account. The batch job reads their values by
# position (`Matcher.records_at`), so its evicting matcher keeps no id -> position table.
DUPLICATE_POSITION: Final = "duplicate_position"
REFERENCE_DUPLICATE_POSITIONS: Final = "reference_duplicate_positions"

FLAG_RECORD_ID: Final = "record_id"
FLAG_KIND: Final = "kind"
FLAG_FIELD: Final = "field"
FLAG_VALUE: Final = "value"
FLAG_SUGGESTION: Final = "suggestion"
FLAG_MATCH_ID: Final = "match_id"
FLAG_SCORE: Final = "score"
FLAG_REASON: Final = "reason"
# Added to the contract's columns: "true" when the proposed correction is to leave the cell empty, which an
# empty `suggestion` alone cannot tell from "no confident suggestion".
FLAG_SUGGEST_EMPTY: Final = "suggest_empty"
FLAG_COLUMNS: Final = (
    FLAG_RECORD_ID,
    FLAG_KIND,
    FLAG_FIELD,
    FLAG_VALUE,
    FLAG_SUGGESTION,
    FLAG_MATCH_ID,
    FLAG_SCORE,
    FLAG_REASON,
    FLAG_SUGGEST_EMPTY,
)

KIND_DUPLICATE: Final = "duplicate"
KIND_ERROR: Final = "error"
KIND_ANOMALY: Final = "anomaly"
KINDS: Final = (KIND_DUPLICATE, KIND_ERROR, KIND_ANOMALY)

RECORDS_FILE: Final = "records.csv"
FLAGS_FILE: Final = "flags.csv"
SUMMARY_FILE: Final = "summary.json"
REPORT_FILE: Final = "report.html"

# Review decisions (contract section 4), written by `review`, read by `feedback`.
DECISIONS_FILE: Final = "decisions.csv"
DECISION: Final = "decision"
DECISION_NEW_VALUE: Final = "new_value"
DECISION_DECIDED_AT: Final = "decided_at"
DECISION_SECONDS: Final = "seconds"
DECISION_COLUMNS: Final = (
    FLAG_RECORD_ID,
    FLAG_KIND,
    FLAG_FIELD,
    FLAG_VALUE,
    FLAG_SUGGESTION,
    FLAG_MATCH_ID,
    DECISION,
    DECISION_NEW_VALUE,
    DECISION_DECIDED_AT,
    DECISION_SECONDS,
)
# The columns that name one flag: a later decision with the same key replaces an earlier one.
FLAG_KEY: Final = (FLAG_RECORD_ID, FLAG_KIND, FLAG_FIELD, FLAG_MATCH_ID)
DECISION_ACCEPT: Final = "accept"
DECISION_EDIT: Final = "edit"
DECISION_REJECT: Final = "reject"
DECISIONS: Final = (DECISION_ACCEPT, DECISION_EDIT, DECISION_REJECT)
# Columns `feedback` adds to a corrections log (the contract allows added columns): which rows came from
# the review, and the seconds the clerk spent on each.
LOG_SOURCE: Final = "source"
LOG_SECONDS: Final = "seconds"
SOURCE_REVIEW: Final = "review"

FieldTypeName = Literal["text", "code", "category", "number", "date"]
FIELD_TYPES: Final = ("text", "code", "category", "number", "date")

# Missing values are empty strings everywhere inside the package: every cell is read as text.
MISSING: Final = ""

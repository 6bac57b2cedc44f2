"""How training evaluates itself: the split by labelled events, and the fallback to grouped folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Config
from pipeline.corrections import validate_log
from pipeline.evaluate import MIN_HELDOUT_CELLS, combine_evaluations, evaluate_scored, plan_evaluation
from pipeline.exceptions import TrainingDataError


def _config(time_column: str | None = None, **extra) -> Config:
    return Config.model_validate(
        {
            "name": "t",
            "time_column": time_column,
            "fields": {"name": {"type": "text"}, "code": {"type": "code"}},
            **extra,
        }
    )


def _records(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "record_id": [f"R{i:04d}" for i in range(n)],
            "name": [f"name {i % 37}" for i in range(n)],
            "code": [f"C-{i % 37:03d}" for i in range(n)],
        },
        dtype=object,
    )


def _edits(ids: list[str]) -> pd.DataFrame:
    return validate_log(
        pd.DataFrame(
            {"record_id": ids, "action": "edit", "field": "code", "old_value": "", "new_value": "C-1"},
            dtype=object,
        )
    )


def test_split_is_sized_by_labelled_events_not_rows() -> None:
    records = _records(1000)
    # corrections only in the latest 300 records: one edit each
    log = _edits([f"R{i:04d}" for i in range(700, 1000)])
    plan = plan_evaluation(records, log, _config())
    assert plan.scheme == "holdout"
    # the test period holds the latest 20% of the edits, validation the 15% before: 60 and 45 records
    assert plan.counts["cells_test"] == 60
    assert plan.counts["cells_validation"] == 45
    assert plan.counts["cells_train"] == 195
    # the unlabelled past is training data, outside the period the log covers
    assert len(plan.split.train) == 700 + 195
    assert plan.covered.sum() == 300 and not plan.covered[:700].any()
    assert sorted(plan.split.test) == list(range(940, 1000))


def test_split_follows_the_time_column_not_file_order() -> None:
    records = _records(600)
    # entry times run backwards through the file: the first row is the latest entry
    records["entered_at"] = pd.date_range("2024-01-01", periods=600, freq="h")[::-1].strftime(
        "%Y-%m-%dT%H:%M"
    )
    log = _edits([f"R{i:04d}" for i in range(600)])
    plan = plan_evaluation(records, log, _config("entered_at"))
    assert plan.scheme == "holdout"
    assert set(plan.split.test) == set(range(120))  # the latest entered are the first rows


def test_few_labels_fall_back_to_grouped_cross_validation() -> None:
    records = _records(400)
    ids = [f"R{i:04d}" for i in range(0, 400, 10)]  # 40 edited cells: validation would hold 6
    merge_rows = pd.DataFrame(
        {
            "record_id": [f"R{i:04d}" for i in range(1, 41, 4)],
            "action": "merge",
            "merged_into": [f"R{i:04d}" for i in range(2, 42, 4)],
        },
        dtype=object,
    )
    log = validate_log(pd.concat([_edits(ids), merge_rows], ignore_index=True).fillna(""))
    plan = plan_evaluation(records, log, _config())
    assert plan.scheme == "cross-validation"
    assert plan.counts == {"cells": 40, "merges": 10, "folds": 5, "covered_records": 391}
    folds = plan.folds
    assert folds is not None and len(folds) == 400
    # each merge cluster stays in one fold
    for i in range(1, 41, 4):
        assert folds[i] == folds[i + 1]
    # labelled groups are spread evenly: 10 clusters + 40 edited records over 5 folds
    labelled = sorted({*range(0, 400, 10), *range(1, 42, 4), *range(2, 42, 4)})
    counts = np.bincount(folds[labelled], minlength=5)
    assert counts.max() - counts.min() <= 4
    assert len(plan.split.train) == 400


def test_bar_for_a_held_out_period() -> None:
    records = _records(2000)
    enough = int(np.ceil(MIN_HELDOUT_CELLS / 0.15)) + 5
    plan = plan_evaluation(records, _edits([f"R{i:04d}" for i in range(enough)]), _config())
    assert plan.scheme == "holdout"
    plan = plan_evaluation(records, _edits([f"R{i:04d}" for i in range(enough - 40)]), _config())
    assert plan.scheme == "cross-validation"


def test_a_log_without_edits_or_merges_of_this_history_is_refused() -> None:
    records = _records(100)
    log = validate_log(pd.DataFrame({"record_id": ["R0001"], "action": ["confirm"]}, dtype=object))
    with pytest.raises(TrainingDataError, match="nothing to learn"):
        plan_evaluation(records, log, _config())
    # edits of unknown records or unconfigured fields are no labels either
    unknown = _edits(["X1", "X2"])
    with pytest.raises(TrainingDataError):
        plan_evaluation(records, unknown, _config())


def test_combined_folds_are_micro_averaged() -> None:
    config = _config()
    parts = []
    for flagged_right in (True, False):
        batch = _records(2)
        log = _edits(["R0000"])
        flags = pd.DataFrame(
            {
                "record_id": ["R0000" if flagged_right else "R0001"],
                "kind": ["error"],
                "field": ["code"],
                "value": [""],
                "suggestion": ["C-1"],
                "match_id": [""],
                "score": [0.9],
                "reason": ["x"],
            }
        )
        columns = pd.DataFrame({"duplicate_of": ["", ""], "duplicate_score": ["0.0", "0.0"]})
        cells = pd.DataFrame({"name": [0.1, 0.1], "code": [0.9 if flagged_right else 0.1, 0.2]})
        parts.append(
            evaluate_scored(
                config=config,
                batch=batch,
                reference_ids=pd.Series([], dtype=object),
                log=log,
                columns=columns,
                flags=flags,
                cell_scores=cells,
            )
        )
    combined = combine_evaluations(parts, config)
    m = combined.metrics
    assert (m["test_error_tp"], m["test_error_fp"], m["test_error_fn"]) == (1, 1, 1)
    assert m["test_error_precision"] == pytest.approx(0.5)
    assert m["test_error_f1"] == pytest.approx(0.5)
    assert m["test_correction_tp"] == 1
    assert len(combined.error_curve[0]) == 8
    assert combined.per_field.set_index("field").loc["code", "tp"] == 1

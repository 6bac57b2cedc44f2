"""Every shape of log trains and scores: one train-and-score test per shape (issue: any department's log).

Each test builds its log from one small generated world, runs `train` as the CLI does (without the
tracking store) and scores the world's batch with the result, checking the contract's outputs.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import schema as s
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.score import run_batch
from pipeline.train import train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from pipeline.generate import generate

    return generate(tmp_path_factory.mktemp("world"), customers=50, history=600, batch=80, seed=21)


def _log(world) -> pd.DataFrame:
    return pd.read_csv(world.corrections, dtype=str, keep_default_na=False)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _train_and_score(world, tmp_path: Path, log: pd.DataFrame, *, config: Path | None = None):
    config_path = config or world.config
    cfg = load_config(config_path)
    log_path = _write(log, tmp_path / "log.csv")
    result = train(cfg, world.records, log_path)
    summary = run_batch(result.bundle, world.batch, tmp_path / "out", reference_path=world.records)
    with open(tmp_path / "out" / s.RECORDS_FILE, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(world.batch, newline="", encoding="utf-8") as fh:
        batch_ids = [row[cfg.id_column] for row in csv.DictReader(fh)]
    assert [row[cfg.id_column] for row in rows] == batch_ids  # every input row once, in order
    flags = pd.read_csv(tmp_path / "out" / s.FLAGS_FILE, dtype=str, keep_default_na=False)
    return result, summary, flags


def _false_error_flags(world, flags: pd.DataFrame) -> int:
    """Error flags on cells the batch's ground truth does not correct."""
    truth = pd.read_csv(world.batch_truth, dtype=str, keep_default_na=False)
    wrong = set(zip(truth["record_id"], truth["field"], strict=True))
    errors = flags[flags["kind"] == "error"]
    return sum((r, f) not in wrong for r, f in zip(errors["record_id"], errors["field"], strict=True))


def test_edits_only(world, tmp_path: Path) -> None:
    log = _log(world)
    result, _, flags = _train_and_score(world, tmp_path, log[log["action"] == "edit"])
    assert result.plan.counts.get("merges", result.plan.counts.get("merges_train")) == 0
    assert not (flags["kind"] == "duplicate").any()  # nothing learnt about duplicates: none flagged
    assert (flags["kind"] == "error").any()
    assert result.bundle.metrics["test_error_tp"] > 0


def test_merges_only(world, tmp_path: Path) -> None:
    log = _log(world)
    result, _, flags = _train_and_score(world, tmp_path, log[log["action"] == "merge"])
    assert result.bundle.metrics["test_duplicate_tp"] > 0
    assert (flags["kind"] == "duplicate").any()
    # the log taught no errors: the error model flags only near-certain ones
    assert _false_error_flags(world, flags) <= 1


def test_confirms_mixed_in_and_any_order(world, tmp_path: Path) -> None:
    log = _log(world)
    confirms = pd.DataFrame(
        {
            "record_id": log["record_id"].iloc[:20].to_numpy(),
            "action": "confirm",
            "field": "",
            "old_value": "",
            "new_value": "",
            "merged_into": "",
            "corrected_at": log["corrected_at"].iloc[:20].to_numpy(),
        }
    )
    shuffled = pd.concat([log, confirms], ignore_index=True).sample(frac=1.0, random_state=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    in_order, _, flags_in_order = _train_and_score(world, tmp_path / "a", log)
    mixed, _, flags_mixed = _train_and_score(world, tmp_path / "b", shuffled)
    assert mixed.plan.scheme == in_order.plan.scheme
    assert mixed.plan.counts == in_order.plan.counts  # confirms are no labelled events; order is irrelevant
    assert len(flags_mixed) == pytest.approx(len(flags_in_order), abs=3)


def test_no_time_column(world, tmp_path: Path) -> None:
    raw = yaml.safe_load(Path(world.config).read_text(encoding="utf-8"))
    raw.pop("time_column")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result, _, flags = _train_and_score(world, tmp_path, _log(world), config=config)
    assert (
        len(result.plan.split.test) + len(result.plan.split.validation) + len(result.plan.split.train) == 600
    )
    assert (flags["kind"] == "error").any()


def test_labels_only_in_the_recent_past(world, tmp_path: Path) -> None:
    records = pd.read_csv(world.records, dtype=str, keep_default_na=False)
    recent = set(records.sort_values("entered_at")["record_id"].iloc[-200:])
    log = _log(world)
    log = log[log["record_id"].isin(recent) & (log["merged_into"].isin(recent) | (log["action"] != "merge"))]
    result, _, flags = _train_and_score(world, tmp_path, log)
    # the models learn from the labelled recent past and still score the batch
    assert result.bundle.metrics["test_error_tp"] + result.bundle.metrics["test_duplicate_tp"] > 0
    assert len(flags) > 0


def test_one_field_never_corrected(world, tmp_path: Path) -> None:
    log = _log(world)
    edited = log.loc[log["action"] == "edit", "field"].value_counts()
    field = edited.index[0]
    result, _, flags = _train_and_score(world, tmp_path, log[log["field"] != field])
    assert result.bundle.metrics[f"test_error_recall_{field}"] == 0.0  # no truth there: nothing to find
    # a field the log never corrected is flagged only when the evidence is near certain
    assert _false_error_flags(world, flags[flags["field"] == field]) <= 1


def test_a_tiny_log_is_cross_validated_and_the_model_learns_from_all_of_it(world, tmp_path: Path) -> None:
    log = _log(world)
    tiny = pd.concat([log[log["action"] == "edit"].head(12), log[log["action"] == "merge"].head(4)])
    result, summary, flags = _train_and_score(world, tmp_path, tiny)
    assert result.plan.scheme == "cross-validation"
    assert result.plan.counts["cells"] == 12 and result.plan.counts["merges"] == 4
    assert result.bundle.metrics["evaluation_folds"] >= 2
    assert summary["rows"] == 80 if "rows" in summary else True
    # the registered model was fitted on the whole history: every record is in its training data
    assert result.sizes["records"] == 600
    assert np.isfinite(result.bundle.metrics["test_error_f1"])


def test_a_log_with_neither_edit_nor_merge_exits_2(world, tmp_path: Path, capsys) -> None:
    log = _log(world).head(5).assign(action="confirm")
    path = _write(log, tmp_path / "confirms.csv")
    code = main(
        ["train", "--config", str(world.config), "--records", str(world.records), "--corrections", str(path)]
        + ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "neither an edit nor a merge" in err and str(path) in err


def test_train_shows_each_stage_on_stderr_and_quiet_hides_them(world, tmp_path: Path) -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "pipeline", "train", "--config", str(world.config)]
    command += ["--records", str(world.records), "--corrections", str(world.corrections)]
    command += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    shown = subprocess.run(command, capture_output=True, text=True, check=True)
    stages = [line.split(" train: ", 1)[1] for line in shown.stderr.splitlines() if " train: " in line]
    # This world's log is small: evaluated by cross-validation, the registered model fitted first.
    folds = sum(line.startswith("fold: error model") and line.endswith("...") for line in stages)
    assert folds >= 2
    for stage, times in (
        ("reading the history", 1),
        ("fit: error model", 1),
        ("fit: duplicate model", 1),
        ("fit: anomaly model", 1),
        ("cross-validation", 1),
        ("fold: error model", folds),
        ("fold: duplicate model", folds),
        ("logging the run and registering the model in MLflow", 1),
    ):
        started = [line for line in stages if line.startswith(stage) and line.endswith("...")]
        ended = [line for line in stages if line.startswith(stage) and " done in " in line]
        assert len(started) == times and len(ended) == times, (stage, stages)
    assert "cross-fitting fold 5 of 5 done in" in shown.stderr
    quiet = subprocess.run([*command, "-q"], capture_output=True, text=True, check=True)
    assert " train: " not in quiet.stderr
    assert "model version" in quiet.stdout


def test_the_final_fit_in_a_second_process_registers_the_same_model(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import pipeline.evaluate as evaluate
    import pipeline.train as training

    cfg = load_config(world.config)
    # This small world's held-out periods hold a few labels each: evaluated on them all the same (the
    # second process only takes the plan's entry order and reviewed records, which these do not change).
    monkeypatch.setattr(evaluate, "MIN_HELDOUT_CELLS", 1)
    monkeypatch.setattr(evaluate, "MIN_HELDOUT_MERGES", 1)
    monkeypatch.setattr(training, "PARALLEL_MAX_RECORDS", 0)  # one process
    alone = train(cfg, world.records, world.corrections)
    assert alone.plan.scheme == "holdout"
    monkeypatch.setattr(training, "PARALLEL_MIN_RECORDS", 0)
    monkeypatch.setattr(training, "PARALLEL_MAX_RECORDS", 10**9)
    with caplog.at_level(logging.INFO):
        beside = train(cfg, world.records, world.corrections)
    # the second process's stages are shown and timed here
    assert "in a second process" in caplog.text
    assert any(
        r.message.startswith("train: fit: error model") and r.process != os.getpid() for r in caplog.records
    )
    assert {"fit_errors", "fit_duplicates", "fit_anomalies", "holdout_errors"} <= set(beside.durations)
    # the same model, threshold and figures as fitted in one process
    assert beside.bundle.duplicates.threshold_ == alone.bundle.duplicates.threshold_
    assert beside.bundle.metrics == alone.bundle.metrics
    assert beside.params == alone.params
    # it scores the batch byte for byte the same (the saved files differ in pickling details and in the
    # duplicate model's training seconds)
    outputs = []
    for name, result in (("alone", alone), ("beside", beside)):
        run_batch(result.bundle, world.batch, tmp_path / name, reference_path=world.records)
        outputs.append([(tmp_path / name / f).read_bytes() for f in (s.RECORDS_FILE, s.FLAGS_FILE)])
    assert outputs[0] == outputs[1]
    assert b",error," in outputs[0][1]


def test_the_held_out_period_scored_in_chunks_gives_the_figures_of_one_chunk(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.evaluate as evaluate
    import pipeline.score as score
    import pipeline.train as training

    monkeypatch.setattr(evaluate, "MIN_HELDOUT_CELLS", 1)
    monkeypatch.setattr(evaluate, "MIN_HELDOUT_MERGES", 1)
    monkeypatch.setattr(training, "PARALLEL_MAX_RECORDS", 0)
    result = train(load_config(world.config), world.records, world.corrections)
    assert result.plan.scheme == "holdout"
    holdout = result.bundle.holdout
    # the test period as entered against the records before it, as stored (built after the final fit)
    assert not set(holdout.batch["record_id"]) & set(holdout.reference["record_id"])
    assert len(holdout.batch) > 20
    whole = evaluate.evaluate_bundle(result.bundle, holdout).metrics
    assert whole["test_rows"] == len(holdout.batch)
    assert whole["test_duplicate_tp"] + whole["test_error_tp"] > 0
    # chunks of 7 rows: running numbers and links continue across every cut, flags gathered from all
    monkeypatch.setattr(score, "SCORE_CHUNK_ROWS", 7)
    assert evaluate.evaluate_bundle(result.bundle, holdout).metrics == whole


def test_consecutive_rows_are_taken_as_a_slice_and_any_others_as_a_copy() -> None:
    """`_rows` is `iloc[positions]` either way; consecutive positions share the frame's columns."""
    from pipeline.train import _rows

    frame = pd.DataFrame({"a": np.arange(10), "b": [f"v{i}" for i in range(10)]}, dtype=object)
    for positions in (np.arange(3, 9), np.array([1, 2, 4]), np.array([4, 3]), np.arange(0)):
        pd.testing.assert_frame_equal(_rows(frame, positions), frame.iloc[positions])
    block = frame._mgr.blocks[0].values
    assert np.shares_memory(_rows(frame, np.arange(3, 9))._mgr.blocks[0].values, block)
    assert not np.shares_memory(_rows(frame, np.array([1, 2, 4]))._mgr.blocks[0].values, block)


def test_merged_into_values_hold_the_stored_values_of_each_records_original(world) -> None:
    """Same rows as the records given: a merged record's original's stored values, `''` for a record merged
    into none or into a record the history does not hold."""
    from pipeline.detectors import text_column
    from pipeline.train import _load, _merged_into_values

    cfg = load_config(world.config)
    history, _, _ = _load(cfg, Path(world.records), Path(world.corrections))
    log = history.log
    merged = log[log[s.LOG_ACTION] == s.ACTION_MERGE]
    target = dict(zip(merged[s.LOG_RECORD_ID], merged[s.LOG_MERGED_INTO], strict=True))
    target[next(iter(target))] = "no such record"
    history.log = pd.concat(
        [
            log[log[s.LOG_ACTION] != s.ACTION_MERGE],
            merged.assign(**{s.LOG_MERGED_INTO: list(target.values())}),
        ]
    )
    records = history.entered.iloc[::-1]
    values = _merged_into_values(history, records)
    assert len(values) == len(records) and list(values.columns) == list(cfg.fields)
    stored = history.stored.set_index(cfg.id_column)
    ids = records[cfg.id_column].tolist()
    for name in ("customer_name", "city"):
        got = text_column(values, name).tolist()
        want = [stored.at[target[i], name] if target.get(i) in stored.index else s.MISSING for i in ids]
        assert got == want
    assert sum(i in target for i in ids) > 5 and (text_column(values, "city") != s.MISSING).sum() > 5

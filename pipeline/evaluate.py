"""Held-out evaluation: the time split, the ground truth of a held-out period, and the figures.

Quality is measured the way the product is used: the latest part of the history is scored as if it were a
new batch (as entered, against the earlier records as stored), and its flags are compared with what staff
corrected. Staff did not find every error, so precision on history is a lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline import schema as s
from pipeline.config import Config
from pipeline.exceptions import SchemaError
from pipeline.metrics import average_precision, link_metrics, prf

if TYPE_CHECKING:  # the bundle imports the models, which import this module
    from pipeline.bundle import Holdout, ModelBundle


@dataclass(frozen=True)
class Split:
    """Row positions (into the history) of the three periods, oldest first."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def entry_order(records: pd.DataFrame, config: Config, *, source: str = "records") -> np.ndarray:
    """Positions of the records in entry order: by the time column when configured, else file order."""
    if not config.time_column:
        return np.arange(len(records))
    raw = records[config.time_column]
    stamps = pd.to_datetime(raw.replace(s.MISSING, None), errors="coerce", format="ISO8601", utc=True)
    bad = np.flatnonzero(stamps.isna().to_numpy())
    if len(bad):
        row = bad[0]
        raise SchemaError(
            f"{source}: row {row + 1}: {config.time_column} {raw.iloc[row]!r} is not an ISO 8601 time"
        )
    return np.argsort(stamps.to_numpy(), kind="stable")


def time_split(records: pd.DataFrame, config: Config, *, source: str = "records") -> Split:
    """Splits the history by entry time: train (oldest), validation (thresholds), test (latest)."""
    order = entry_order(records, config, source=source)
    n = len(order)
    n_test = max(1, math.floor(n * config.split.test))
    n_validation = max(1, math.floor(n * config.split.validation))
    if n - n_test - n_validation < 10:
        from pipeline.exceptions import TrainingDataError

        raise TrainingDataError(f"{source}: {n} records are too few to train and hold out; need at least 40")
    cut_val, cut_test = n - n_test - n_validation, n - n_test
    return Split(train=order[:cut_val], validation=order[cut_val:cut_test], test=order[cut_test:])


def link_truth(batch_ids: pd.Series, reference_ids: pd.Series, clusters: dict[str, str]) -> dict[str, str]:
    """For each batch record that re-registers an earlier record, its true cluster root.

    'Earlier' means in the reference or before it in the batch: the first registration of an entity in a
    batch is the original, not a duplicate.
    """
    seen_roots = {clusters[i] for i in reference_ids if i in clusters}
    truth: dict[str, str] = {}
    for record_id in batch_ids:
        root = clusters.get(record_id)
        if root is None:
            continue
        if root in seen_roots:
            truth[record_id] = root
        seen_roots.add(root)
    return truth


@dataclass
class Evaluation:
    """Figures of one model on one held-out period, plus what the plots need."""

    metrics: dict[str, float]
    per_field: pd.DataFrame
    duplicate_curve: tuple[np.ndarray, np.ndarray]  # (scores, labels) per batch record
    error_curve: tuple[np.ndarray, np.ndarray]  # (scores, labels) per checked cell


def evaluate_scored(
    *,
    config: Config,
    batch: pd.DataFrame,
    reference_ids: pd.Series,
    log: pd.DataFrame,
    columns: pd.DataFrame,
    flags: pd.DataFrame,
    cell_scores: pd.DataFrame,
    prefix: str = "test",
) -> Evaluation:
    """Compares a scored held-out batch with what staff corrected on it.

    Duplicates count per flagged record: right when `duplicate_of` is in the record's true merge cluster.
    Errors count per cell; a correction is right when the suggestion equals the value staff put in.
    """
    from pipeline.corrections import cell_labels, duplicate_clusters, merges

    ids = batch[config.id_column]
    clusters = duplicate_clusters(merges(log))
    truth = link_truth(ids, reference_ids, clusters)
    predicted = pd.DataFrame({s.DUPLICATE_OF: columns[s.DUPLICATE_OF].to_numpy()}, index=ids.to_numpy())
    dup = link_metrics(predicted, truth, clusters)
    dup_scores = columns[s.DUPLICATE_SCORE].to_numpy(dtype=float)
    dup_labels = ids.isin(truth.keys()).to_numpy().astype(int)

    labels = cell_labels(log, ids)
    labels = labels[labels[s.LOG_FIELD].isin(config.check_fields)]
    true_cells = {
        (r, f): new
        for r, f, new in zip(
            labels[s.LOG_RECORD_ID], labels[s.LOG_FIELD], labels[s.LOG_NEW_VALUE], strict=True
        )
    }
    error_flags = flags[flags[s.FLAG_KIND] == s.KIND_ERROR]
    flagged = list(zip(error_flags[s.FLAG_RECORD_ID], error_flags[s.FLAG_FIELD], strict=True))
    hits = np.array([cell in true_cells for cell in flagged], dtype=bool)
    err = prf(int(hits.sum()), int((~hits).sum()), len(true_cells) - int(hits.sum()))
    suggested = error_flags[s.FLAG_SUGGESTION].to_numpy()
    made = suggested != s.MISSING
    right = (
        np.array(
            [true_cells.get(cell) == value for cell, value in zip(flagged, suggested, strict=True)],
            dtype=bool,
        )
        & made
    )
    corr = prf(int(right.sum()), int((made & ~right).sum()), len(true_cells) - int(right.sum()))

    rows = []
    for name in config.check_fields:
        in_field = error_flags[s.FLAG_FIELD].to_numpy() == name
        tp = int(hits[in_field].sum())
        n_true = int((labels[s.LOG_FIELD] == name).sum())
        rows.append({"field": name, **prf(tp, int(in_field.sum()) - tp, n_true - tp)})
    per_field = pd.DataFrame(rows)

    # Per-cell scores against per-cell truth, for the precision-recall curve and average precision.
    position = {record_id: i for i, record_id in enumerate(ids)}
    truth_matrix = np.zeros(cell_scores.shape, dtype=int)
    field_position = {name: j for j, name in enumerate(cell_scores.columns)}
    for record_id, field in true_cells:
        if record_id in position and field in field_position:
            truth_matrix[position[record_id], field_position[field]] = 1
    err_scores, err_labels = cell_scores.to_numpy(dtype=float).ravel(), truth_matrix.ravel()

    anomaly_flags = flags[flags[s.FLAG_KIND] == s.KIND_ANOMALY]
    touched = set(labels[s.LOG_RECORD_ID]) | set(truth)
    anomaly_hits = int(anomaly_flags[s.FLAG_RECORD_ID].isin(touched).sum())
    anomaly_precision = anomaly_hits / len(anomaly_flags) if len(anomaly_flags) else 0.0

    tp_all = dup["tp"] + err["tp"] + anomaly_hits
    fp_all = dup["fp"] + err["fp"] + len(anomaly_flags) - anomaly_hits
    minutes = tp_all * config.minutes_per_correction - fp_all * config.minutes_per_false_alarm

    metrics: dict[str, float] = {
        f"{prefix}_rows": float(len(batch)),
        f"{prefix}_minutes_saved": float(minutes),
    }
    for kind, figures in ((s.KIND_DUPLICATE, dup), (s.KIND_ERROR, err), ("correction", corr)):
        for key, value in figures.items():
            metrics[f"{prefix}_{kind}_{key}"] = float(value)
    metrics[f"{prefix}_duplicate_average_precision"] = average_precision(dup_scores, dup_labels)
    metrics[f"{prefix}_error_average_precision"] = average_precision(err_scores, err_labels)
    metrics[f"{prefix}_anomaly_flags"] = float(len(anomaly_flags))
    metrics[f"{prefix}_anomaly_precision"] = float(anomaly_precision)
    for row in rows:
        for key in ("precision", "recall", "f1"):
            metrics[f"{prefix}_error_{key}_{row['field']}"] = float(row[key])
    return Evaluation(
        metrics=metrics,
        per_field=per_field,
        duplicate_curve=(dup_scores, dup_labels),
        error_curve=(err_scores, err_labels),
    )


def evaluate_bundle(bundle: ModelBundle, holdout: Holdout, *, prefix: str = "test") -> Evaluation:
    """Scores a held-out period with a model (as the batch job would) and compares with the truth."""
    from pipeline.score import score_chunk

    config = bundle.config
    matcher = bundle.duplicates.matcher(holdout.reference)
    result = score_chunk(holdout.batch, bundle, matcher)
    return evaluate_scored(
        config=config,
        batch=holdout.batch,
        reference_ids=holdout.reference[config.id_column],
        log=holdout.log,
        columns=result.columns,
        flags=result.flags,
        cell_scores=result.cell_scores,
        prefix=prefix,
    )


def evaluate_output(
    config: Config,
    output: str | Path,
    batch_path: str | Path,
    truth_path: str | Path,
    reference_path: str | Path | None,
) -> dict[str, float]:
    """Compares a `score` output folder with a batch's ground truth (a log in the contract's format),
    e.g. the demo's `batch_truth.csv`. Returns `batch_*` figures."""
    from pipeline.corrections import load_log
    from pipeline.ingest import OUTPUT_CSV, ReadOptions, read_table

    options = ReadOptions.from_config(config)
    output = Path(output)
    columns = read_table(output / s.RECORDS_FILE, options=OUTPUT_CSV)
    flags = read_table(output / s.FLAGS_FILE, options=OUTPUT_CSV)
    flags[s.FLAG_SCORE] = flags[s.FLAG_SCORE].astype(float)
    batch = read_table(batch_path, options=options)
    reference_ids = (
        read_table(reference_path, options=options)[config.id_column]
        if reference_path
        else pd.Series([], dtype=object)
    )
    cell_scores = pd.DataFrame(index=batch.index, columns=[], dtype=float)
    evaluation = evaluate_scored(
        config=config,
        batch=batch,
        reference_ids=reference_ids,
        log=load_log(truth_path, options=options),
        columns=columns,
        flags=flags,
        cell_scores=cell_scores,
        prefix="batch",
    )
    return evaluation.metrics

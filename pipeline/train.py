"""Training: from the history and its corrections log to a fitted, evaluated model bundle.

The history is split by entry time. The models learn from the oldest part (as entered, with its log as
labels), choose their thresholds on the next part, and are measured on the latest part exactly as the
batch job would score it: as entered, against everything before it as stored. The figures therefore say
what a clerk would have seen had the model run then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import schema as s
from pipeline.anomalies import AnomalyModel
from pipeline.bundle import Holdout, ModelBundle
from pipeline.config import Config
from pipeline.corrections import (
    ReplayStats,
    cell_labels,
    duplicate_clusters,
    duplicate_pairs,
    load_log,
    merges,
    replay_backwards,
)
from pipeline.errors import ErrorModel
from pipeline.evaluate import Evaluation, Split, evaluate_bundle, link_truth, time_split
from pipeline.exceptions import TrainingDataError
from pipeline.ingest import ReadOptions, check_unique_ids, file_digest, read_table, require_columns
from pipeline.linkage import DuplicateModel

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    bundle: ModelBundle
    evaluation: Evaluation
    split: Split
    replay: ReplayStats
    params: dict[str, Any]
    durations: dict[str, float]
    digests: dict[str, str]
    sizes: dict[str, int]


def load_history(config: Config, records_path: Path, log_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reads and checks the history and its log against the config (which may say how to read them)."""
    options = ReadOptions.from_config(config)
    records = read_table(records_path, options=options)
    require_columns(records, config.required_columns(), source=records_path, what="named in the config")
    check_unique_ids(records[config.id_column], source=records_path, id_column=config.id_column)
    log = load_log(log_path, options=options)
    return records.reset_index(drop=True), log


def train(config: Config, records_path: Path, log_path: Path) -> TrainingResult:
    """Fits the duplicate, error and anomaly models and evaluates them on the latest history."""
    timer = _Timer()
    stored, log = load_history(config, Path(records_path), Path(log_path))
    entered, replay = replay_backwards(stored, log, id_column=config.id_column)
    split = time_split(stored, config, source=str(records_path))
    ids = stored[config.id_column]
    timer.lap("load")

    train_ids = ids.iloc[split.train]
    log_train = _log_for(log, set(train_ids))
    labels_train = cell_labels(log_train, train_ids)
    pairs_train = duplicate_pairs(merges(log_train))
    if not len(labels_train) and not pairs_train:
        raise TrainingDataError(
            f"{log_path}: no edits or merges touch the training period; the models have nothing to learn from"
        )

    # Thresholds are chosen on the validation period, scored against the training period as stored.
    val_ids = ids.iloc[split.validation]
    log_val = _log_for(log, set(train_ids) | set(val_ids))
    clusters_val = duplicate_clusters(merges(log_val))

    duplicates = DuplicateModel(config, seed=config.seed).fit(entered.iloc[split.train], pairs_train)
    duplicate_calibration = duplicates.calibrate(
        entered.iloc[split.validation],
        stored.iloc[split.train],
        link_truth(val_ids, train_ids, clusters_val),
        clusters=clusters_val,
    )
    timer.lap("fit_duplicates")

    errors = ErrorModel(config, seed=config.seed).fit(
        entered.iloc[split.train], labels_train, stored.iloc[split.train]
    )
    error_calibration = errors.calibrate(entered.iloc[split.validation], cell_labels(log_val, val_ids))
    timer.lap("fit_errors")

    anomalies = AnomalyModel(config, quantile=config.anomaly_quantile, seed=config.seed).fit(
        stored.iloc[split.train]
    )
    timer.lap("fit_anomalies")

    before_test = np.concatenate([split.train, split.validation])
    holdout = Holdout(
        batch=entered.iloc[split.test].reset_index(drop=True),
        reference=stored.iloc[before_test].reset_index(drop=True),
        log=log.reset_index(drop=True),
    )
    bundle = ModelBundle(
        config=config, duplicates=duplicates, errors=errors, anomalies=anomalies, holdout=holdout
    )
    evaluation = evaluate_bundle(bundle, holdout, prefix="test")
    timer.lap("evaluate")
    bundle.metrics = dict(evaluation.metrics)
    for prefix, figures in (
        ("validation_duplicate", duplicate_calibration),
        ("validation_error", error_calibration),
    ):
        for key, value in figures.items():
            if isinstance(value, int | float):
                bundle.metrics[f"{prefix}_{key}"] = float(value)

    sizes = {
        "records": len(stored),
        "log_rows": len(log),
        "edits": replay.edits_applied,
        "merges": replay.merges,
        **{f"{part}_records": n for part, n in split.sizes().items()},
        "train_cell_labels": len(labels_train),
        "train_duplicate_pairs": len(pairs_train),
    }
    params = {
        **_flatten("config", config.model_dump(mode="json", exclude={"fields"})),
        **{
            f"field.{name}": spec.type
            + ("" if spec.match else ",nomatch")
            + ("" if spec.check else ",nocheck")
            for name, spec in config.fields.items()
        },
        **_flatten("duplicates", _model_params(duplicates)),
        **_flatten("errors", _model_params(errors)),
        **_flatten("anomalies", _model_params(anomalies)),
    }
    return TrainingResult(
        bundle=bundle,
        evaluation=evaluation,
        split=split,
        replay=replay,
        params=params,
        durations=timer.laps,
        digests={"records_sha256": file_digest(records_path), "log_sha256": file_digest(log_path)},
        sizes=sizes,
    )


def _log_for(log: pd.DataFrame, ids: set[str]) -> pd.DataFrame:
    """The log rows about these records (merges only when both ends are among them)."""
    touches = log[s.LOG_RECORD_ID].isin(ids)
    is_merge = log[s.LOG_ACTION] == s.ACTION_MERGE
    return log[touches & (~is_merge | log[s.LOG_MERGED_INTO].isin(ids))]


def _model_params(model: Any) -> dict[str, Any]:
    """A model's constructor parameters and the sizes it learned, without any record values."""
    params: dict[str, Any] = {}
    getter = getattr(model, "get_params", None)
    if callable(getter):
        params.update({k: v for k, v in getter().items() if k != "config"})
    for name in ("threshold_", "label_counts_", "blocking_rules_"):
        value = getattr(model, name, None)
        if value is not None:
            params[name.rstrip("_")] = value
    return params


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(_flatten(name, value))
        else:
            flat[name] = str(value)[:500]
    return flat


class _Timer:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now

"""Held-out evaluation: the time split, the ground truth of a held-out period, and the figures.

Quality is measured the way the product is used: the latest part of the history is scored as if it were a
new batch (as entered, against the earlier records as stored), and its flags are compared with what staff
corrected. Staff did not find every error, so precision on history is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

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


# Below these counts of labelled events in the validation or the test period, a held-out period says too
# little: thresholds are chosen out of fold and the figures come from cross-validation instead.
MIN_HELDOUT_CELLS = 30
MIN_HELDOUT_MERGES = 15
MIN_TRAIN_RECORDS = 10
MAX_FOLDS = 5

Scheme = Literal["holdout", "cross-validation"]


@dataclass(frozen=True)
class LabelEvents:
    """When each labelled event happened, as a position in entry order (0 = first entered record).

    An edited cell is an event at its record; a merge cluster is an event at each member after the first
    entered (the re-registrations). Confirmations are not events: they label no error.
    """

    cells: np.ndarray  # entry rank of each labelled cell's record
    merges: np.ndarray  # entry rank of each re-registration
    confirms: np.ndarray  # entry rank of each record staff reviewed and confirmed (no label, but looked at)
    cell_groups: np.ndarray  # per record (by position in the history): 1 when it has a labelled cell
    cluster_of: np.ndarray  # per record: its merge cluster's number, -1 outside any cluster

    def counts(self) -> dict[str, int]:
        return {"labelled_cells": len(self.cells), "merges": len(self.merges)}


def label_events(records: pd.DataFrame, log: pd.DataFrame, config: Config, order: np.ndarray) -> LabelEvents:
    """The labelled events of the log against the history, placed in entry order (see `LabelEvents`)."""
    from pipeline.corrections import cell_labels, duplicate_clusters, merges

    ids = records[config.id_column].reset_index(drop=True)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    position = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
    labels = cell_labels(log, ids)
    labels = labels[labels[s.LOG_FIELD].isin(config.check_fields)]
    cell_positions = position.reindex(labels[s.LOG_RECORD_ID].to_numpy()).dropna().to_numpy(dtype=np.int64)
    has_cell = np.zeros(len(ids), dtype=np.int8)
    has_cell[cell_positions] = 1
    cluster_of = np.full(len(ids), -1, dtype=np.int64)
    members: dict[str, list[int]] = {}
    for record_id, root in duplicate_clusters(merges(log)).items():
        where = position.get(record_id)
        if where is not None:
            members.setdefault(root, []).append(int(where))
    merge_ranks: list[int] = []
    for number, group in enumerate(members.values()):
        if len(group) < 2:
            continue
        cluster_of[group] = number
        merge_ranks.extend(sorted(rank[group])[1:])
    confirmed = log.loc[log[s.LOG_ACTION] == s.ACTION_CONFIRM, s.LOG_RECORD_ID].to_numpy()
    confirm_positions = position.reindex(confirmed).dropna().to_numpy(dtype=np.int64)
    return LabelEvents(
        confirms=np.sort(rank[confirm_positions]),
        cells=np.sort(rank[cell_positions]),
        merges=np.sort(np.asarray(merge_ranks, dtype=np.int64)),
        cell_groups=has_cell,
        cluster_of=cluster_of,
    )


@dataclass(frozen=True)
class EvaluationPlan:
    """How a training run measures itself: a held-out split by time, or cross-validation folds."""

    scheme: Scheme
    split: Split  # holdout: the three periods; cross-validation: everything in `train`
    folds: np.ndarray | None  # cross-validation: the fold of each record (by position in the history)
    counts: dict[str, int]  # labelled events per part, for the log and MLflow
    order: np.ndarray  # every record's position, in entry order
    covered: np.ndarray  # per record (by position): entered within the period the log covers

    @property
    def n_folds(self) -> int:
        return 0 if self.folds is None else int(self.folds.max()) + 1


def _cut_for(events: list[np.ndarray], share: float, n: int) -> int:
    """The highest entry rank `cut` such that, averaged over the tasks that have events, at least `share`
    of each task's events are at rank >= cut. `events` hold sorted ranks."""
    present = [e for e in events if len(e)]
    candidates = np.unique(np.concatenate(present))
    after = np.mean([1 - np.searchsorted(e, candidates, side="left") / len(e) for e in present], axis=0)
    ok = np.flatnonzero(after >= share - 1e-12)  # the share after a cut only falls as the cut rises
    return min(int(candidates[ok[-1]]) if len(ok) else 0, n)


def plan_evaluation(
    records: pd.DataFrame, log: pd.DataFrame, config: Config, *, source: str = "records"
) -> EvaluationPlan:
    """Decides how training evaluates, from where and how many the labels are.

    The history is split by entry time *inside the period the log covers*, sized by labelled events
    (edited cells and re-registrations), not rows: the test period holds the latest `config.split.test`
    share of each task's events, validation the `config.split.validation` share before it, and training
    everything earlier (the unlabelled past included). When validation or test would hold fewer than
    MIN_HELDOUT_CELLS labelled cells (for a log with edits) or MIN_HELDOUT_MERGES merges (for a log with
    merges), a held-out period says too little: the plan is grouped cross-validation instead, with every
    labelled record, and every merge cluster, inside one fold.
    """
    from pipeline.exceptions import TrainingDataError

    order = entry_order(records, config, source=source)
    n = len(order)
    events = label_events(records, log, config, order)
    tasks = [events.cells, events.merges]
    if not any(len(e) for e in tasks):
        raise TrainingDataError(
            f"{source}: the corrections log holds no edit of a configured field and no merge of two "
            "records in this history; the models have nothing to learn from"
        )
    # The period the log covers: from its first labelled event (or confirmation) to its last. Records
    # before it (a log kept only lately) or after it (not reviewed yet) were never looked at: their errors
    # are not labelled, so they serve the profiles and the reference, not as clean examples or test records.
    ranks = np.concatenate([*tasks, events.confirms])
    first, last = int(ranks.min()), int(ranks.max())
    covered = np.zeros(n, dtype=bool)
    covered[order[first : last + 1]] = True
    cut_test = _cut_for(tasks, config.split.test, n)
    cut_val = _cut_for(tasks, config.split.test + config.split.validation, n)
    cut_val = min(cut_val, cut_test)
    split = Split(train=order[:cut_val], validation=order[cut_val:cut_test], test=order[cut_test : last + 1])

    def part(e: np.ndarray, lo: int, hi: int) -> int:
        return int(np.count_nonzero((e >= lo) & (e < hi)))

    counts = {
        f"{name}_{period}": part(e, lo, hi)
        for name, e in (("cells", events.cells), ("merges", events.merges))
        for period, lo, hi in (
            ("train", 0, cut_val),
            ("validation", cut_val, cut_test),
            ("test", cut_test, n),
        )
    }
    enough = (
        len(split.train) >= MIN_TRAIN_RECORDS
        and len(split.validation) > 0
        and len(split.test) > 0
        and (
            not len(events.cells)
            or min(counts["cells_validation"], counts["cells_test"]) >= MIN_HELDOUT_CELLS
        )
        and (
            not len(events.merges)
            or min(counts["merges_validation"], counts["merges_test"]) >= MIN_HELDOUT_MERGES
        )
    )
    counts["covered_records"] = int(covered.sum())
    if enough:
        return EvaluationPlan("holdout", split, None, counts, order, covered)
    folds = group_folds(events, seed=config.seed)
    counts = {
        "cells": len(events.cells),
        "merges": len(events.merges),
        "folds": int(folds.max()) + 1,
        "covered_records": int(covered.sum()),
    }
    return EvaluationPlan(
        "cross-validation", Split(order, order[:0], order[:0]), folds, counts, order, covered
    )


def group_folds(events: LabelEvents, *, seed: int = 0, max_folds: int = MAX_FOLDS) -> np.ndarray:
    """A fold number per record: merge clusters and labelled records are groups kept whole, spread over
    the folds in turn (shuffled), so each fold holds a like share of the labels; other records are dealt
    out at random."""
    n = len(events.cluster_of)
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero((events.cell_groups == 1) | (events.cluster_of >= 0))
    keys = np.where(events.cluster_of[labelled] >= 0, events.cluster_of[labelled], -1 - labelled)
    groups = np.unique(keys)
    k = int(np.clip(len(groups), 2, max_folds))
    folds = rng.integers(0, k, size=n)
    # Clusters first, then labelled records; each list dealt round-robin after a shuffle.
    clusters = rng.permutation(groups[groups >= 0])
    singles = rng.permutation(groups[groups < 0])
    fold_of_group = {int(g): i % k for i, g in enumerate(clusters)}
    fold_of_group.update({int(g): (len(clusters) + i) % k for i, g in enumerate(singles)})
    folds[labelled] = [fold_of_group[int(g)] for g in keys]
    return folds


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
    if s.FLAG_SUGGEST_EMPTY in error_flags.columns:  # "leave it empty" is a correction too
        made |= error_flags[s.FLAG_SUGGEST_EMPTY].to_numpy(dtype=object) == "true"
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


def combine_evaluations(parts: list[Evaluation], config: Config, *, prefix: str = "test") -> Evaluation:
    """One evaluation from the folds of a cross-validation: counts are added up and the figures computed
    again from them (micro-averaged), the curves pooled."""
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.metrics.items():
            if key.endswith(("_tp", "_fp", "_fn", "_rows", "_minutes_saved", "_anomaly_flags")):
                total[key] = total.get(key, 0.0) + value
    hits = sum(p.metrics[f"{prefix}_anomaly_precision"] * p.metrics[f"{prefix}_anomaly_flags"] for p in parts)
    metrics = dict(total)
    for kind in (s.KIND_DUPLICATE, s.KIND_ERROR, "correction"):
        figures = prf(*(int(total.get(f"{prefix}_{kind}_{c}", 0)) for c in ("tp", "fp", "fn")))
        metrics.update({f"{prefix}_{kind}_{key}": float(value) for key, value in figures.items()})
    flags = total.get(f"{prefix}_anomaly_flags", 0.0)
    metrics[f"{prefix}_anomaly_precision"] = hits / flags if flags else 0.0
    curves = {}
    for name in ("duplicate_curve", "error_curve"):
        scores = np.concatenate([getattr(p, name)[0] for p in parts])
        labels = np.concatenate([getattr(p, name)[1] for p in parts])
        curves[name] = (scores, labels)
    metrics[f"{prefix}_duplicate_average_precision"] = average_precision(*curves["duplicate_curve"])
    metrics[f"{prefix}_error_average_precision"] = average_precision(*curves["error_curve"])
    summed = pd.concat([p.per_field for p in parts]).groupby("field", sort=False)[["tp", "fp", "fn"]].sum()
    rows = [{"field": name, **prf(*map(int, summed.loc[name]))} for name in summed.index]
    for row in rows:
        for key in ("precision", "recall", "f1"):
            metrics[f"{prefix}_error_{key}_{row['field']}"] = float(row[key])
    return Evaluation(
        metrics=metrics,
        per_field=pd.DataFrame(rows),
        duplicate_curve=curves["duplicate_curve"],
        error_curve=curves["error_curve"],
    )


def evaluate_bundle(bundle: ModelBundle, holdout: Holdout, *, prefix: str = "test") -> Evaluation:
    """Scores a held-out period with a model (as the batch job would) and compares with the truth.

    As the batch job does: the matcher's index drops what no later record can be matched with (`evict`),
    and the period is scored `SCORE_CHUNK_ROWS` rows at a time, each chunk continuing the running numbers
    the earlier ones left, so memory stays flat however long the period is; the results do not depend on
    where the chunks are cut."""
    from pipeline.memory import release_free_memory
    from pipeline.score import SCORE_CHUNK_ROWS, score_chunk

    config = bundle.config
    batch = holdout.batch
    matcher = bundle.duplicates.matcher(holdout.reference, evict=True)
    numbers = bundle.errors.numbers_after(holdout.reference)
    columns, flags, cell_scores = [], [], []
    for start in range(0, max(len(batch), 1), SCORE_CHUNK_ROWS):  # an empty period: one empty chunk
        chunk = batch.iloc[start : start + SCORE_CHUNK_ROWS]
        result = score_chunk(chunk, bundle, matcher, numbers)
        numbers = numbers.then(bundle.errors.running_numbers(chunk))
        columns.append(result.columns)
        flags.append(result.flags)
        cell_scores.append(result.cell_scores)
        release_free_memory()
    del matcher
    return evaluate_scored(
        config=config,
        batch=batch,
        reference_ids=holdout.reference[config.id_column],
        log=holdout.log,
        columns=pd.concat(columns),
        flags=pd.concat(flags, ignore_index=True),
        cell_scores=pd.concat(cell_scores),
        prefix=prefix,
    )


def evaluate_output(
    config: Config,
    output: str | Path,
    batch_path: str | Path,
    truth_path: str | Path,
    reference_path: str | Path | None,
    history_truth_path: str | Path | None = None,
) -> dict[str, float]:
    """Compares a `score` output folder with a batch's ground truth (a log in the contract's format),
    e.g. the demo's `batch_truth.csv`. Returns `batch_*` figures.

    `history_truth_path` (e.g. the demo's `history_truth.csv`): the merges among the reference's own
    records, so a batch record linked to any record of its true cluster counts as right, not only to the
    one record the batch's truth names (the reference may hold an earlier re-registration of it).
    """
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
    log = load_log(truth_path, options=options)
    if history_truth_path is not None:
        earlier = load_log(history_truth_path, options=options)
        merge_rows = earlier[s.LOG_ACTION] == s.ACTION_MERGE
        earlier = earlier.loc[merge_rows, [s.LOG_RECORD_ID, s.LOG_ACTION, s.LOG_MERGED_INTO]]
        log = pd.concat([earlier, log], ignore_index=True).fillna(s.MISSING)
    evaluation = evaluate_scored(
        config=config,
        batch=batch,
        reference_ids=reference_ids,
        log=log,
        columns=columns,
        flags=flags,
        cell_scores=cell_scores,
        prefix="batch",
    )
    return evaluation.metrics


def review_labelled(holdout: Holdout, config: Config) -> int:
    """How many records of the held-out batch a review decision labelled (`source = review` log rows).

    Such a label exists because some model flagged the record, usually the champion that scored that
    batch: scored on these labels, the flagging model's recall is 1 by construction, so they cannot judge
    it against another model.
    """
    from pipeline.corrections import review_rows

    reviewed = set(review_rows(holdout.log)[s.LOG_RECORD_ID])
    return int(holdout.batch[config.id_column].isin(reviewed).sum())

"""Training: from the history and its corrections log to a fitted, evaluated model bundle.

Two steps. First the *procedure* is measured (`pipeline.evaluate.plan_evaluation` decides how): with
enough labels, the models learn from the older part of the period the log covers, choose their thresholds
on the next part, and are measured on the latest part exactly as the batch job would score it (as entered,
against everything before it as stored); with few labels, by grouped cross-validation, thresholds chosen
out of fold. Then the registered model is refitted on the *whole* history with the chosen thresholds, so it
knows every customer and every correction; the figures describe that procedure.
"""

from __future__ import annotations

import gc
import logging
import queue
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    confirmed_cells,
    confirmed_records,
    duplicate_clusters,
    duplicate_pairs,
    load_log,
    merges,
    rejected_pairs,
    replay_backwards,
)
from pipeline.detectors import Context
from pipeline.duplicates.calibration import link_floor
from pipeline.errors import ErrorModel
from pipeline.evaluate import (
    Evaluation,
    EvaluationPlan,
    combine_evaluations,
    evaluate_bundle,
    evaluate_scored,
    link_truth,
    plan_evaluation,
)
from pipeline.exceptions import TrainingDataError
from pipeline.feedback import realised_value
from pipeline.ingest import check_unique_ids, file_digest, read_table, require_columns
from pipeline.linkage import DuplicateModel
from pipeline.memory import release_free_memory, resident_mb
from pipeline.metrics import choose_threshold
from pipeline.score import ChunkResult, score_chunk

logger = logging.getLogger(__name__)

# A cross-validation fold is replayed in this many runs in entry order (see `_replay_fold`).
CV_WINDOWS = 10
# With a holdout plan, the registered model's fit runs in a second process beside the evaluation
# (`_FinalFit`), so training uses both cores, on a history of at least PARALLEL_MIN_RECORDS records (below
# it the second process's start-up, importing the libraries and reading the files again, outweighs the
# gain) and at most PARALLEL_MAX_RECORDS: two fits at once hold two histories and their models (each ~2.2
# GB at 200,000 records), which above it would pass the few GB a shared machine can spare.
PARALLEL_MIN_RECORDS = 20_000
PARALLEL_MAX_RECORDS = 250_000


@dataclass
class TrainingResult:
    bundle: ModelBundle
    evaluation: Evaluation
    plan: EvaluationPlan
    replay: ReplayStats
    params: dict[str, Any]
    durations: dict[str, float]
    digests: dict[str, str]
    sizes: dict[str, int]


@dataclass(frozen=True)
class Thresholds:
    """What the evaluation chose, handed to the final fit (None: the model chooses its own)."""

    duplicate: float | None = None
    label_frequency: float | None = None
    error: float | None = None
    suggest: float | None = None
    # The flag threshold of the model the new one is to replace: the error model keeps it when it is about
    # as good as the best on the new history (`ErrorModel(anchor_threshold=)`).
    error_anchor: float | None = None


@dataclass
class _History:
    """The history three ways: as stored, as entered (log replayed backwards), and its log; `covered`
    marks the records entered within the period the log covers (see `plan_evaluation`)."""

    stored: pd.DataFrame
    entered: pd.DataFrame
    log: pd.DataFrame
    config: Config
    covered: np.ndarray
    ids: pd.Series = field(init=False)

    def __post_init__(self) -> None:
        self.ids = self.stored[self.config.id_column]


def load_history(config: Config, records_path: Path, log_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reads and checks the history and its log against the config."""
    records = read_table(records_path, share_repeated=True)
    require_columns(records, config.required_columns(), source=records_path, what="named in the config")
    check_unique_ids(records[config.id_column], source=records_path, id_column=config.id_column)
    log = load_log(log_path)
    return records.reset_index(drop=True), log


def _merged_into_values(history: _History, records: pd.DataFrame) -> pd.DataFrame:
    """The stored values of the record each of `records` was merged into (`''` where none), same rows: what
    `score` passes the error model as `matched` for a duplicate it links.

    Each column categorical: most records were merged into none, so a few values' codes take a fraction
    of the memory of a million string references (at a million records, ~60 MB less through the error
    model's fit); taken column by column, without a copy of the whole history keyed by id."""
    config = history.config
    pairs = merges(history.log)
    target = dict(zip(pairs[s.LOG_RECORD_ID], pairs[s.LOG_MERGED_INTO], strict=True))
    # Each record's target as a position in the history (-1: merged into none, or into a record not in it).
    at = pd.Index(history.ids).get_indexer(records[config.id_column].map(target))
    none = at < 0
    columns = {}
    for name in config.fields:
        values = history.stored[name].to_numpy(dtype=object).take(np.where(none, 0, at))
        values[none | pd.isna(values)] = s.MISSING
        columns[name] = pd.Categorical(values)
    return pd.DataFrame(columns, index=pd.RangeIndex(len(records)))


def train(
    config: Config, records_path: Path, log_path: Path, *, error_anchor: float | None = None
) -> TrainingResult:
    """Measures the training procedure on held-out history, then fits the registered model on all of it.

    `error_anchor`: the flag threshold of the model in use (the champion's), which the error models keep
    when it is within the tolerance of the best on this history: a retrained model's error flags move only
    when the new history clearly prefers another cut.
    """
    anchor = Thresholds(error_anchor=error_anchor)
    stages = Stages()
    with stages.stage("load", "reading the history and its log, replaying the log"):
        history, plan, replay = _load(config, Path(records_path), Path(log_path))
    stored, log = history.stored, history.log
    logger.info("evaluation: %s on %s", plan.scheme, plan.counts)

    everything = plan.order
    if plan.scheme == "holdout":
        final = None
        if PARALLEL_MIN_RECORDS <= len(stored) <= PARALLEL_MAX_RECORDS:
            logger.info("fitting the registered model on all %d records in a second process", len(stored))
            final = _FinalFit(config, Path(records_path), Path(log_path), anchor)
        try:
            evaluation, thresholds, extra = _evaluate_holdout(history, plan, stages, anchor)
            if final is None:
                logger.info("fitting the registered model on all %d records", len(stored))
                bundle = _fit_bundle(history, everything, thresholds, stages, "fit")
            else:
                bundle = final.result(stages, thresholds)
        finally:
            if final is not None:
                final.close()
        # Copied out of the history only now: the test period's reference is most of the history.
        holdout = _holdout_of(history, plan)
    else:
        # The final model first: its error thresholds, chosen out of fold inside the fit, serve the folds.
        logger.info("fitting the registered model on all %d records", len(stored))
        bundle = _fit_bundle(history, everything, anchor, stages, "fit")
        with stages.stage("evaluate", "cross-validation"):
            evaluation, holdout, thresholds, extra = _evaluate_cross_validation(history, plan, bundle, stages)
        if thresholds.duplicate is not None:
            bundle.duplicates.threshold_ = thresholds.duplicate
    bundle.holdout = holdout

    bundle.metrics = {**evaluation.metrics, **extra}
    bundle.metrics.update({f"evaluation_{key}": float(value) for key, value in plan.counts.items()})
    bundle.metrics.update(realised_value(log, config))  # what the reviews in this log delivered
    labels_all = cell_labels(log, history.ids)
    sizes = {
        "records": len(stored),
        "log_rows": len(log),
        "edits": replay.edits_applied,
        "merges": replay.merges,
        **{f"{part}_records": n for part, n in plan.split.sizes().items()},
        "cell_labels": len(labels_all),
        "duplicate_pairs": len(duplicate_pairs(merges(log))),
    }
    params = {
        **_flatten("config", config.model_dump(mode="json", exclude={"fields"})),
        **{
            f"field.{name}": spec.type
            + ("" if spec.match else ",nomatch")
            + ("" if spec.check else ",nocheck")
            for name, spec in config.fields.items()
        },
        "evaluation.scheme": plan.scheme,
        **_flatten("duplicates", _model_params(bundle.duplicates)),
        **_flatten("errors", _model_params(bundle.errors)),
        **_flatten("anomalies", _model_params(bundle.anomalies)),
    }
    return TrainingResult(
        bundle=bundle,
        evaluation=evaluation,
        plan=plan,
        replay=replay,
        params=params,
        durations=stages.laps,
        digests={"records_sha256": file_digest(records_path), "log_sha256": file_digest(log_path)},
        sizes=sizes,
    )


def _load(config: Config, records_path: Path, log_path: Path) -> tuple[_History, EvaluationPlan, ReplayStats]:
    """The history as stored and as entered, its log, and the evaluation plan."""
    stored, log = load_history(config, records_path, log_path)
    actions = log[s.LOG_ACTION]
    if not ((actions == s.ACTION_EDIT) | (actions == s.ACTION_MERGE)).any():
        raise TrainingDataError(
            f"{log_path}: the corrections log holds neither an edit nor a merge; "
            "the models have nothing to learn from"
        )
    entered, replay = replay_backwards(stored, log, id_column=config.id_column)
    plan = plan_evaluation(stored, log, config, source=str(records_path))
    history = _History(stored=stored, entered=entered, log=log, config=config, covered=plan.covered)
    return history, plan, replay


def _apply_thresholds(bundle: ModelBundle, thresholds: Thresholds) -> None:
    """Sets the duplicate threshold the evaluation chose on a bundle fitted without it."""
    if thresholds.duplicate is not None:
        bundle.duplicates.threshold_ = thresholds.duplicate
        if thresholds.label_frequency is not None:
            bundle.duplicates.label_frequency_ = thresholds.label_frequency


class _FinalFit:
    """The registered model's fit in a second (spawned) process, while this one measures the procedure.

    With a holdout plan the two fits are independent: the final fit takes from the evaluation only the
    duplicate threshold, which is set after fitting. The second process reads the files again (the same
    history, the same plan: the fit is deterministic), fits on everything and hands the error and anomaly
    models back pickled; the duplicate model (whose dedupe comparators do not pickle) is saved into a
    temporary folder, from which `result` loads it: the form in which the registry stores it anyway.
    Its log lines are shown here, through a queue; its stages' seconds join this process's; an exception
    there is raised here; `close` stops it if this process gives up first."""

    def __init__(self, config: Config, records_path: Path, log_path: Path, anchor: Thresholds) -> None:
        import multiprocessing
        import tempfile
        from logging.handlers import QueueListener

        self.config = config
        context = multiprocessing.get_context("spawn")
        self.folder = tempfile.TemporaryDirectory(prefix="pipeline-train-")
        self.logs, self.outcome = context.Queue(), context.Queue()
        self.listener = QueueListener(self.logs, *logging.getLogger().handlers, respect_handler_level=True)
        self.listener.start()
        levels = {
            name: item.level
            for name, item in logging.Logger.manager.loggerDict.items()
            if isinstance(item, logging.Logger) and item.level != logging.NOTSET
        }
        self.process = context.Process(
            target=_fit_final,
            args=(config, records_path, log_path, Path(self.folder.name), self.outcome, anchor),
            kwargs={"logs": self.logs, "level": logging.getLogger().getEffectiveLevel(), "levels": levels},
            daemon=True,
        )
        self.process.start()

    def result(self, stages: Stages, thresholds: Thresholds) -> ModelBundle:
        """Waits for the fit; the bundle with the evaluation's duplicate threshold."""
        with stages.stage("fit_wait", "fit: waiting for the registered model's fit in the second process"):
            ok, outcome = self._outcome()
            self.process.join()
        if not ok:
            raise outcome
        laps, errors, anomalies = outcome
        for name, seconds in laps.items():
            stages.laps[name] = round(stages.laps.get(name, 0.0) + seconds, 3)
        duplicates = DuplicateModel.load(Path(self.folder.name) / "duplicates")
        bundle = ModelBundle(config=self.config, duplicates=duplicates, errors=errors, anomalies=anomalies)
        _apply_thresholds(bundle, thresholds)
        return bundle

    def _outcome(self) -> tuple[bool, Any]:
        """What the second process put on its queue (read before joining it: a process does not exit while
        its message is unread); RuntimeError if it died without a word (e.g. killed for its memory)."""
        while True:
            try:
                return self.outcome.get(timeout=1.0)
            except queue.Empty:
                if not self.process.is_alive():
                    try:
                        return self.outcome.get(timeout=1.0)
                    except queue.Empty:
                        raise RuntimeError(
                            f"the registered model's fit in a second process stopped "
                            f"(exit code {self.process.exitcode})"
                        ) from None

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
        self.listener.stop()
        self.folder.cleanup()


def _fit_final(
    config: Config,
    records_path: Path,
    log_path: Path,
    folder: Path,
    outcome: Any,
    anchor: Thresholds,
    *,
    logs: Any,
    level: int,
    levels: dict[str, int],
) -> None:
    """Runs in the second process: the registered model fitted on the whole history, its duplicate model
    saved into `folder`; puts (True, (seconds per stage, error model, anomaly model)) or (False, the
    exception) on `outcome`. Its log records go to `logs`, at the levels of the first process."""
    from logging.handlers import QueueHandler

    from threadpoolctl import threadpool_limits

    root = logging.getLogger()
    root.handlers = [QueueHandler(logs)]
    root.setLevel(level)
    for name, named_level in levels.items():
        logging.getLogger(name).setLevel(named_level)
    threadpool_limits(1)  # one core each: the two processes are the parallelism
    try:
        stages = Stages()
        history, plan, _ = _load(config, records_path, log_path)
        bundle = _fit_bundle(history, plan.order, anchor, stages, "fit")
        del history
        bundle.duplicates.save(folder / "duplicates")
    except Exception as exc:  # noqa: BLE001 - handed to the first process, which raises it
        outcome.put((False, exc))
        return
    outcome.put((True, (stages.laps, bundle.errors, bundle.anomalies)))


def _fit_bundle(
    history: _History, positions: np.ndarray, thresholds: Thresholds, stages: Stages, name: str
) -> ModelBundle:
    """Fits the three models on the records at `positions` (in entry order) and their log rows; `name`
    prefixes the stages (`fit`: the registered model).

    The error model learns from the records the log covers; the others (never reviewed) only widen its
    profiles. The duplicate model learns from the covered records and the records they were merged with
    (an original may be older than the log). The anomaly model learns from all of them.
    """
    config = history.config
    reviewed = positions[history.covered[positions]]
    ids = history.ids.iloc[reviewed]
    log = _log_for(history.log, set(ids))
    labels = cell_labels(log, ids)
    unreviewed = positions[~history.covered[positions]]
    confirmed = confirmed_cells(log)  # cells a clerk confirmed: known negatives
    with stages.stage(f"{name}_errors", f"{name}: error model on {len(reviewed)} records"):
        entered = _rows(history.entered, reviewed)
        errors = ErrorModel(
            config,
            seed=config.seed,
            threshold=thresholds.error,
            suggest_threshold=thresholds.suggest,
            anchor_threshold=thresholds.error_anchor,
        ).fit(
            entered,
            labels,
            _rows(history.stored, reviewed),
            unlabelled=history.stored.iloc[unreviewed],
            confirmed=confirmed,
            matched=_merged_into_values(history, entered),
        )
        del entered

    clusters = duplicate_clusters(merges(history.log))
    roots = {clusters[i] for i in ids if i in clusters}
    members = history.covered[positions] | history.ids.iloc[positions].map(clusters).isin(roots).to_numpy()
    matched = positions[members]
    match_log = _log_for(history.log, set(history.ids.iloc[matched]))
    non_pairs = rejected_pairs(match_log)  # pairs a clerk rejected: known non-duplicates
    with stages.stage(f"{name}_duplicates", f"{name}: duplicate model on {len(matched)} records"):
        duplicates = DuplicateModel(config, seed=config.seed).fit(
            _rows(history.entered, matched),
            duplicate_pairs(merges(match_log)),
            non_pairs=non_pairs,
        )
    # Taken only now: through the error model's fit, the peak of training, it would be a copy more.
    everyone = _rows(history.stored, positions)
    normal = everyone[everyone[config.id_column].isin(confirmed_records(history.log))]
    # The error model profiled the same records (the reviewed ones first): its dependency search serves
    # the anomaly model, and so does its profile when no record was left out of the review (same order).
    with stages.stage(f"{name}_anomalies", f"{name}: anomaly model on {len(everyone)} records"):
        anomalies = AnomalyModel(config, quantile=config.anomaly_quantile, seed=config.seed).fit(
            everyone,
            normal=normal,
            pairs=errors.dependency_pairs_,
            profile=None if len(unreviewed) else errors.profile_,
        )
    bundle = ModelBundle(config=config, duplicates=duplicates, errors=errors, anomalies=anomalies)
    _apply_thresholds(bundle, thresholds)
    return bundle


def _rows(frame: pd.DataFrame, positions: np.ndarray) -> pd.DataFrame:
    """`frame.iloc[positions]`, as a slice when the positions are consecutive (the records a fit takes in
    entry order usually are): under copy-on-write a slice shares the frame's columns, where a list of
    positions copies them (at a million records, 110 MB a frame)."""
    if (
        len(positions)
        and positions[-1] - positions[0] == len(positions) - 1
        and (np.diff(positions) == 1).all()
    ):
        return frame.iloc[int(positions[0]) : int(positions[-1]) + 1]
    return frame.iloc[positions]


def _holdout_of(history: _History, plan: EvaluationPlan) -> Holdout:
    """The test period as entered, the records before it as stored, and the log: what the bundle keeps
    for `promote`, and what `_evaluate_holdout` scores."""
    split = plan.split
    before_test = np.concatenate([split.train, split.validation])
    return Holdout(
        batch=history.entered.iloc[split.test].reset_index(drop=True),
        reference=history.stored.iloc[before_test].reset_index(drop=True),
        log=history.log.reset_index(drop=True),
    )


def _evaluate_holdout(
    history: _History, plan: EvaluationPlan, stages: Stages, anchor: Thresholds
) -> tuple[Evaluation, Thresholds, dict[str, float]]:
    """Fits on the training period, chooses the duplicate threshold on validation (the error model's are
    chosen out of fold inside its fit), measures the test period (`_holdout_of`; the frames and the
    models are freed on return, before the final fit)."""
    split = plan.split
    logger.info(
        "holdout: fitting on %d records, thresholds on %d, testing on %d",
        len(split.train),
        len(split.validation),
        len(split.test),
    )
    bundle = _fit_bundle(history, split.train, anchor, stages, "holdout")
    train_ids, val_ids = history.ids.iloc[split.train], history.ids.iloc[split.validation]
    log_val = _log_for(history.log, set(train_ids) | set(val_ids))
    clusters_val = duplicate_clusters(merges(log_val))
    extra: dict[str, float] = {}
    if bundle.duplicates.label_counts_.get("positive", 0) and clusters_val:
        with stages.stage("calibrate", "holdout: duplicate threshold on the validation period"):
            figures = bundle.duplicates.calibrate(
                history.entered.iloc[split.validation],
                history.stored.iloc[split.train],
                link_truth(val_ids, train_ids, clusters_val),
                clusters=clusters_val,
            )
        extra.update(_numbers("validation_duplicate", figures))
    # The error model keeps the thresholds its fit chose out of fold over its own training history, here
    # and in the final fit: a threshold chosen on validation for a model fitted on part of the history
    # does not carry over to the model refitted on all of it (demo seed 3: 0.065 where the refitted
    # model's own is 0.175, error precision 0.86 instead of 0.99).
    thresholds = Thresholds(
        duplicate=bundle.duplicates.threshold_,
        label_frequency=getattr(bundle.duplicates, "label_frequency_", None),
        error_anchor=anchor.error_anchor,
    )
    with stages.stage("evaluate", "holdout: scoring the test period as the batch job would"):
        evaluation = evaluate_bundle(bundle, _holdout_of(history, plan), prefix="test")
        del bundle
    return evaluation, thresholds, extra


def _evaluate_cross_validation(
    history: _History, plan: EvaluationPlan, final: ModelBundle, stages: Stages
) -> tuple[Evaluation, Holdout, Thresholds, dict[str, float]]:
    """Grouped k-fold: each fold is scored, as the batch job would, by models fitted on the others.

    A fold is replayed in entry order (`_replay_fold`), so its records are compared only with records
    entered before them, as in production. The duplicate threshold of fold k is chosen on the other folds'
    best candidate scores, so no fold's figures saw its own labels; the final threshold is chosen on all of
    them. The error thresholds are the `final` model's, chosen inside its fit on out-of-fold predictions of
    the whole history (one number each; re-choosing them inside every fold would double the cost).
    """
    assert plan.folds is not None
    config = history.config
    order = plan.split.train  # every record, in entry order
    fold_of = plan.folds[order]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    clusters = duplicate_clusters(merges(history.log))
    log = history.log.reset_index(drop=True)
    folds = []
    held_out = plan.covered[order]  # only reviewed records are scored and counted
    for k in range(plan.n_folds):
        in_fold = (fold_of == k) & held_out
        inside, outside = order[in_fold], order[~in_fold]
        if not len(inside):
            continue
        logger.info("cross-validation: fold %d of %d (%d records held out)", k + 1, plan.n_folds, len(inside))
        fixed = Thresholds(error=final.errors.threshold_, suggest=final.errors.suggest_threshold_)
        bundle = _fit_bundle(history, outside, fixed, stages, "fold")
        best = _replay_fold(history, bundle, inside, outside, rank=rank, threshold=0.0)
        batch_ids = history.ids.iloc[inside]
        truth = link_truth(batch_ids, history.ids.iloc[outside], clusters)
        roots = {**clusters, **truth}
        candidates = best[s.DUPLICATE_OF].to_numpy(dtype=object)
        correct = np.array(
            [r in truth and roots.get(c, c) == truth[r] for r, c in zip(batch_ids, candidates, strict=True)],
            dtype=bool,
        )
        scored = candidates != s.MISSING
        score = best[s.DUPLICATE_SCORE].to_numpy(dtype=float)
        folds.append((bundle, inside, outside, score[scored], correct[scored], len(truth)))

    floor = link_floor(final.duplicates.label_counts_)

    def threshold(skip: int | None) -> float | None:
        chosen = [fold for j, fold in enumerate(folds) if j != skip]
        choice = choose_threshold(
            np.concatenate([fold[3] for fold in chosen]),
            np.concatenate([fold[4] for fold in chosen]),
            placement="calibrated",
            n_positive=sum(fold[5] for fold in chosen),
        )
        return max(choice.threshold, floor) if choice.chosen else None

    evaluations = []
    for k, (bundle, inside, outside, *_rest) in enumerate(folds):
        result = _replay_fold(history, bundle, inside, outside, rank=rank, threshold=threshold(k), full=True)
        evaluations.append(
            evaluate_scored(
                config=config,
                batch=history.entered.iloc[inside].reset_index(drop=True),
                reference_ids=history.ids.iloc[outside],
                log=log,
                columns=result.columns,
                flags=result.flags,
                cell_scores=result.cell_scores,
                prefix="test",
            )
        )
    evaluation = combine_evaluations(evaluations, config, prefix="test")
    holdout = Holdout(
        batch=history.entered.iloc[order].reset_index(drop=True),
        reference=history.stored.iloc[:0].reset_index(drop=True),
        log=log,
    )
    return evaluation, holdout, Thresholds(duplicate=threshold(None)), {}


def _replay_fold(
    history: _History,
    bundle: ModelBundle,
    inside: np.ndarray,
    outside: np.ndarray,
    *,
    rank: np.ndarray,
    threshold: float | None,
    full: bool = False,
    windows: int = CV_WINDOWS,
) -> Any:
    """Scores a fold's records (`inside`, as entered, in entry order) in up to `windows` runs; before each
    run the matcher's index receives the other folds' records (as stored) entered before it, so a record
    is compared with what was there when it was typed, as in production. `rank` is each record's place in
    entry order. `threshold` (None: the model's own) is the duplicate threshold; `full` scores everything
    (`score_chunk` results), else only duplicates (the matcher's links: every best candidate when
    `threshold` is 0)."""
    if threshold is not None:
        bundle.duplicates.threshold_ = threshold
    batch = history.entered.iloc[inside].reset_index(drop=True)
    runs = [run for run in np.array_split(np.arange(len(inside)), min(windows, len(inside))) if len(run)]
    starts = [int(rank[inside[run[0]]]) for run in runs]
    outside_rank = rank[outside]
    matcher = bundle.duplicates.matcher(history.stored.iloc[outside[outside_rank < starts[0]]])
    # Running numbers are judged against every record entered before them, as in production: the other
    # folds' as stored and this fold's as entered, in entry order (the fold alone holds every k-th number).
    around = _around(history, inside, outside, rank) if full else None
    results = []
    for j, run in enumerate(runs):
        if j:
            between = outside[(outside_rank >= starts[j - 1]) & (outside_rank < starts[j])]
            if len(between):
                matcher.match(history.stored.iloc[between])
        chunk = batch.iloc[run]
        results.append(score_chunk(chunk, bundle, matcher, around) if full else matcher.match(chunk))
    if not full:
        return pd.concat(results)
    return ChunkResult(
        columns=pd.concat([r.columns for r in results]),
        flags=pd.concat([r.flags for r in results], ignore_index=True),
        cell_scores=pd.concat([r.cell_scores for r in results]),
    )


def _around(history: _History, inside: np.ndarray, outside: np.ndarray, rank: np.ndarray) -> Context:
    """The whole history in entry order around a fold (`_replay_fold`'s batch, labelled 0..n-1, as
    entered; the other records as stored), where the fold's running numbers find the records before them."""
    config = history.config
    names = [name for name in config.fields if name in history.entered.columns]
    columns = [*names, *([config.time_column] if config.time_column in history.entered.columns else [])]
    fold = history.entered.iloc[inside][columns].set_axis(np.arange(len(inside)))
    others = history.stored.iloc[outside][columns].set_axis(-1 - np.arange(len(outside)))
    in_entry_order = np.argsort(rank[np.concatenate([inside, outside])], kind="stable")
    every = pd.concat([fold, others]).iloc[in_entry_order]
    return Context.of(every, names, config.time_column)


def _numbers(prefix: str, figures: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in figures.items() if isinstance(v, int | float)}


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


class Stages:
    """Training's progress: each stage logged as it starts and as it ends with its seconds, CPU seconds and
    the process's peak memory so far (the CLI shows the log on stderr, `-q` hides it); `laps` keeps the
    seconds per stage for MLflow."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        logger.info("train: %s ...", what)
        started, cpu = time.perf_counter(), time.process_time()
        yield
        seconds = time.perf_counter() - started
        self.laps[name] = round(self.laps.get(name, 0.0) + seconds, 3)
        # What the stage freed goes back to the system, so the next stage's peak starts from what is kept.
        gc.collect()
        release_free_memory()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
        logger.info(
            "train: %s done in %.1f s (CPU %.1f s, peak %.0f MB, now %.0f MB)",
            what,
            seconds,
            time.process_time() - cpu,
            peak_mb,
            resident_mb(),
        )

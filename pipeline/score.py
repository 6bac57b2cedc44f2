"""Scoring: the pure chunk scorer, and the batch job that streams a file through it.

`score_chunk` is the core: one pandas chunk and the loaded model in, the contract's record columns and the
chunk's flags out. The same function serves the in-process batch job below, the MLflow pyfunc model and a
Spark `mapInPandas`. The only state it touches is the duplicate matcher's index, which grows by each
chunk so duplicates are found across chunk borders; the error model's running numbers take the state
the batch's earlier chunks left (`ErrorModel.running_numbers`) as an argument.
"""

from __future__ import annotations

import csv
import gc
import heapq
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import schema as s
from pipeline.anomalies import AnomalyModel
from pipeline.config import Config
from pipeline.detectors import Context, RunningNumbers, text_column
from pipeline.errors import ASSESS_ROWS, ErrorModel
from pipeline.exceptions import OutputError
from pipeline.ingest import (
    DEFAULT_CHUNK_ROWS,
    ReadOptions,
    SeenIds,
    check_unique_ids,
    file_digest,
    iter_table,
    require_columns,
)
from pipeline.memory import map_large_allocations, release_free_memory

if TYPE_CHECKING:  # not imported at run time: a `--workers` helper needs neither (nor dedupe, below them)
    from concurrent.futures import Executor

    from pipeline.bundle import ModelBundle
    from pipeline.reference import ReferenceCache
    from pipeline.report import FlagTally

logger = logging.getLogger(__name__)

# RFC 4180 line ends: with "\n" alone, the csv module leaves a value holding a lone "\r" unquoted, and it
# would read back as two rows.
CSV_LINE_END = "\r\n"
SCORE_COLUMNS = (s.DUPLICATE_SCORE, s.ERROR_SCORE, s.ANOMALY_SCORE)
HISTOGRAM_BINS = 20
FLAG_KIND_ORDER = {s.KIND_DUPLICATE: 0, s.KIND_ERROR: 1, s.KIND_ANOMALY: 2}
LINK_ROWS = 10_000  # rows `link_chunk` takes at a time (a Spark task's part)
# Rows the duplicate matcher takes at a time within them: its candidate and pair arrays grow with them (up to
# `window` candidates per rule and record before the `top_k` cut), ~100 MB per 10,000 rows once a long batch
# has filled its blocks; the links do not depend on it. A part's values are normalised, parsed, coded and
# compared once per distinct value (a customer's name, street and city repeat from order to order), so
# larger parts repeat less of that work: 10,000 rather than 5,000 took the duplicate stage on 200,000 rows
# from 10.7-11.3 to 9.8-10.4 CPU s in pairs under load (2,500 -> 5,000 had taken 15.2 -> 12.6 s).
MATCH_ROWS = 10_000
# Rows of a chunk assessed at a time with `--workers` > 1: half the parts `ErrorModel.assess` takes, since
# a piece's frames and the model's per-cell arrays grow with it: a helper peaked ~85 MB above its loaded
# model with 5,000-row pieces, ~50 MB with 2,500 (1,250: ~40 MB, 10% more CPU). The output is the same.
PIECE_ROWS = ASSESS_ROWS // 2
# Rows `score` reads at a time with `--workers` > 1 (`default_chunk_rows`), and training's held-out scoring:
# with helpers the job holds the chunk it links and those still in the helpers' hands, and returns a chunk's
# freed memory after it (400,000 rows of the 2M batch at --workers 2, under load: 771-777 MB RSS sum with
# 10,000-row chunks, 751 MB with 5,000, the same CPU within the noise). Larger chunks only hold more frames
# (at 200,000 rows, 50,000-row chunks peaked ~100 MB higher, no faster).
SCORE_CHUNK_ROWS = 5_000
# Flags `FlagRuns` holds before it writes a run: a few MB, about 75,000 rows of the demo batch.
RUN_FLAGS = 10_000


@dataclass
class ChunkResult:
    """The record columns (same index as the chunk), the flags (with the chunk's row label in `_row`) and
    the error probability of every checked cell (for evaluation)."""

    columns: pd.DataFrame
    flags: pd.DataFrame
    cell_scores: pd.DataFrame


def default_chunk_rows(workers: int) -> int:
    """The rows `score` reads at a time when not told: one matcher part (`MATCH_ROWS`) in one process, where
    the part's size is the duplicate stage's speed; `SCORE_CHUNK_ROWS` with `--workers` helpers, where the
    chunks in flight are the memory. The outputs do not depend on it."""
    return MATCH_ROWS if workers <= 1 else SCORE_CHUNK_ROWS


def fmt_score(values: pd.Series | np.ndarray) -> np.ndarray:
    """Scores as text with four decimals, clipped to 0..1, so outputs are stable byte for byte."""
    return np.char.mod("%.4f", np.clip(np.asarray(values, dtype=float), 0.0, 1.0)).astype(object)


def score_chunk(
    chunk: pd.DataFrame,
    bundle: ModelBundle,
    matcher: Any,
    numbers: RunningNumbers | Context | None = None,
) -> ChunkResult:
    """Scores one chunk of a batch (text cells, "" = missing) with a loaded model.

    `matcher` is `bundle.duplicates.matcher(reference)`; it remembers the chunk afterwards so the next
    chunk is compared with this one too. `numbers` is the running-number state the batch's earlier chunks
    left (`bundle.errors.running_numbers()` then `.then(bundle.errors.running_numbers(chunk))` per chunk;
    None: the chunk is the batch's start; a `Context` in training, see `ErrorModel.assess`). Equal to
    `assess_chunk(chunk, bundle, *link_chunk(...))`.
    """
    return assess_chunk(chunk, bundle, *link_chunk(chunk, bundle, matcher), numbers)


def link_chunk(
    chunk: pd.DataFrame, bundle: ModelBundle, matcher: Any
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The duplicate part of `score_chunk`, the only one with state (the matcher's index): the links and
    the field values of each linked row's match (None when no row is linked).

    The matcher takes the chunk `MATCH_ROWS` rows at a time: its links do not depend on where chunks are
    cut (tested), and its comparison arrays then stay small whatever the chunk size.
    """
    fields = bundle.config.check_fields
    parts = _match_parts(chunk)
    links, matched = [], []
    for part in parts:
        part_links = matcher.match(part)
        links.append(part_links)
        # Right after its match: the matcher may drop records no longer matchable at the next call.
        matched.append(_matched_values(part, part_links, matcher, fields))
    return _joined(parts, links, matched, fields)


def _match_parts(chunk: pd.DataFrame) -> list[pd.DataFrame]:
    """The chunk in the `MATCH_ROWS`-row parts the matcher takes (one empty part for an empty chunk)."""
    return [chunk.iloc[start : start + MATCH_ROWS] for start in range(0, len(chunk), MATCH_ROWS)] or [chunk]


def _joined(
    parts: list[pd.DataFrame],
    links: list[pd.DataFrame],
    matched: list[pd.DataFrame | None],
    fields: list[str],
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A chunk's links and matched values from its parts' (`link_chunk`'s result)."""
    if len(parts) == 1:
        return links[0], matched[0]
    if all(values is None for values in matched):
        return pd.concat(links), None
    filled = [
        pd.DataFrame(s.MISSING, index=part.index, columns=fields, dtype=object) if values is None else values
        for part, values in zip(parts, matched, strict=True)
    ]
    return pd.concat(links), pd.concat(filled)


class LinkAhead:
    """`link_chunk` of chunk after chunk, with a `PairHelper` process scoring each matcher part's pairs
    while this one indexes the next parts (`linkage.MatchAhead`): the same links and matched values, a
    chunk given back once all its parts are linked, up to `MatchAhead.AHEAD` parts behind (`finish`
    gives the rest).

    Needs record ids unique across the batch (as `run_batch` checks them). Without a helper, each chunk
    is linked at `submit`, as `link_chunk` links it.

    >>> # ahead = LinkAhead(bundle, matcher, helper)
    >>> # for chunk in chunks: for chunk, links, matched in ahead.submit(chunk): ...
    >>> # for chunk, links, matched in ahead.finish(): ...
    """

    def __init__(self, bundle: ModelBundle, matcher: Any, helper: Any = None) -> None:
        from pipeline.linkage import MatchAhead

        self.matcher = matcher
        self.fields = bundle.config.check_fields
        self.ahead = MatchAhead(matcher, helper)
        self.parts: deque[pd.DataFrame] = deque()  # put, links not yet back
        self.chunks: deque[tuple[pd.DataFrame, list[pd.DataFrame], list[Any], list[Any]]] = deque()

    def submit(self, chunk: pd.DataFrame) -> list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]]:
        """Takes a chunk; the chunks whose every part is linked by now, oldest first."""
        parts = _match_parts(chunk)
        self.chunks.append((chunk, parts, [], []))
        for part in parts:
            self.parts.append(part)
            self._take(self.ahead.put(part))
        return self._done()

    def finish(self) -> list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]]:
        """The chunks still waiting for links, linked."""
        self._take(self.ahead.finish())
        self.ahead.close()
        return self._done()

    def _take(self, linked: list[pd.DataFrame]) -> None:
        for part_links in linked:
            part = self.parts.popleft()
            chunk = next(pending for pending in self.chunks if len(pending[2]) < len(pending[1]))
            chunk[2].append(part_links)
            # Before the next `put`: the matcher then drops records no longer matchable.
            chunk[3].append(_matched_values(part, part_links, self.matcher, self.fields))

    def _done(self) -> list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]]:
        done = []
        while self.chunks and len(self.chunks[0][2]) == len(self.chunks[0][1]):
            chunk, parts, links, matched = self.chunks.popleft()
            done.append((chunk, *_joined(parts, links, matched, self.fields)))
        return done


@dataclass(frozen=True)
class AssessModel:
    """What `assess_chunk` uses of a bundle (`ModelBundle` has the same attributes): all a `--workers`
    helper is sent, so it neither loads the duplicate model nor imports the modules behind it."""

    config: Config
    errors: ErrorModel
    anomalies: AnomalyModel


def assess_chunk(
    chunk: pd.DataFrame,
    bundle: ModelBundle | AssessModel,
    links: pd.DataFrame,
    matched: pd.DataFrame | None,
    numbers: RunningNumbers | Context | None = None,
) -> ChunkResult:
    """The stateless rest of `score_chunk`: errors and anomalies of the chunk, given its links and the
    running-number state before it; what `--workers` processes share, piece by piece (`_Scorer`)."""
    config = bundle.config
    id_column = config.id_column
    cell_scores, cell_flags = bundle.errors.assess(chunk, matched, numbers=numbers)
    anomalies = bundle.anomalies.score(chunk)

    error_fields = pd.Series(s.MISSING, index=chunk.index, dtype=object)
    error_score = pd.Series(0.0, index=chunk.index)
    if len(cell_flags):
        by_row = cell_flags.groupby("row", sort=False)
        error_fields.loc[by_row.groups.keys()] = by_row["field"].agg(s.ERROR_FIELD_SEPARATOR.join)
        error_score.loc[by_row.groups.keys()] = by_row["score"].max()
    # The error score is the highest cell score even below the flag threshold, so a clerk can sort by it.
    if cell_scores.shape[1]:
        error_score = np.maximum(error_score, cell_scores.max(axis=1))

    is_duplicate = links[s.DUPLICATE_OF] != s.MISSING
    needs_review = is_duplicate | (error_fields != s.MISSING) | anomalies["flagged"].astype(bool)
    columns = pd.DataFrame(
        {
            s.DUPLICATE_OF: links[s.DUPLICATE_OF].to_numpy(),
            s.DUPLICATE_SCORE: fmt_score(links[s.DUPLICATE_SCORE]),
            s.CLUSTER_ID: links[s.CLUSTER_ID].to_numpy(),
            s.ERROR_FIELDS: error_fields.to_numpy(),
            s.ERROR_SCORE: fmt_score(error_score),
            s.ANOMALY_SCORE: fmt_score(anomalies[s.ANOMALY_SCORE]),
            s.NEEDS_REVIEW: np.where(needs_review, "true", "false").astype(object),
        },
        index=chunk.index,
    )

    ids = chunk[id_column]
    duplicate_flags = pd.DataFrame(
        {
            "_row": chunk.index[is_duplicate],
            s.FLAG_RECORD_ID: ids[is_duplicate].to_numpy(),
            s.FLAG_KIND: s.KIND_DUPLICATE,
            s.FLAG_FIELD: s.MISSING,
            s.FLAG_VALUE: s.MISSING,
            s.FLAG_SUGGESTION: s.MISSING,
            s.FLAG_MATCH_ID: links.loc[is_duplicate, s.DUPLICATE_OF].to_numpy(),
            s.FLAG_SCORE: links.loc[is_duplicate, s.DUPLICATE_SCORE].to_numpy(dtype=float),
            s.FLAG_REASON: links.loc[is_duplicate, "reason"].to_numpy(),
            s.FLAG_SUGGEST_EMPTY: "false",
        }
    )
    error_flags = pd.DataFrame(
        {
            "_row": cell_flags["row"].to_numpy(),
            s.FLAG_RECORD_ID: ids.loc[cell_flags["row"]].to_numpy(),
            s.FLAG_KIND: s.KIND_ERROR,
            s.FLAG_FIELD: cell_flags["field"].to_numpy(),
            s.FLAG_VALUE: cell_flags["value"].to_numpy(),
            s.FLAG_SUGGESTION: cell_flags["suggestion"].to_numpy(),
            s.FLAG_MATCH_ID: s.MISSING,
            s.FLAG_SCORE: cell_flags["score"].to_numpy(dtype=float),
            s.FLAG_REASON: cell_flags["reason"].to_numpy(),
            s.FLAG_SUGGEST_EMPTY: np.where(
                cell_flags[s.FLAG_SUGGEST_EMPTY].to_numpy(dtype=bool), "true", "false"
            ).astype(object),
        }
    )
    flagged = anomalies["flagged"].astype(bool)
    anomaly_flags = pd.DataFrame(
        {
            "_row": chunk.index[flagged],
            s.FLAG_RECORD_ID: ids[flagged].to_numpy(),
            s.FLAG_KIND: s.KIND_ANOMALY,
            s.FLAG_FIELD: s.MISSING,
            s.FLAG_VALUE: s.MISSING,
            s.FLAG_SUGGESTION: s.MISSING,
            s.FLAG_MATCH_ID: s.MISSING,
            s.FLAG_SCORE: anomalies.loc[flagged, s.ANOMALY_SCORE].to_numpy(dtype=float),
            s.FLAG_REASON: anomalies.loc[flagged, "reason"].to_numpy(),
            s.FLAG_SUGGEST_EMPTY: "false",
        }
    )
    parts = [frame for frame in (duplicate_flags, error_flags, anomaly_flags) if len(frame)]
    flags = pd.concat(parts, ignore_index=True) if parts else empty_flags()
    return ChunkResult(columns=columns, flags=flags, cell_scores=cell_scores)


def empty_flags() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=object) for name in ("_row", *s.FLAG_COLUMNS)})


def _matched_values(
    chunk: pd.DataFrame, links: pd.DataFrame, matcher: Any, fields: list[str]
) -> pd.DataFrame | None:
    """The field values of the record each row duplicates ("" where none), for the error model: its link's
    (`duplicate_of`), except where one of the reference records it duplicates (at its link's
    `REFERENCE_DUPLICATE_POSITIONS`) holds the row's own value: then that value, entered alike in a
    duplicate, so not judged a slip. A re-registration linked to an earlier re-registration of the same
    order, whose number has its own slip, keeps the original's number, and the original is among those
    reference records."""
    has_match = (links[s.DUPLICATE_OF] != s.MISSING).to_numpy()
    if not has_match.any():
        return None
    records = matcher.records_at(links[s.DUPLICATE_POSITION].to_numpy()[has_match])
    columns = {}
    for name in fields:
        column = np.full(len(chunk), s.MISSING, dtype=object)
        column[has_match] = records.get(name, s.MISSING)
        columns[name] = column
    _take_alike_values(columns, chunk, links, matcher)
    return pd.DataFrame(columns, index=chunk.index, columns=fields, dtype=object)


def _take_alike_values(
    columns: dict[str, np.ndarray], chunk: pd.DataFrame, links: pd.DataFrame, matcher: Any
) -> None:
    """Writes into `columns` (per field, the matched value of each row) the row's own value wherever a
    record at its link's `REFERENCE_DUPLICATE_POSITIONS` holds it too (compared as text, as the error
    model compares)."""
    others = links[s.REFERENCE_DUPLICATE_POSITIONS].to_numpy(dtype=object)
    counts = np.fromiter(map(len, others), dtype=np.int64, count=len(others))
    if not counts.any():
        return
    rows = np.repeat(np.arange(len(others)), counts)
    records = matcher.records_at([other for positions in others[counts > 0] for other in positions])
    for name, column in columns.items():
        if name not in chunk.columns or name not in records:
            continue
        own = text_column(chunk, name).to_numpy(dtype=object)[rows]
        alike = (own == np.asarray(records[name], dtype=object)) & (own != s.MISSING)
        column[rows[alike]] = own[alike]


def score_frame(
    frame: pd.DataFrame, bundle: ModelBundle, reference: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Scores a whole in-memory batch: the input columns followed by the contract's record columns."""
    matcher = bundle.duplicates.matcher(reference)
    result = score_chunk(frame, bundle, matcher)
    return pd.concat([frame, result.columns], axis=1)


def sort_flags(flags: pd.DataFrame) -> pd.DataFrame:
    """Highest score first; ties by input row, then kind and field, so reruns are byte-identical."""
    if flags.empty:
        return flags
    flags = flags.assign(_kind=flags[s.FLAG_KIND].map(FLAG_KIND_ORDER))
    flags = flags.sort_values(
        [s.FLAG_SCORE, "_row", "_kind", s.FLAG_FIELD], ascending=[False, True, True, True], kind="stable"
    )
    return flags.drop(columns="_kind").reset_index(drop=True)


# --------------------------------------------------------------------------------------------- batch job


_WORKER_MODEL: tuple[Path, AssessModel] | None = None  # a helper's model and the file it came from


def start_helpers(workers: int) -> Executor | None:
    """The `workers - 1` helper processes of a `run_batch(workers=)` job, started now; None for one worker.

    On Linux, helpers are forked from this process, so call it before the models load (the `score` command
    does, right after its imports): a forked helper counts in its resident set the memory this process
    holds at that moment, plus only those pages of the libraries it then runs, where a spawned helper
    imports everything again and holds every library page its imports touched (scoring 2,000,000 rows,
    80% in: a helper 243 MB against 316, and no 13 MB resource-tracker process beside it). Objects that
    exist now are frozen across the fork, so a helper's collector passes leave their pages shared.
    Elsewhere the helpers are spawned. Either way they get their model with the first piece they assess
    (`_Scorer`). Hand the result to `run_batch(helpers=)`; shut it down if the job never starts.
    """
    if workers <= 1:
        return None
    if sys.platform != "linux":  # fork is unsafe on macOS and absent on Windows
        return _helper_pool(workers, "spawn")
    pool = _helper_pool(workers, "fork")
    gc.freeze()
    try:
        pool.submit(os.getpid).result()  # with fork: every helper is forked at the first task
    finally:
        gc.unfreeze()
    return pool


def _helper_pool(workers: int, method: str) -> Executor:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        workers - 1, mp_context=multiprocessing.get_context(method), initializer=_start_worker
    )


def _start_worker() -> None:
    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked helper inherits the CLI's handler
    threadpool_limits(1)  # one core per process; the processes are the parallelism
    map_large_allocations()
    logging.getLogger().setLevel(logging.WARNING)


def _assess_in_worker(
    model: Path,
    chunk: pd.DataFrame,
    links: pd.DataFrame,
    matched: pd.DataFrame | None,
    numbers: RunningNumbers,
) -> ChunkResult:
    global _WORKER_MODEL
    if _WORKER_MODEL is None or _WORKER_MODEL[0] != model:
        _WORKER_MODEL = None  # the last job's model is freed before the next one loads
        _WORKER_MODEL = (model, pickle.loads(model.read_bytes()))
    result = assess_chunk(chunk, _WORKER_MODEL[1], links, matched, numbers)
    release_free_memory()
    return result


class _Piece:
    """Rows of a linked chunk to assess (what `assess_chunk` takes after the model) and, once handed to a
    helper process, its future."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.future: Any = None
        self.result: ChunkResult | None = None

    def done(self) -> bool:
        return self.result is not None or (self.future is not None and self.future.done())

    def queued(self) -> bool:
        """Handed to a helper and not finished (perhaps not started)."""
        return self.result is None and self.future is not None and not self.future.done()

    def get(self) -> ChunkResult:
        return self.result if self.result is not None else self.future.result()


class _Pending:
    """A linked chunk and its pieces, in row order."""

    def __init__(self, chunk: pd.DataFrame, pieces: list[_Piece]) -> None:
        self.chunk, self.pieces = chunk, pieces

    def done(self) -> bool:
        return all(piece.done() for piece in self.pieces)

    def result(self) -> ChunkResult:
        parts = [piece.get() for piece in self.pieces]
        if len(parts) == 1:
            return parts[0]
        flags = [part.flags for part in parts if len(part.flags)]
        return ChunkResult(
            columns=pd.concat([part.columns for part in parts]),
            flags=pd.concat(flags, ignore_index=True) if flags else empty_flags(),
            cell_scores=pd.concat([part.cell_scores for part in parts]),
        )


class _Scorer:
    """Scores chunks in input order, with `workers` processes in all (this one included).

    This process matches duplicates (the matcher's index and the running numbers are sequential state).
    Errors and anomalies need neither: each linked chunk is cut into `PIECE_ROWS`-row pieces, each with
    the running-number state before it, and the pieces go to `workers - 1` helper processes and to this
    one, which assesses pieces itself while more are queued than the helpers finish while it matches the
    next chunk (timed as it goes). So both cores stay busy, and only one model copy is loaded per extra
    core. A piece scores as it would within its chunk (a row's result depends on its row, its match and
    the running numbers before it only), so the output is the same byte for byte. Results come back in
    submission order.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        matcher: Any,
        workers: int,
        helpers: Executor | None = None,
        pair_helper: Any = None,
    ) -> None:
        self.bundle, self.matcher, self.workers = bundle, matcher, workers
        self.numbers = bundle.errors.running_numbers()
        # With one process: chunks linked by a `LinkAhead`, a few matcher parts behind with a `PairHelper`.
        self.linker = LinkAhead(bundle, matcher, pair_helper) if workers == 1 else None
        self.linked: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]] = []
        self.pool: Any = None
        self.model: Path | None = None  # the helpers' model, pickled once: each loads it with its first piece
        self.chunks: deque[_Pending] = deque()  # in submission order, not yet yielded
        self.todo: deque[_Piece] = deque()  # pieces not started, oldest first
        self.link_seconds = 0.0  # this process's CPU seconds to match the latest chunk
        self.piece_seconds = 0.0  # and to assess one piece (a running mean)
        if workers > 1:
            # Spawned here unless the caller started them earlier (`start_helpers`): by now this process
            # holds the models and the prepared reference, which forked helpers would count as theirs.
            self.pool = helpers if helpers is not None else _helper_pool(workers, "spawn")
            # The duplicate model stays here (its dedupe comparators do not pickle; helpers need none).
            handle, name = tempfile.mkstemp(prefix="pipeline-assess-", suffix=".pkl")
            self.model = Path(name)
            try:
                with os.fdopen(handle, "wb") as fh:
                    sent = AssessModel(bundle.config, bundle.errors, bundle.anomalies)
                    pickle.dump(sent, fh, pickle.HIGHEST_PROTOCOL)
            except BaseException:
                self.close()
                raise

    def submit(self, chunk: pd.DataFrame) -> Iterator[tuple[pd.DataFrame, ChunkResult]]:
        """Takes a chunk; yields the chunks (with results) that are done, oldest first."""
        if self.linker is not None:
            yield from self._assess_linked(self.linker.submit(chunk))
            return
        started = time.process_time()
        links, matched = link_chunk(chunk, self.bundle, self.matcher)
        self.link_seconds = time.process_time() - started
        pieces = []
        for start in range(0, len(chunk), PIECE_ROWS):
            rows = slice(start, start + PIECE_ROWS)
            part = chunk.iloc[rows]
            parted = None if matched is None else matched.iloc[rows]
            pieces.append(_Piece((part, links.iloc[rows], parted, self.numbers)))
            self.numbers = self.numbers.then(self.bundle.errors.running_numbers(part))
        self.chunks.append(_Pending(chunk, pieces))
        self.todo.extend(pieces)
        # Help while more is queued than the helpers finish during the next chunk's matching.
        while self.todo and len(self.todo) + self._queued() > self._reserve():
            self._feed()
            if self.todo:
                self._assess_here(self.todo.popleft())
        self._feed(everything=True)
        while self.chunks and self.chunks[0].done():
            done = self.chunks.popleft()
            yield done.chunk, done.result()

    def _queued(self) -> int:
        return sum(piece.queued() for pending in self.chunks for piece in pending.pieces)

    def _reserve(self) -> int:
        """Pieces to leave to the helpers: what they assess while this process matches a chunk."""
        if not self.piece_seconds:
            return 0
        pieces = self.link_seconds / self.piece_seconds * (self.workers - 1)
        return min(math.ceil(pieces), 2 * math.ceil(DEFAULT_CHUNK_ROWS / PIECE_ROWS))

    def _feed(self, *, everything: bool = False) -> None:
        """Hands queued pieces to the helpers: up to two each (so none waits for the next), or all."""
        queued = self._queued()
        while self.todo and (everything or queued < 2 * (self.workers - 1)):
            piece = self.todo.popleft()
            piece.future = self.pool.submit(_assess_in_worker, self.model, *piece.args)
            queued += 1

    def _assess_here(self, piece: _Piece) -> None:
        started = time.process_time()
        piece.result = assess_chunk(piece.args[0], self.bundle, *piece.args[1:])
        seconds = time.process_time() - started
        self.piece_seconds = 0.8 * self.piece_seconds + 0.2 * seconds if self.piece_seconds else seconds

    def _assess_linked(
        self, linked: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]]
    ) -> Iterator[tuple[pd.DataFrame, ChunkResult]]:
        """Assesses linked chunks here, in order (what `score_chunk` does after `link_chunk`)."""
        for chunk, links, matched in linked:
            before = self.numbers
            self.numbers = before.then(self.bundle.errors.running_numbers(chunk))
            yield chunk, assess_chunk(chunk, self.bundle, links, matched, before)

    def drop_matcher(self) -> None:
        """Lets go of the duplicate matcher once every chunk is submitted (`finish` needs none): the
        chunks still waiting for their links are linked first."""
        if self.linker is not None:
            self.linked = self.linker.finish()
            self.linker = None
        self.matcher = None

    def finish(self) -> Iterator[tuple[pd.DataFrame, ChunkResult]]:
        """Yields the chunks still in flight. With nothing left to match, this process takes back the
        pieces no helper has started, newest first, while the helpers work from the oldest."""
        if self.linker is not None:  # not dropped: link what is left here
            self.linked, self.linker = self.linker.finish(), None
        linked, self.linked = self.linked, []
        yield from self._assess_linked(linked)
        queued = [piece for pending in self.chunks for piece in pending.pieces if piece.queued()]
        for piece in reversed(queued):
            if piece.future.cancel():
                piece.future = None
                self._assess_here(piece)
        while self.chunks:
            done = self.chunks.popleft()
            yield done.chunk, done.result()

    def close(self) -> None:
        if self.pool is not None:
            for pending in self.chunks:
                for piece in pending.pieces:
                    if piece.future is not None:
                        piece.future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.model is not None:
            self.model.unlink(missing_ok=True)
            self.model = None


class FlagRuns:
    """The batch's flags, spilled to disk in sorted runs of about `run_flags` flags (whole chunks) and
    merged at the end (k-way), so the job holds a few thousand flags at a time and a long batch in small
    chunks still opens few files at the merge. The order is `sort_flags`' on all flags at once: highest
    score first, then input row, kind and field (no two flags tie on all four, so the merge is exact).

    >>> # runs = FlagRuns(folder); runs.add(chunk_flags); ...; runs.merge_into(folder / "flags.csv", tally)
    """

    def __init__(self, folder: Path, run_flags: int = RUN_FLAGS) -> None:
        self.folder = Path(folder)
        self.run_flags = run_flags
        self.paths: list[Path] = []
        self.pending: list[pd.DataFrame] = []
        self.pending_flags = 0

    def add(self, flags: pd.DataFrame) -> None:
        """Takes one chunk's flags (with `_row`); writes a run once `run_flags` are held."""
        if not len(flags):
            return
        self.pending.append(flags)
        self.pending_flags += len(flags)
        if self.pending_flags >= self.run_flags:
            self._spill()

    def _spill(self) -> None:
        """Writes the held flags as one sorted run; scores keep every bit (`repr`)."""
        if not self.pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        held = self.pending[0] if len(self.pending) == 1 else pd.concat(self.pending, ignore_index=True)
        self.pending, self.pending_flags = [], 0
        ordered = sort_flags(held)
        ordered = ordered.assign(**{s.FLAG_SCORE: [repr(float(v)) for v in ordered[s.FLAG_SCORE]]})
        path = self.folder / f"run-{len(self.paths):06d}.csv"
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator=CSV_LINE_END)
            writer.writerows(ordered[["_row", *s.FLAG_COLUMNS]].itertuples(index=False, name=None))
        self.paths.append(path)

    def merge_into(self, path: Path, tally: FlagTally | None = None) -> int:
        """Writes flags.csv (header, then every run merged in order, scores as `fmt_score` prints them);
        removes the runs. Each flag written is counted into `tally`, if given. Returns the number of
        flags."""
        score_at = 1 + s.FLAG_COLUMNS.index(s.FLAG_SCORE)
        kind_at = 1 + s.FLAG_COLUMNS.index(s.FLAG_KIND)
        field_at = 1 + s.FLAG_COLUMNS.index(s.FLAG_FIELD)
        self._spill()

        def key(row: list[str]) -> tuple[Any, ...]:
            score = float(row[score_at])
            missing = math.isnan(score)  # NaN last, as pandas sorts it
            return (
                missing,
                0.0 if missing else -score,
                int(row[0]),
                FLAG_KIND_ORDER[row[kind_at]],
                row[field_at],
            )

        def read(run: Path) -> Any:
            with open(run, encoding="utf-8", newline="") as fh:
                yield from csv.reader(fh)

        count = 0
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator=CSV_LINE_END)
            writer.writerow(s.FLAG_COLUMNS)
            for row in heapq.merge(*(read(run) for run in self.paths), key=key):
                out = row[1:]
                out[score_at - 1] = f"{min(max(float(out[score_at - 1]), 0.0), 1.0):.4f}"
                writer.writerow(out)
                if tally is not None:
                    tally.add(out, int(row[0]))
                count += 1
        shutil.rmtree(self.folder, ignore_errors=True)
        return count


def prepare_output(output: Path, *, overwrite: bool) -> Path:
    """Checks the output folder can be written and returns a fresh temporary folder beside it."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: output folder exists already; choose another or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder")
    parent = output.parent if str(output.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=parent))
    except OSError as exc:
        raise OutputError(f"{output}: cannot write here ({exc.strerror})") from None


def publish(staging: Path, output: Path) -> None:
    """Moves the finished staging folder into place; an old folder (with --overwrite) goes only after."""
    output = Path(output)
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_batch(
    bundle: ModelBundle,
    input_path: Path,
    output: Path,
    *,
    reference_path: Path | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    output_format: str = "csv",
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    cache: ReferenceCache | None = None,
    helpers: Executor | None = None,
    pair_helper: bool = False,
) -> dict[str, Any]:
    """Scores a batch file into `output` (records, flags, summary), atomically. Returns the summary.

    With `workers` > 1, this process matches duplicates (the index is sequential) and shares errors and
    anomalies with `workers - 1` helper processes (`_Scorer`), the same output byte for byte. With `cache`,
    the reference's prepared state (`pipeline.reference`) is loaded from there when this model scored against
    the same reference bytes before, and stored there otherwise; the output is the same byte for byte.
    `helpers`: the helper processes from `start_helpers(workers)`, started before the models loaded (else
    they are spawned here); shut down when the job is done with them. `chunk_rows`: rows read at a time
    (default `default_chunk_rows(workers)`; the output does not depend on it). `pair_helper` (with one
    worker only; where fork exists): a `linkage.PairHelper` process scores the duplicate candidate pairs
    while this one indexes the next matcher parts; the same output byte for byte (`score --pair-helper`).
    Off by default: forked after the models load, it added ~220 MB (PSS) at 200,000 rows. On an idle
    second core the duplicate stage alone took 5.6-5.8 s instead of 8.6-9.4 s (CPU +0.3-1.0 s); on a busy
    machine it was slower (~20% more CPU seconds).
    """
    from pipeline.reference import prepare_reference
    from pipeline.report import build_summary, write_report

    started = time.perf_counter()
    chunk_rows = chunk_rows or default_chunk_rows(workers)
    config = bundle.config
    options = ReadOptions.from_config(config)
    staging = prepare_output(output, overwrite=overwrite)
    scorer: _Scorer | None = None
    helper = None
    try:
        if pair_helper and workers <= 1:
            from pipeline.linkage import PairHelper

            # Forked now, before the reference is indexed: it shares the loaded model and holds no index.
            helper = PairHelper(bundle.duplicates) if PairHelper.available() else None
        reference_rows = 0
        # Ids of the reference and of every chunk so far, as hashes (a batch of millions of ids as
        # strings in a set was a few hundred MB).
        seen_ids = SeenIds()
        if reference_path is not None:
            # The error model's lookups also know customers added after training; the matcher indexes
            # the reference. Both are loaded from `cache` when this model saw these reference bytes.
            prepared = prepare_reference(bundle, reference_path, options=options, cache=cache)
            bundle = replace(bundle, errors=prepared.errors)
            matcher, reference_rows = prepared.matcher, prepared.rows
            seen_ids.add(prepared.ids)
            del prepared
        else:
            matcher = bundle.duplicates.matcher(None, evict=True)
        # What scoring reads of the anomaly model, here and in each `--workers` helper (the loaded one is
        # freed: the caller hands the bundle over).
        bundle = replace(bundle, anomalies=bundle.anomalies.for_scoring())
        runs = FlagRuns(staging / ".flag-runs")
        scorer = _Scorer(bundle, matcher, workers, helpers, helper)
        rows = 0
        columns: list[str] | None = None
        histograms = {name: np.zeros(HISTOGRAM_BINS, dtype=int) for name in SCORE_COLUMNS}
        records_path = staging / s.RECORDS_FILE
        with open(records_path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator=CSV_LINE_END)
            for chunk in iter_table(input_path, chunk_rows=chunk_rows, options=options):
                if columns is None:
                    columns = list(chunk.columns)
                    required = [config.id_column, *config.fields]
                    require_columns(chunk, required, source=input_path, what="configured")
                    for name in s.RECORD_COLUMNS:
                        if name in columns:
                            raise OutputError(f"{input_path}: input already has an output column {name!r}")
                    writer.writerow([*columns, *s.RECORD_COLUMNS])
                check_unique_ids(
                    chunk[config.id_column],
                    source=input_path,
                    id_column=config.id_column,
                    seen=seen_ids,
                )
                if len(chunk):
                    for done, result in scorer.submit(chunk):
                        rows += _write_chunk(done, result, writer, runs, histograms, progress)
                    release_free_memory()
            # Every row is linked (the pieces still to assess carry their matches): the duplicate index
            # and the ids seen, a long batch's largest parts, are freed before this process assesses the
            # last pieces beside the helpers, where a 600,000-row batch peaked.
            del seen_ids, matcher
            scorer.drop_matcher()
            if helper is not None:
                helper.close()
                helper = None
            release_free_memory()
            for done, result in scorer.finish():
                rows += _write_chunk(done, result, writer, runs, histograms, progress)
        scorer.close()
        scorer = None
        flags = finish_flags(runs, staging, output_format)
        summary = build_summary(
            bundle,
            flags=flags,
            rows=rows,
            input_path=input_path,
            input_digest=file_digest(input_path),
            reference_rows=reference_rows,
            reference_path=reference_path,
            seconds=time.perf_counter() - started,
        )
        write_report(summary, flags, histograms, staging)
        publish(staging, output)
    except BaseException:
        if scorer is not None:
            scorer.close()
        if helper is not None:
            helper.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _write_chunk(
    chunk: pd.DataFrame,
    result: ChunkResult,
    writer: Any,
    runs: FlagRuns,
    histograms: dict[str, np.ndarray],
    progress: Callable[[int], None] | None,
) -> int:
    """Appends a scored chunk to records.csv, its flags to the runs and its scores to the histograms."""
    # Column by column as NumPy object arrays, zipped into rows: `itertuples` walks Arrow-backed text
    # element by element (5x slower).
    columns = [
        frame.iloc[:, j].to_numpy(dtype=object)
        for frame in (chunk, result.columns)
        for j in range(frame.shape[1])
    ]
    writer.writerows(zip(*columns, strict=True))
    runs.add(result.flags)
    for name in SCORE_COLUMNS:
        values = result.columns[name].to_numpy(dtype=float)
        histograms[name] += np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]
    if progress is not None:
        progress(len(chunk))
    logger.info("scored %d rows", int(chunk.index[-1]) + 1)
    return len(chunk)


def finish_flags(runs: FlagRuns, staging: Path, output_format: str) -> FlagTally:
    """After a batch's last chunk (the batch job's and Spark's): flags.csv merged from the runs and, with
    `output_format` "parquet", records.csv and flags.csv copied to Parquet; what the summary and report
    count of the flags. Streamed: nothing is held per flag, and per input row a bit in the tally (at
    2,000,000 rows, reading the flags back as a frame and counting them took ~200 MB)."""
    from pipeline.report import FlagTally

    tally = FlagTally()
    runs.merge_into(staging / s.FLAGS_FILE, tally)
    if output_format == "parquet":
        for name in (s.RECORDS_FILE, s.FLAGS_FILE):
            csv_to_parquet(staging / name, (staging / name).with_suffix(".parquet"))
    return tally


def csv_to_parquet(source: Path, target: Path) -> None:
    """A CSV file written here (a header, then text cells) as Parquet, all text, streamed in chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for chunk in pd.read_csv(source, dtype=str, keep_default_na=False, chunksize=DEFAULT_CHUNK_ROWS):
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(target, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()

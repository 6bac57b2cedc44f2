"""The entry-time check: an HTTP service that checks records as they are typed (CONTRACT section 5).

`python -m pipeline serve --model models:/orders@champion --reference history.csv` loads the model and the
reference once and answers

* `POST /check` with `{"records": [{...}, ...], "remember": false}`: one result per record, in order, with
  `duplicate_of`, `duplicate_score`, `needs_review` and `flags` (objects with the columns of `flags.csv`),
  computed by the batch job's own core, `score.score_chunk`: the same records against the same reference
  give the same flags as `score`. With `"remember": true` the records join the index, so the next entry
  is checked against them too; without it the index is left as it was.
* `GET /health`: 200 with the model name and version served.

Given `models:/NAME@alias` it polls the alias and, when it moves, loads the new version in the background
and swaps it in whole: a request finishes on the model it started with. Records remembered since start are
carried over to the new version's index. Bad input is answered with a 4xx and one line; it never stops the
service. Logs hold counts and timings, never record values.

>>> # checker = Checker("models:/orders@champion", reference_path=Path("history.csv"))
>>> # checker.check({"records": [{"record_id": "", "customer_code": "C-1", ...}]})["results"][0]["flags"]
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import schema as s
from pipeline.bundle import ModelBundle
from pipeline.config import Config
from pipeline.exceptions import BadInputError, RequestError
from pipeline.ingest import check_unique_ids, read_table, require_columns
from pipeline.score import fmt_score, score_chunk, sort_flags

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8780
DEFAULT_POLL_SECONDS = 30.0
DEFAULT_MAX_BODY_BYTES = 1_000_000
DEFAULT_MAX_RECORDS = 1000
# Ids given to records checked without one (and to records whose id is already indexed, while checked).
UNSAVED_PREFIX = "unsaved-"
CHECKING_PREFIX = "checking-"


@dataclass
class Served:
    """One loaded model version and its duplicate index; replaced whole when the registry alias moves."""

    bundle: ModelBundle
    matcher: Any
    info: dict[str, str]
    loaded_at: str = field(default_factory=lambda: datetime.now().astimezone().isoformat(timespec="seconds"))


class _RequestMatcher:
    """The served matcher as `score_chunk` sees it for one request: it matches with or without remembering,
    and knows the values of the request's own records (which a check without remembering does not index)."""

    def __init__(
        self, matcher: Any, own: dict[str, dict[str, str]], id_column: str, *, remember: bool
    ) -> None:
        self._matcher = matcher
        self._own = own
        self._id_column = id_column
        self._remember = remember
        self._first = 0  # the index position of the latest matched chunk's first row
        self._rows: list[dict[str, str]] = []  # that chunk's rows' own values, in order

    def match(self, chunk: pd.DataFrame) -> pd.DataFrame:
        self._first = len(self._matcher)
        self._rows = [self._own[record_id] for record_id in chunk[self._id_column]]
        return self._matcher.match(chunk, remember=self._remember)

    def records_at(self, positions: Sequence[int]) -> dict[str, list[str]]:
        """`Matcher.records_at` for the request: a position from the latest matched chunk's first on is one
        of its rows (indexed in row order, and taken out again by a check without remembering), whose
        values come from the request."""
        positions = [int(position) for position in positions]
        values = self._matcher.records_at([p if p < self._first else -1 for p in positions])
        for i, position in enumerate(positions):
            if position >= self._first:
                for name, value in self._rows[position - self._first].items():
                    values[name][i] = value
        return values


class Checker:
    """The service without HTTP: the served model, the reference, the records remembered since start.

    `check` is safe to call from many threads: scoring runs one request at a time (the GIL would serialise
    it anyway, and scikit-learn's thread limits are process-wide), remembering and swapping take turns.
    """

    def __init__(
        self,
        model: str,
        *,
        reference_path: Path | None = None,
        tracking_uri: str | None = None,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self.model = model
        self.reference_path = reference_path
        self.tracking_uri = tracking_uri
        self.max_records = max_records
        self.follows = model.startswith("models:/") and "@" in model
        self._score_lock = threading.Lock()
        self._remember_lock = threading.Lock()
        self._remembered: list[pd.DataFrame] = []
        self._reference = read_table(reference_path) if reference_path is not None else None
        self.last_poll_error = ""
        self.served = self._load(model)
        if not self.follows:
            self._reference = None  # never rebuilt: the matcher's index is all that is needed

    # ------------------------------------------------------------------------------------------ loading

    def _load(self, model: str, info: dict[str, str] | None = None) -> Served:
        """Loads a model version and indexes the reference and the remembered records for it."""
        from pipeline.registry import load_bundle

        started = time.perf_counter()
        bundle = load_bundle(model, uri=self.tracking_uri)
        config = bundle.config
        reference = self._reference
        if reference is not None:
            source = self.reference_path
            require_columns(reference, config.required_columns(), source=source, what="configured")
            check_unique_ids(reference[config.id_column], source=source, id_column=config.id_column)
            # The error model's lookups also know customers added after training (as `score` does).
            bundle = replace(bundle, errors=bundle.errors.with_reference(reference))
        with self._remember_lock:
            remembered = list(self._remembered)
        frames = [frame for frame in (reference, *remembered) if frame is not None and len(frame)]
        indexed = pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames or [None])[0]
        matcher = bundle.duplicates.matcher(indexed)
        source = dict(bundle.source) if info is None else {**bundle.source, **info, "uri": self.model}
        served = Served(
            bundle=bundle,
            matcher=matcher,
            info={key: str(source.get(key, "")) for key in ("uri", "name", "version", "run_id")},
        )
        served.info["name"] = served.info["name"] or config.name
        # Records remembered while this version was loading join its index before it is served.
        with self._remember_lock, self._score_lock:
            for chunk in self._remembered[len(remembered) :]:
                matcher.match(chunk)
            self.served = served
        logger.info(
            "serving %s version %s: %d records indexed in %.1f s",
            served.info["name"],
            served.info["version"] or "(local)",
            len(matcher),
            time.perf_counter() - started,
        )
        return served

    def refresh(self) -> bool:
        """Loads and swaps in the version the followed alias points at, if it moved. True if it swapped."""
        from pipeline.registry import resolve_model

        if not self.follows:
            return False
        info = resolve_model(self.model, uri=self.tracking_uri)
        if info["version"] == self.served.info["version"]:
            return False
        logger.info("%s moved to version %s; loading it", self.model, info["version"])
        self._load(info["download_uri"], info)
        return True

    # ----------------------------------------------------------------------------------------- checking

    def check(self, payload: Any) -> dict[str, Any]:
        """Checks the records of one request; raises `RequestError` (with the HTTP status) for bad input."""
        if not isinstance(payload, dict):
            raise RequestError('body must be a JSON object like {"records": [{...}]}')
        unknown = sorted(set(payload) - {"records", "remember"})
        if unknown:
            raise RequestError(f"unknown key {unknown[0]!r} in the body; send only 'records' and 'remember'")
        remember = payload.get("remember", False)
        if not isinstance(remember, bool):
            raise RequestError("'remember' must be true or false")
        records = payload.get("records")
        if not isinstance(records, list):
            raise RequestError("'records' must be a list of objects, one per record")
        if len(records) > self.max_records:
            raise RequestError(
                f"{len(records)} records in one request; at most {self.max_records} (--max-records)", 413
            )
        if not remember:
            return self._check(self.served, records, remember=False)
        with self._remember_lock:
            served = self.served
            response = self._check(served, records, remember=True)
            self._remembered.append(response.pop("_chunk"))
            return response

    def _check(self, served: Served, records: list[Any], *, remember: bool) -> dict[str, Any]:
        config = served.bundle.config
        chunk, reported = _records_frame(records, config)
        ids = chunk[config.id_column].tolist()
        own: dict[str, dict[str, str]] = {}
        for i, record_id in enumerate(ids):
            if record_id and served.matcher.record(record_id) is not None:
                if remember:
                    raise RequestError(
                        f"record {i}: its {config.id_column} is already indexed; only new records can be "
                        "remembered",
                        409,
                    )
                ids[i] = f"{CHECKING_PREFIX}{uuid.uuid4().hex[:12]}"
            elif not record_id:
                ids[i] = f"{UNSAVED_PREFIX}{uuid.uuid4().hex[:12]}"
        chunk[config.id_column] = ids
        for record_id, values in zip(ids, chunk[list(config.fields)].itertuples(index=False), strict=True):
            own[record_id] = dict(zip(config.fields, values, strict=True))
        started = time.perf_counter()
        matcher = _RequestMatcher(served.matcher, own, config.id_column, remember=remember)
        with self._score_lock:
            result = score_chunk(chunk, served.bundle, matcher)
        results = _results(chunk, result, reported, config.id_column)
        logger.debug(
            "checked %d records (remember=%s) in %.1f ms",
            len(chunk),
            remember,
            1e3 * (time.perf_counter() - started),
        )
        response: dict[str, Any] = {"results": results}
        if remember:
            response["_chunk"] = chunk
        return response

    def health(self) -> dict[str, Any]:
        served = self.served
        return {
            "status": "ok",
            "model": served.info["name"],
            "version": served.info["version"],
            "run_id": served.info["run_id"],
            "uri": self.model,
            "loaded_at": served.loaded_at,
            "indexed_records": len(served.matcher),
            "remembered_records": sum(len(frame) for frame in self._remembered),
            "follows_registry": self.follows,
            "last_poll_error": self.last_poll_error,
        }


def _records_frame(records: list[Any], config: Config) -> tuple[pd.DataFrame, list[str]]:
    """The request's records as a chunk of text cells (the id, the entry time, the configured fields), and
    the ids to report ("" for a record sent without one). Messages name the record and key, never a value."""
    id_column, time_column = config.id_column, config.time_column
    now = datetime.now().isoformat(timespec="seconds")
    columns = config.required_columns()
    rows: list[list[str]] = []
    reported: list[str] = []
    seen: set[str] = set()
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise RequestError(f"record {i}: must be an object of field names and string values")
        for key, value in record.items():
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                raise RequestError(
                    f'record {i}: {key[:60]!r} is {kind}; every value must be a string ("" = missing)'
                )
        missing = [name for name in config.fields if name not in record]
        if missing:
            raise RequestError(
                f'record {i}: missing field {missing[0]!r}; send every configured field ("" = missing)'
            )
        record_id = record.get(id_column, s.MISSING)
        if record_id:
            if record_id in seen:
                raise RequestError(f"record {i}: its {id_column} appears twice in this request")
            seen.add(record_id)
        row = {**record, id_column: record_id}
        if time_column and not record.get(time_column):
            row[time_column] = now  # entered now
        rows.append([row[name] for name in columns])
        reported.append(record_id)
    return pd.DataFrame(rows, columns=columns, dtype=object), reported


def _results(chunk: pd.DataFrame, result: Any, reported: list[str], id_column: str) -> list[dict[str, Any]]:
    """One contract result per record: the record columns, and its flags highest score first."""
    columns = result.columns
    flags = sort_flags(result.flags)
    internal = chunk[id_column].tolist()
    per_row: dict[Any, list[dict[str, Any]]] = {row: [] for row in chunk.index}
    if len(flags):
        scores = fmt_score(flags[s.FLAG_SCORE])
        for (row, *values), score in zip(
            flags[["_row", *s.FLAG_COLUMNS]].itertuples(index=False, name=None), scores, strict=True
        ):
            flag = dict(zip(s.FLAG_COLUMNS, values, strict=True))
            flag[s.FLAG_SCORE] = float(score)
            per_row[row].append(flag)
    out: list[dict[str, Any]] = []
    for i, row in enumerate(chunk.index):
        own_id, flags_of = reported[i], per_row[row]
        duplicate_of = columns.at[row, s.DUPLICATE_OF]
        duplicate_score = float(columns.at[row, s.DUPLICATE_SCORE])
        if own_id and duplicate_of == own_id:
            # A stored record checked again (an edit) matches its own stored version: not a duplicate.
            duplicate_of, duplicate_score = s.MISSING, 0.0
            flags_of = [f for f in flags_of if f[s.FLAG_KIND] != s.KIND_DUPLICATE]
        for flag in flags_of:
            if flag[s.FLAG_RECORD_ID] == internal[i]:
                flag[s.FLAG_RECORD_ID] = own_id
        out.append(
            {
                s.FLAG_RECORD_ID: own_id,
                s.DUPLICATE_OF: duplicate_of,
                s.DUPLICATE_SCORE: duplicate_score,
                s.NEEDS_REVIEW: bool(flags_of),
                s.ERROR_FIELDS: columns.at[row, s.ERROR_FIELDS],
                s.ERROR_SCORE: float(columns.at[row, s.ERROR_SCORE]),
                s.ANOMALY_SCORE: float(columns.at[row, s.ANOMALY_SCORE]),
                "flags": flags_of,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------- HTTP


class _Follower(threading.Thread):
    """Polls the followed alias every `seconds` and swaps in the new version; a failed poll is logged and
    retried at the next tick, the served version stays."""

    def __init__(self, checker: Checker, seconds: float) -> None:
        super().__init__(name="registry-follower", daemon=True)
        self.checker = checker
        self.seconds = seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.seconds):
            try:
                self.checker.refresh()
                self.checker.last_poll_error = ""
            except Exception as exc:  # the service goes on with the version it has
                self.checker.last_poll_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
                logger.warning(
                    "registry poll failed, still serving the loaded version: %s", self.checker.last_poll_error
                )


def create_app(
    checker: Checker,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
) -> Any:
    """The ASGI app (Starlette): `POST /check`, `GET /health`, and a JSON error line for everything else."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def check(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, max_body_bytes)
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError) as exc:
                where = (
                    f" at line {exc.lineno} column {exc.colno}"
                    if isinstance(exc, json.JSONDecodeError)
                    else ""
                )
                raise RequestError(f"body is not valid JSON{where}", 400) from None
            return JSONResponse(await run_in_threadpool(checker.check, payload))
        except RequestError as exc:
            logger.info("refused a check (%d): %s", exc.status, exc)
            return error(exc.status, str(exc))
        except BadInputError as exc:
            logger.info("refused a check (422): %s", exc)
            return error(422, str(exc))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(checker.health())

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 500)
        if status == 404:
            return error(404, "no such route; use POST /check or GET /health")
        if status == 405:
            return error(405, "method not allowed; use POST /check or GET /health")
        return error(status, str(getattr(exc, "detail", "request refused")))

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Only the class: an exception's message may quote a record value.
        logger.error("internal error while answering %s: %s", request.url.path, exc.__class__.__name__)
        logger.debug("internal error", exc_info=exc)
        return error(500, f"internal error ({exc.__class__.__name__}); the service goes on")

    @asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        follower = _Follower(checker, poll_seconds) if checker.follows and poll_seconds > 0 else None
        if follower is not None:
            follower.start()
        try:
            yield
        finally:
            if follower is not None:
                follower.stopped.set()

    return Starlette(
        routes=[Route("/check", check, methods=["POST"]), Route("/health", health, methods=["GET"])],
        exception_handlers={HTTPException: http_error, Exception: internal},
        lifespan=lifespan,
    )


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("Content-Length is not a number", 400)
        if int(declared) > limit:
            raise RequestError(
                f"body of {declared} bytes is over the limit of {limit} (--max-body-bytes)", 413
            )
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise RequestError(f"body is over the limit of {limit} bytes (--max-body-bytes)", 413)
    return bytes(body)


def serve(
    model: str,
    *,
    reference_path: Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_records: int = DEFAULT_MAX_RECORDS,
    tracking_uri: str | None = None,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Loads the model and the reference, then serves until interrupted (SIGINT or SIGTERM)."""
    import socket

    import uvicorn

    if max_body_bytes < 1 or max_records < 1 or poll_seconds < 0:
        raise BadInputError(
            "--max-body-bytes and --max-records must be at least 1, --poll-seconds at least 0"
        )
    started = time.perf_counter()
    checker = Checker(
        model, reference_path=reference_path, tracking_uri=tracking_uri, max_records=max_records
    )
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BadInputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.listen(128)
    app = create_app(checker, max_body_bytes=max_body_bytes, poll_seconds=poll_seconds)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    if on_ready is not None:
        health = checker.health()
        bound = sock.getsockname()
        on_ready(
            f"serving {health['model']} version {health['version'] or '(local)'} "
            f"({health['indexed_records']} records indexed, ready in {time.perf_counter() - started:.1f} s) "
            f"on http://{host}:{bound[1]}  (POST /check, GET /health; Ctrl-C stops it)"
        )
    server.run(sockets=[sock])

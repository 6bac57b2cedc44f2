"""The command line: parse flags, load the config, call one library function, report.

Exit codes: 0 success, 2 bad input or usage (one line on stderr naming the file, row or column), 1 an
internal failure (one line; `--verbose` adds the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pipeline import __version__
from pipeline.exceptions import BadInputError

logger = logging.getLogger("pipeline")

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
DEMO_DATA = Path("data/demo")
DEMO_OUTPUT = Path("out/demo")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlruns)"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train", parents=[common], help="learn the models from a history and its corrections log"
    )
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--records", required=True, type=Path)
    p.add_argument("--corrections", required=True, type=Path)

    p = sub.add_parser("score", parents=[common], help="flag duplicates and errors in a batch")
    p.add_argument(
        "--model", required=True, help="models:/NAME@champion, models:/NAME/3, runs:/ID/model or a folder"
    )
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--reference", type=Path, help="records to find duplicates against (e.g. the history)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="rows read at a time (default 10,000; 5,000 with --workers above 1, 50,000 with --engine "
        "spark); outputs do not depend on it",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes scoring, this one included: it matches duplicates, all share errors and anomalies "
        "(default 1; 2 on 2 cores is faster, each extra one holds its own copy of the model, ~370 MB)",
    )
    p.add_argument(
        "--pair-helper",
        action="store_true",
        help="with --workers 1: one more process scores the duplicate candidate pairs while this one indexes "
        "the next rows (the duplicate stage ~35%% faster on an idle second core, ~220 MB more; slower on a "
        "busy machine); outputs do not depend on it",
    )
    p.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: this process, in chunks; spark: PySpark mapInPandas (needs the spark extra)",
    )
    p.add_argument("--spark-master", default="local[*]", help="Spark master URL for --engine spark")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="where the reference's prepared index is kept for the next run with the same model and "
        "reference (default: $PIPELINE_CACHE_DIR, else ~/.cache/pipeline/references)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="build the reference's index afresh and keep no copy"
    )
    p.add_argument(
        "--output-format",
        choices=("csv", "parquet"),
        default="csv",
        help="parquet writes records.parquet and flags.parquet beside the CSVs",
    )

    p = sub.add_parser(
        "promote", parents=[common], help="make the challenger champion if it is at least as good"
    )
    p.add_argument("--name", required=True)
    p.add_argument("--dry-run", action="store_true", help="compare and explain, change nothing")

    p = sub.add_parser("export", parents=[common], help="write a self-contained model folder")
    p.add_argument("--model", required=True)
    p.add_argument("--to", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("generate", parents=[common], help="write a realistic demo data set")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--customers", type=int, default=300)
    p.add_argument("--history", type=int, default=4000)
    p.add_argument("--batch", type=int, default=800)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--repeat-share",
        type=float,
        default=0.0,
        help="share of orders that repeat an earlier amount of the same customer (standing orders)",
    )

    p = sub.add_parser("demo", parents=[common], help="generate, train, score and show where the results are")
    p.add_argument("--data", type=Path, default=DEMO_DATA)
    p.add_argument("--output", type=Path, default=DEMO_OUTPUT)

    p = sub.add_parser("ui", parents=[common], help="open the MLflow UI on the tracking store")
    p.add_argument("--port", type=int, default=5000)

    p = sub.add_parser(
        "check-output",
        parents=[common],
        help="check a score output folder against the contract (docs/CONTRACT.md section 3)",
    )
    p.add_argument("dir", type=Path, help="the score output folder")
    p.add_argument("input", type=Path, help="the batch file it was scored from (CSV, .xlsx or Parquet)")
    p.add_argument("--id-column", default="record_id")
    p.add_argument("--delimiter", help="the input's CSV separator (default: detected)")
    p.add_argument("--encoding", help="the input's text encoding (default: detected)")
    p.add_argument("--sheet", help="the input's .xlsx sheet (default: the first)")

    p = sub.add_parser("serve", parents=[common], help="check records as they are typed (an HTTP service)")
    p.add_argument("--model", required=True, help="models:/NAME@champion (followed as it moves) or as score")
    p.add_argument("--reference", type=Path, help="records to find duplicates against (e.g. the history)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8780)
    p.add_argument("--poll-seconds", type=float, default=30.0, help="how often to look for a moved alias")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger bodies are refused (413)")
    p.add_argument("--max-records", type=int, default=1000, help="records per request at most (413)")

    p = sub.add_parser("review", parents=[common], help="serve the review page for a score output folder")
    p.add_argument("dir", type=Path, help="the score output folder (decisions go to DIR/decisions.csv)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--reference", type=Path, help="where matched records are (default: as summary.json says)")

    p = sub.add_parser("feedback", parents=[common], help="append review decisions to the corrections log")
    p.add_argument("--decisions", required=True, type=Path)
    p.add_argument("--corrections", required=True, type=Path)
    p.add_argument("--output", type=Path, help="the score folder decided on (default: the decisions' folder)")
    p.add_argument("--config", type=Path, help="minutes and cost per hour (default: as summary.json says)")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("mlflow", "alembic", "urllib3", "dedupe", "matplotlib", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    # MLflow configures its own loggers when imported; these keep its chatter out of a clean stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if args.verbose else "WARNING")


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # A scheduler's polite stop unwinds like Ctrl-C, so temporary output is removed on the way out.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except BadInputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; nothing was written\n")
        return 130
    except Exception as exc:  # an internal failure: one line, the traceback only when asked for
        if args.verbose:
            logger.exception("internal failure")
        sys.stderr.write(
            f"internal error: {exc.__class__.__name__}: {exc} (rerun with --verbose for details)\n"
        )
        return EXIT_INTERNAL


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.registry import champion_error_threshold, log_training
    from pipeline.train import Stages, train

    config = load_config(args.config)
    started = time.perf_counter()
    anchor = champion_error_threshold(config.name, uri=args.tracking_uri)
    result = train(config, args.records, args.corrections, error_anchor=anchor)
    with Stages().stage("mlflow", "logging the run and registering the model in MLflow"):
        run = log_training(
            result, records_path=args.records, log_path=args.corrections, uri=args.tracking_uri
        )
    _print_training(result, run, time.perf_counter() - started)
    return EXIT_OK


def _print_training(result: Any, run: Any, seconds: float) -> None:
    m = result.bundle.metrics
    plan = result.plan
    counts = plan.counts
    if plan.scheme == "holdout":
        sizes = plan.split.sizes()
        _out(
            f"trained {run.name} in {seconds:.1f} s; evaluated by time: fitted on {sizes['train']} records "
            f"({counts['cells_train']} corrected cells, {counts['merges_train']} merges), thresholds on "
            f"{sizes['validation']} ({counts['cells_validation']}, {counts['merges_validation']}), tested on "
            f"the latest {sizes['test']} ({counts['cells_test']}, {counts['merges_test']}); "
            f"the registered model is refitted on all {result.sizes['records']}"
        )
        heading = "held-out (test)"
    else:
        _out(
            f"trained {run.name} in {seconds:.1f} s; too few labels for a held-out period "
            f"({counts['cells']} corrected cells, {counts['merges']} merges): evaluated by "
            f"{counts['folds']}-fold cross-validation grouped by record and merge cluster, thresholds out "
            f"of fold; the registered model is fitted on all {result.sizes['records']} records"
        )
        heading = "cross-validated"
    _out(f"{heading:<22}{'precision':>10}{'recall':>10}{'F1':>10}{'AP':>10}")
    labelled = {kind: sum(v for k, v in counts.items() if k.startswith(kind)) for kind in ("cells", "merges")}
    for label, key, kind in (
        ("duplicates", "duplicate", "merges"),
        ("error detection", "error", "cells"),
        ("corrections", "correction", "cells"),
    ):
        if not labelled[kind]:
            if kind == "merges":
                _out(f"{label:<22}not learned: the log has no merges; no duplicate is flagged")
            else:
                _out(f"{label:<22}not learned: the log has no edits; only near-certain errors are flagged")
            continue
        ap = m.get(f"test_{key}_average_precision")
        _out(
            f"{label:<22}{m[f'test_{key}_precision']:>10.3f}{m[f'test_{key}_recall']:>10.3f}"
            f"{m[f'test_{key}_f1']:>10.3f}{'' if ap is None else f'{ap:10.3f}'}"
        )
    _out(
        f"anomaly flags: {int(m['test_anomaly_flags'])} (precision {m['test_anomaly_precision']:.3f}); "
        f"estimated minutes saved on the held-out period: {m['test_minutes_saved']:.0f}"
    )
    _out(f"run id: {run.run_id}")
    _out(f"model version: {run.name} version {run.version} (aliases: {', '.join(run.aliases)})")


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.memory import map_large_allocations
    from pipeline.score import prepare_output, run_batch, start_helpers

    if args.chunk_rows is not None and args.chunk_rows < 1:
        raise BadInputError(f"--chunk-rows {args.chunk_rows}: must be at least 1")
    if args.workers < 1:
        raise BadInputError(f"--workers {args.workers}: must be at least 1")
    if args.pair_helper and (args.workers > 1 or args.engine == "spark"):
        raise BadInputError("--pair-helper: only with --workers 1 and --engine local")
    # Fail on an unusable output folder before loading anything.
    import shutil

    shutil.rmtree(prepare_output(args.output, overwrite=args.overwrite))
    # `--workers` helpers are forked before anything loads, so they hold only what scoring imports (see
    # `start_helpers`); the registry and the duplicate model's modules are imported after them.
    helpers = start_helpers(args.workers) if args.engine != "spark" else None
    with contextlib.ExitStack() as stack:
        if helpers is not None:
            stack.callback(helpers.shutdown, cancel_futures=True)
        from pipeline.reference import ReferenceCache, default_cache_dir
        from pipeline.registry import load_bundle

        if args.engine == "spark":
            summary = _score_spark(args, load_bundle(args.model, uri=args.tracking_uri))
        else:
            map_large_allocations()
            with _progress(args, unit="rows") as bar:
                summary = run_batch(
                    # Held by the job alone: with a reference it swaps in the error model that knows the
                    # reference, and the trained one is freed (~25 MB of lookups at 10,000 records).
                    load_bundle(args.model, uri=args.tracking_uri),
                    args.input,
                    args.output,
                    reference_path=args.reference,
                    overwrite=args.overwrite,
                    chunk_rows=args.chunk_rows,  # None: `run_batch` picks it by the workers
                    output_format=args.output_format,
                    progress=bar,
                    workers=args.workers,
                    cache=None if args.no_cache else ReferenceCache(args.cache_dir or default_cache_dir()),
                    helpers=helpers,
                    pair_helper=args.pair_helper,
                )
    flags = summary["flags"]
    _out(
        f"scored {summary['input']['rows']} rows in {summary['seconds']:.1f} s: "
        f"{flags['duplicate']} duplicate, "
        f"{flags['error']} error and {flags['anomaly']} anomaly flags; "
        f"about {summary['minutes_saved_estimate']:.0f} minutes of correction work saved"
    )
    _out(f"results: {args.output}/ (records.csv, flags.csv, summary.json, report.html)")
    return EXIT_OK


def _score_spark(args: argparse.Namespace, bundle: Any) -> dict[str, Any]:
    from pipeline.ingest import DEFAULT_CHUNK_ROWS
    from pipeline.reference import ReferenceCache, default_cache_dir

    try:
        from pipeline.spark import score_spark
    except ImportError as exc:
        raise BadInputError(f"--engine spark needs PySpark: pip install 'pipeline[spark]' ({exc})") from None
    return score_spark(
        bundle,
        args.input,
        args.output,
        reference_path=args.reference,
        master=args.spark_master,
        overwrite=args.overwrite,
        chunk_rows=args.chunk_rows or DEFAULT_CHUNK_ROWS,
        output_format=args.output_format,
        cache=None if args.no_cache else ReferenceCache(args.cache_dir or default_cache_dir()),
    )


class _progress:
    """A tqdm bar with rows/s on a terminal; nothing extra in a scheduler's log (the library logs lines)."""

    def __init__(self, args: argparse.Namespace, unit: str) -> None:
        self.enabled = sys.stderr.isatty() and not args.quiet
        self.unit = unit
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from tqdm import tqdm

        self.bar = tqdm(unit=self.unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True)
        return self.bar.update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline.registry import promote

    decision = promote(args.name, uri=args.tracking_uri, dry_run=args.dry_run)
    champion = decision.champion["version"] if decision.champion else "none"
    _out(
        f"challenger version {decision.challenger['version']} vs champion version {champion}, "
        "on the challenger's held-out period:"
    )
    _out(decision.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    verb = "would move" if args.dry_run else "moved"
    if decision.promoted:
        _out(f"{verb} champion to version {decision.challenger['version']}: {decision.reason}")
    else:
        _out(f"champion stays: {decision.reason}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.registry import export

    folder = export(args.model, args.to, uri=args.tracking_uri, overwrite=args.overwrite)
    _out(f"exported {args.model} to {folder}/ (score with --model {folder})")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.generate import generate

    paths = generate(
        args.out,
        customers=args.customers,
        history=args.history,
        batch=args.batch,
        seed=args.seed,
        repeat_share=args.repeat_share,
    )
    _out(f"wrote demo data to {args.out}/: {', '.join(Path(p).name for p in vars(paths).values())}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_output
    from pipeline.generate import generate
    from pipeline.registry import load_bundle, log_training, tracking_uri
    from pipeline.score import run_batch
    from pipeline.train import train

    started = time.perf_counter()
    _out(f"1/3 generating demo data in {args.data}/")
    paths = generate(args.data)
    config = load_config(paths.config)
    _out("2/3 training (dedupe duplicate model, error model, anomaly score) and logging to MLflow")
    result = train(config, paths.records, paths.corrections)
    run = log_training(result, records_path=paths.records, log_path=paths.corrections, uri=args.tracking_uri)
    _print_training(result, run, time.perf_counter() - started)
    _out(
        f"3/3 scoring the new batch {paths.batch} against the history "
        f"with models:/{config.name}/{run.version}"
    )
    bundle = load_bundle(f"models:/{config.name}/{run.version}", uri=args.tracking_uri)
    with _progress(args, unit="rows") as bar:
        summary = run_batch(
            bundle, paths.batch, args.output, reference_path=paths.records, overwrite=True, progress=bar
        )
    figures = evaluate_output(
        config, args.output, paths.batch, paths.batch_truth, paths.records, paths.history_truth
    )
    _out(
        f"batch of {summary['input']['rows']} rows: {summary['flags']['total']} flags "
        f"({summary['flags']['duplicate']} duplicate, {summary['flags']['error']} error, "
        f"{summary['flags']['anomaly']} anomaly)"
    )
    _out(
        "against the batch's ground truth: "
        + "; ".join(
            f"{k} P {figures[f'batch_{k}_precision']:.3f} R {figures[f'batch_{k}_recall']:.3f} "
            f"F1 {figures[f'batch_{k}_f1']:.3f}"
            for k in ("duplicate", "error", "correction")
        )
    )
    _out(f"review queue: {args.output / 'flags.csv'}   report: {args.output / 'report.html'}")
    _out(
        f"all rows with their scores: {args.output / 'records.csv'}   summary: {args.output / 'summary.json'}"
    )
    uri = tracking_uri(args.tracking_uri)
    _out(f"MLflow UI: python -m pipeline ui   (then open http://127.0.0.1:5000; store {uri})")
    _out(f"done in {time.perf_counter() - started:.0f} s")
    return EXIT_OK


def cmd_check_output(args: argparse.Namespace) -> int:
    """Prints each violation on its own line and exits 1, or "ok: ..." and exits 0 (as the shared
    `check-output` tool does); an unreadable input is exit 2 as everywhere."""
    from pipeline.contract import check_output
    from pipeline.ingest import ReadOptions

    try:
        options = ReadOptions(delimiter=args.delimiter, encoding=args.encoding, sheet=args.sheet)
    except ValueError as exc:
        raise BadInputError(f"{exc} (see --help)") from None
    violations = check_output(args.dir, args.input, args.id_column, options=options)
    for line in violations:
        _out(line)
    if violations:
        return 1  # violations found, as the shared tool says it
    _out(f"ok: {args.dir} keeps the output contract for {args.input}")
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from pipeline.registry import tracking_uri

    uri = tracking_uri(args.tracking_uri)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
    ]
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
        command += ["--default-artifact-root", artifacts.resolve().as_uri()]
    _out(f"MLflow UI on http://127.0.0.1:{args.port} for {uri} (Ctrl-C stops it)")
    return subprocess.call(command)


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.serve import serve

    serve(
        args.model,
        reference_path=args.reference,
        host=args.host,
        port=args.port,
        poll_seconds=args.poll_seconds,
        max_body_bytes=args.max_body_bytes,
        max_records=args.max_records,
        tracking_uri=args.tracking_uri,
        log_level="debug" if args.verbose else "warning" if args.quiet else "info",
        on_ready=_out,
    )
    return EXIT_OK


def cmd_review(args: argparse.Namespace) -> int:
    from pipeline.review import serve

    def ready(review: Any, url: str) -> None:
        _out(f"reviewing {len(review.flags)} flags of {args.dir}/ on {url} (Ctrl-C stops)")
        _out(f"each decision is saved at once to {review.decisions_path}; then run `feedback`")

    serve(args.dir, port=args.port, reference=args.reference, ready=ready)
    return EXIT_OK


def cmd_feedback(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.feedback import feedback

    config = load_config(args.config) if args.config else None
    result = feedback(
        args.decisions,
        args.corrections,
        folder=args.output,
        minutes_per_correction=config.minutes_per_correction if config else None,
        cost_per_hour=config.cost_per_hour if config else None,
    )
    anomalies = result.anomalies_accepted
    _out(
        f"{result.decisions} decisions: {result.appended} rows added to {args.corrections}, "
        f"{result.already_logged} already there"
        + (f", {anomalies} accepted anomaly flags (no field known: no row)" if anomalies else "")
    )
    r = result.realised
    if r:
        shares = ", ".join(
            f"{k.removeprefix('realised_accept_share_')} {v:.0%}"
            for k, v in r.items()
            if k.startswith("realised_accept_share_") and k.count("_") == 3
        )
        euros = f" (EUR {r['realised_euros_saved']:.2f})" if "realised_euros_saved" in r else ""
        _out(
            f"realised by the review so far (whole log): {r['realised_flags_reviewed']:.0f} flags reviewed, "
            f"{r['realised_flags_accepted']:.0f} accepted ({shares}); "
            f"{r['realised_minutes_reviewing']:.1f} minutes reviewing, "
            f"{r['realised_minutes_saved']:.1f} minutes of correction saved{euros}"
        )
    return EXIT_OK


COMMANDS = {
    "train": cmd_train,
    "score": cmd_score,
    "promote": cmd_promote,
    "export": cmd_export,
    "generate": cmd_generate,
    "demo": cmd_demo,
    "ui": cmd_ui,
    "check-output": cmd_check_output,
    "serve": cmd_serve,
    "review": cmd_review,
    "feedback": cmd_feedback,
}

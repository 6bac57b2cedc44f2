"""Data-cleaning benchmarks hospital and beers: our error model against Raha and Baran, plus the demo data.

Protocol of Raha/Baran with a budget of 20 labelled tuples. For our side the first 20 rows are the history:
stored as in `clean.csv`, entered as in `dirty.csv`, and the corrections log has an `edit` row for every
cell that differs there. The remaining rows are the batch, scored as entered. Cell-level precision, recall
and F1 of detection (a flagged cell is right when it differs between dirty and clean) and of correction
(Baran's definitions: right corrections / corrections proposed, right corrections / erroneous cells; an
empty suggestion counts as proposed when the model says the fix is to empty the cell).

Raha (detection, LABELING_BUDGET=20, it picks its own tuples) and then Baran (correction of Raha's
detections, its own 20 tuples) run from the PyPI package `raha` in `benchmarks/.venv-raha` through
`benchmarks/raha_baseline.py`; their figures are their own evaluation over the whole table.

Every system runs in a child process; "seconds" is the fit + detect (+ correct) wall time inside it
(imports and CSV reading excluded), "peak MB" the highest summed resident memory of the child's process
tree (sampled every 0.2 s; Raha and Baran use a process pool).

    .venv/bin/python benchmarks/raha.py                                   # everything
    .venv/bin/python benchmarks/raha.py --datasets hospital --skip-baselines
    .venv/bin/python benchmarks/raha.py --thresholds cv                   # thresholds by CV of whole fits

Setting up the Raha environment (once; it is ignored by git):

    python3 -m venv benchmarks/.venv-raha && echo '*' > benchmarks/.venv-raha/.gitignore
    benchmarks/.venv-raha/bin/pip install raha "pandas<3"
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "benchmarks" / "raha"
RAHA_PYTHON = ROOT / "benchmarks" / ".venv-raha" / "bin" / "python"
RAHA_RUNNER = ROOT / "benchmarks" / "raha_baseline.py"
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("hospital", "beers")
HISTORY_ROWS = 20
# Tokens a data set writes for a missing value; read as missing in both the dirty and the clean file.
MISSING_TOKENS = {"hospital": "empty"}
NUMERIC_SHARE = 0.5  # a field whose filled values mostly parse as numbers is a number
CATEGORY_SHARE = 0.05  # at most this share of the rows as distinct values (or 10) is a category


# ------------------------------------------------------------------------------------------------- data


def _normalise(value: str) -> str:
    """Raha's own minimal value normaliser, so both sides judge the same cells."""
    return re.sub("[\t\n ]+", " ", html.unescape(value)).strip("\t\n ")


def load_pair(name: str, folder: Path = DATA) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The dirty and clean table of a data set, as text, columns aligned by position (dirty's names)."""
    frames = []
    for part in ("dirty", "clean"):
        frame = pd.read_csv(folder / name / f"{part}.csv", dtype=str, keep_default_na=False).map(_normalise)
        token = MISSING_TOKENS.get(name)
        if token is not None:
            frame = frame.replace(token, "")
        frames.append(frame)
    dirty, clean = frames
    if dirty.shape != clean.shape:
        raise SystemExit(f"{name}: dirty {dirty.shape} and clean {clean.shape} differ in shape")
    clean.columns = dirty.columns
    return dirty, clean


def infer_type(values: pd.Series) -> str:
    """numeric-looking -> number, few distinct values -> category, else text."""
    filled = values[values != ""]
    if filled.empty:
        return "text"
    if pd.to_numeric(filled, errors="coerce").notna().mean() >= NUMERIC_SHARE:
        return "number"
    if filled.nunique() <= max(10, CATEGORY_SHARE * len(values)):
        return "category"
    return "text"


def make_config(name: str, dirty: pd.DataFrame):  # noqa: ANN201 - pipeline.config.Config, imported late
    """A config for a benchmark table: the first column is the id, every other column a field."""
    from pipeline.config import Config

    id_column, *fields = dirty.columns
    return Config.model_validate(
        {
            "name": name,
            "id_column": id_column,
            "fields": {field: {"type": infer_type(dirty[field])} for field in fields},
        }
    )


def differences(dirty: pd.DataFrame, clean: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """Every differing cell as a log `edit` row: record_id, field, old_value (dirty), new_value (clean)."""
    rows = []
    for field in dirty.columns.drop(id_column):
        differ = (dirty[field] != clean[field]).to_numpy()
        rows.append(
            pd.DataFrame(
                {
                    "record_id": dirty[id_column].to_numpy()[differ],
                    "action": "edit",
                    "field": field,
                    "old_value": dirty[field].to_numpy()[differ],
                    "new_value": clean[field].to_numpy()[differ],
                    "merged_into": "",
                    "corrected_at": "",
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


# ------------------------------------------------------------------------------------------------ ours


def _cv_thresholds(config, entered, log, stored, batch, folds: int, seed: int) -> tuple[float, float]:  # noqa: ANN001
    """Flag and suggestion thresholds chosen on out-of-fold flags of the 20 history rows.

    Each fold's model is fitted on the other rows (the batch and the held rows, as entered, widen its
    profiles as in the final fit) and flags every held cell with every suggestion; the pooled flags then
    choose the flag threshold (best F1) and the suggestion threshold (best correction F1) with the
    library's own `choose_threshold` / `choose_suggest_threshold`.
    """
    from pipeline.corrections import cell_labels
    from pipeline.errors import ErrorModel, choose_suggest_threshold
    from pipeline.exceptions import TrainingDataError
    from pipeline.metrics import choose_threshold

    ids = entered[config.id_column]
    fold_of = np.random.default_rng(seed).permutation(len(entered)) % folds
    errors = set(zip(log["record_id"], log["field"], strict=True))
    pooled = []
    for k in range(folds):
        inside = fold_of == k
        train_ids = ids[~inside]
        labels = cell_labels(log[log["record_id"].isin(set(train_ids))], train_ids)
        held = entered[inside].reset_index(drop=True)
        try:
            model = ErrorModel(config, seed=seed, folds=3, threshold=0.0, suggest_threshold=0.0).fit(
                entered[~inside],
                labels,
                stored[~inside],
                unlabelled=pd.concat([batch, held], ignore_index=True),
            )
        except TrainingDataError:
            continue  # no labelled error left in the other folds
        flags = model.detect(held)
        pooled.append(flags.assign(record_id=held[config.id_column].to_numpy()[flags["row"].to_numpy()]))
    if not pooled:
        return 0.5, 0.5
    flags = pd.concat(pooled, ignore_index=True)
    truth = np.array([(r, f) in errors for r, f in zip(flags["record_id"], flags["field"], strict=True)])
    threshold = choose_threshold(flags["score"].to_numpy(), truth, default=0.5).threshold
    suggest = choose_suggest_threshold(flags[flags["score"] >= threshold], cell_labels(log, ids), 0.5)
    return threshold, suggest


def run_ours(name: str, thresholds: str, seed: int) -> dict:
    """Fits the error model on the first 20 rows (+ the dirty batch as unlabelled) and scores the batch."""
    from pipeline.corrections import cell_labels, validate_log
    from pipeline.errors import ErrorModel, cell_metrics

    dirty, clean = load_pair(name)
    config = make_config(name, dirty)
    id_column = config.id_column
    entered, stored = dirty.iloc[:HISTORY_ROWS], clean.iloc[:HISTORY_ROWS]
    batch = dirty.iloc[HISTORY_ROWS:].reset_index(drop=True)
    batch_truth = clean.iloc[HISTORY_ROWS:].reset_index(drop=True)
    log = validate_log(differences(entered, stored, id_column))
    labels = cell_labels(log, entered[id_column])
    truth = differences(batch, batch_truth, id_column)

    started = time.perf_counter()
    threshold, suggest = None, None  # the model's own: chosen on out-of-fold predictions of the 20 rows
    if thresholds == "cv":
        threshold, suggest = _cv_thresholds(config, entered, log, stored, batch, 5, seed)
    model = ErrorModel(config, seed=seed, threshold=threshold, suggest_threshold=suggest).fit(
        entered, labels, stored, unlabelled=batch
    )
    fit_seconds = time.perf_counter() - started
    flags = model.detect(batch)
    seconds = time.perf_counter() - started
    metrics = cell_metrics(flags, truth, ids=batch[id_column])
    flags = flags.assign(record_id=batch[id_column].to_numpy()[flags["row"].to_numpy()])
    flags.to_csv(RESULTS / f"ours-{name}-flags.csv", index=False)
    return {
        **metrics,
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "threshold": model.threshold_,
        "suggest_threshold": model.suggest_threshold_,
        "history_errors": len(labels),
        "types": {f: spec.type for f, spec in config.fields.items()},
    }


def run_demo(seed: int) -> dict:
    """The product path on the demo data: generate, train, score the batch, compare with its truth."""
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_output
    from pipeline.generate import generate
    from pipeline.score import run_batch
    from pipeline.train import train

    work = Path(tempfile.mkdtemp(prefix="bench-raha-demo-"))
    paths = generate(work / "data", seed=seed)
    config = load_config(paths.config)
    started = time.perf_counter()
    result = train(config, paths.records, paths.corrections)
    run_batch(result.bundle, paths.batch, work / "out", reference_path=paths.records)
    seconds = time.perf_counter() - started
    figures = evaluate_output(config, work / "out", paths.batch, paths.batch_truth, paths.records)
    out = {"seconds": seconds}
    for ours, theirs in (("detection", "error"), ("correction", "correction")):
        for key in ("precision", "recall", "f1"):
            out[f"{ours}_{key}"] = figures[f"batch_{theirs}_{key}"]
    return out


# --------------------------------------------------------------------------------------------- children


def _tree_rss(pid: int) -> float:
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total / 2**20


def measure(command: list[str]) -> tuple[dict | None, float, str]:
    """Runs a child that prints a JSON line last; returns it, the peak tree memory (MB) and stderr's tail."""
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while child.poll() is None:
            peak[0] = max(peak[0], _tree_rss(child.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    sampler.join()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        return None, peak[0], "\n".join(stderr.strip().splitlines()[-5:])
    result = json.loads(lines[-1])
    return result, max(peak[0], result.get("peak_mb_self", 0.0)), ""


def run_baseline(name: str, seed: int) -> tuple[dict | None, float, str]:
    command = [
        str(RAHA_PYTHON),
        str(RAHA_RUNNER),
        "--dirty",
        str(DATA / name / "dirty.csv"),
        "--clean",
        str(DATA / name / "clean.csv"),
        "--name",
        name,
        "--seed",
        str(seed),
    ]
    return measure(command)


def child_main(args: argparse.Namespace) -> None:
    """Inside a child process: run one system and print its figures as the last JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.child == "demo":
        result = run_demo(args.demo_seed)
    else:
        result = run_ours(args.child, args.thresholds[0], args.seed)
    result["peak_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


# -------------------------------------------------------------------------------------------------- main


def _row(dataset: str, system: str, r: dict, peak: float) -> str:
    def fmt(key: str) -> str:
        value = r.get(key)
        return f"{value:.2f}" if isinstance(value, float | int) else "  - "

    det = " ".join(fmt(f"detection_{k}") for k in ("precision", "recall", "f1"))
    cor = " ".join(fmt(f"correction_{k}") for k in ("precision", "recall", "f1"))
    return f"| {dataset} | {system} | {det} | {cor} | {r['seconds']:.0f} | {peak:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=[*DATASETS, "demo"], choices=[*DATASETS, "demo"])
    parser.add_argument("--skip-baselines", action="store_true", help="do not run Raha and Baran")
    parser.add_argument(
        "--thresholds",
        nargs="+",
        choices=("cv", "default"),
        default=["cv", "default"],
        help="flag and suggestion thresholds: chosen by 5-fold CV of whole fits on the 20 history rows (cv), "
        "or the model's own (default: `fit` chooses them on its out-of-fold predictions); one table row each",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of our model and of Raha/Baran")
    parser.add_argument("--demo-seed", type=int, default=7, help="seed of the generated demo data")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    rows, notes = [], []
    for dataset in args.datasets:
        for thresholds in args.thresholds if dataset != "demo" else args.thresholds[:1]:
            passed = [
                "--thresholds",
                thresholds,
                "--seed",
                str(args.seed),
                "--demo-seed",
                f"{args.demo_seed}",
            ]
            result, peak, error = measure([*me, "--child", dataset, *passed])
            system = f"ours, {thresholds} thresholds" if dataset != "demo" else "ours, train + score"
            if result is None:
                notes.append(f"{dataset} {system} failed: {error}")
                continue
            rows.append(_row(dataset, system, result, peak))
            print(f"progress: {rows[-1]}", file=sys.stderr, flush=True)
            if dataset != "demo":
                notes.append(
                    f"{dataset} {system}: flag threshold {result['threshold']:.3f}, suggestion threshold "
                    f"{result['suggest_threshold']:.2f}, {result['history_errors']} labelled cells in the "
                    f"history, fit {result['fit_seconds']:.1f} s, {result['flags']:.0f} flags, "
                    f"{result['suggestions']:.0f} suggestions, {result['true_errors']:.0f} true errors"
                )
        if dataset == "demo" or args.skip_baselines:
            continue
        if not RAHA_PYTHON.exists():
            notes.append(f"{dataset}: Raha/Baran skipped, {RAHA_PYTHON} not found (see the module docstring)")
            continue
        result, peak, error = run_baseline(dataset, args.seed)
        if result is None:
            notes.append(f"{dataset} Raha/Baran failed: {error}")
            continue
        (RESULTS / f"raha-{dataset}-seed{args.seed}.json").write_text(json.dumps(result), encoding="utf-8")
        result["seconds"] = result["detection_seconds"] + result.get("correction_seconds", 0.0)
        rows.append(_row(dataset, f"Raha + Baran (seed {args.seed})", result, peak))
        notes.append(f"{dataset} Raha detection alone: {result['detection_seconds']:.0f} s")
        print(f"progress: {rows[-1]}", file=sys.stderr, flush=True)
    print("| dataset | system | detection P R F1 | correction P R F1 | seconds | peak MB |")
    print("| --- | --- | --- | --- | ---: | ---: |")
    print("\n".join(rows))
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()

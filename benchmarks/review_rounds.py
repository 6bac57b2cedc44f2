"""Three review rounds on the demo data: does the model learn from what clerks decide?

One demo data set is generated with a batch three times the usual size; the batch (sorted by entry time) is
cut into three consecutive parts, one per round, so every round scores records it has never seen. Each
round runs the CLI as a department would:

1. `score` the round's part with `models:/orders@champion` against the history so far;
2. a simulated clerk decides every flag from the demo's ground truth (`batch_truth.csv`, and
   `history_truth.csv` for duplicate clusters): a right error flag is accepted when its suggestion is the
   true value and edited to the true value otherwise; a right duplicate or anomaly flag is accepted; every
   other flag is rejected. Seconds per decision: accept 20, edit 45, reject 15. Decisions are appended to
   `decisions.csv` with the same function the review page uses;
3. `feedback` appends them to the corrections log; the part joins the history as the clerk left it (the
   accepted and typed values in place, missed errors still there);
4. `train` on the grown history and log, then `promote`.

Per round: precision and recall of error and duplicate flags against the ground truth, false alarms per
100 rows, and how many flags rejected in the previous round come back unchanged (same record, kind, field,
value, suggestion and match) when the version trained on those decisions (`@challenger`) re-scores that
round's part against the same reference. `--score-with challenger` scores each new part with that version
too, whether or not `promote` moved the champion.

Each part holds other records and other errors (800 rows hold about 8 to 20 duplicates and 70 to 95 wrong
cells: one miss moves recall by 0.01 to 0.12), so a second table scores the last round's part, new to every
version that scored a round, with each of those versions against the same reference: there the
differences are the models' alone.

A third table scores each round's part with the round-1 version as well, against that round's reference:
"F1 no worse than in round one" is then judged on the same records and errors (the round's own version
against the round-1 version on its part), not across parts whose mix of errors differs (demo seeds 7 3 11:
the round-1 version's own error F1 is 0.970 on part 1 and 0.958 on part 2).

One 800-row part holds 1 to 9 false alarms, so one flag moves "false alarms per 100 rows" by 0.125 and a
single seed cannot show whether they fall round on round. `--seeds 7 3 11` runs the rounds on each seed's
own data set, one after the other, and adds a table pooled over the seeds: each round's true and false
positives and misses summed over the seeds before precision, recall and F1 are taken (2,400 rows per round
for three seeds), beside every seed's own table.

    .venv/bin/python benchmarks/review_rounds.py             # seed 7, history 4000, 3 x 800 batch rows
    .venv/bin/python benchmarks/review_rounds.py --seeds 7 3 11 --work /tmp/rounds
    .venv/bin/python benchmarks/review_rounds.py --score-with challenger
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import schema as s  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.corrections import duplicate_clusters, load_log, merges  # noqa: E402
from pipeline.decisions import append_decision  # noqa: E402
from pipeline.evaluate import evaluate_output  # noqa: E402
from pipeline.metrics import prf  # noqa: E402

SECONDS = {s.DECISION_ACCEPT: 20, s.DECISION_EDIT: 45, s.DECISION_REJECT: 15}
ROUNDS = 3


def cli(*args: str, uri: str) -> str:
    """Runs `python -m pipeline ...` as a user would; returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--tracking-uri", uri, "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"`{' '.join(args[:1])}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def score(model: str, batch: Path, out: Path, reference: Path, *, uri: str) -> pd.DataFrame:
    """`score` a batch against a reference; returns its flags."""
    cli("score", "--model", model, "--input", str(batch), "--output", str(out), "--reference", str(reference),
        "--overwrite", uri=uri)  # fmt: skip
    return read(out / s.FLAGS_FILE)


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    return path


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def flag_identity(flags: pd.DataFrame) -> set[tuple[str, ...]]:
    columns = [s.FLAG_RECORD_ID, s.FLAG_KIND, s.FLAG_FIELD, s.FLAG_VALUE, s.FLAG_SUGGESTION, s.FLAG_MATCH_ID]
    return set(flags[columns].itertuples(index=False, name=None))


class Clerk:
    """Decides flags from the ground truth."""

    def __init__(self, truth: pd.DataFrame, history_truth: pd.DataFrame) -> None:
        log = load_log_frame(pd.concat([history_truth, truth], ignore_index=True))
        self.roots = duplicate_clusters(merges(log))
        edits = truth[truth[s.LOG_ACTION] == s.ACTION_EDIT]
        keys = zip(edits[s.LOG_RECORD_ID], edits[s.LOG_FIELD], strict=True)
        self.cells = dict(zip(keys, edits[s.LOG_NEW_VALUE], strict=True))
        self.touched = set(truth[s.LOG_RECORD_ID])

    def decide(self, flag: dict[str, str]) -> tuple[str, str]:
        record, kind = flag[s.FLAG_RECORD_ID], flag[s.FLAG_KIND]
        if kind == s.KIND_ERROR:
            right = self.cells.get((record, flag[s.FLAG_FIELD]))
            if right is None:
                return s.DECISION_REJECT, ""
            if right == flag[s.FLAG_SUGGESTION] and flag[s.FLAG_SUGGESTION] != "":
                return s.DECISION_ACCEPT, ""
            return (s.DECISION_EDIT, right) if right != flag[s.FLAG_VALUE] else (s.DECISION_REJECT, "")
        if kind == s.KIND_DUPLICATE:
            a, b = self.roots.get(record), self.roots.get(flag[s.FLAG_MATCH_ID])
            return (s.DECISION_ACCEPT, "") if a is not None and a == b else (s.DECISION_REJECT, "")
        return (s.DECISION_ACCEPT, "") if record in self.touched else (s.DECISION_REJECT, "")


def load_log_frame(frame: pd.DataFrame) -> pd.DataFrame:
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as fh:
        path = Path(fh.name)
    write_csv(frame, path)
    try:
        return load_log(path)
    finally:
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seed",
        "--seeds",
        dest="seeds",
        type=int,
        nargs="+",
        default=[7],
        help="demo seeds, run one after the other; with several, a table pooled over them",
    )
    parser.add_argument("--history", type=int, default=4000)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--part", type=int, default=800, help="batch rows per round")
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument(
        "--score-with",
        choices=("champion", "challenger"),
        default="champion",
        help="the alias each round scores its part with (challenger: the version trained on the last review)",
    )
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-review-"))
    rounds, fixed, paired = [], [], []
    for seed in args.seeds:
        folder = work if len(args.seeds) == 1 else work / f"seed-{seed}"
        seed_rounds, seed_fixed, seed_paired = run_seed(args, seed, folder)
        rounds.append(seed_rounds)
        fixed.append(seed_fixed)
        paired.append(seed_paired)
    if len(args.seeds) > 1:
        seeds = " ".join(map(str, args.seeds))
        print(f"pooled over seeds {seeds} (each round's counts summed over the seeds, then the rates):")
        print_table(pool_rounds(rounds))
        print(f"pooled over seeds {seeds}, the model each round scored with, all on round {ROUNDS}'s part:")
        print_table(pool_rounds(fixed))
        print(f"pooled over seeds {seeds}, each round's part scored by the round-1 version:")
        print_table(pool_rounds(paired))


def run_seed(args: argparse.Namespace, seed: int, work: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """The three rounds on one seed's demo data in `work`; prints its tables and returns the counts behind
    them (`round_counts`, for pooling over seeds): per round, per round's model on the last part, and the
    round-1 model on each round's part."""
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    (work / "mlruns").mkdir(exist_ok=True)
    started = time.perf_counter()
    data = work / "data"
    cli("generate", "--out", str(data), "--seed", str(seed), "--history", str(args.history),
        "--customers", str(args.customers), "--batch", str(ROUNDS * args.part), uri=uri)  # fmt: skip
    config = load_config(data / "config.yaml")
    challenger = f"models:/{config.name}@challenger"  # the version trained on the latest decisions
    id_column = config.id_column
    batch, truth = read(data / "batch.csv"), read(data / "batch_truth.csv")
    clerk = Clerk(truth, read(data / "history_truth.csv"))

    history = write_csv(read(data / "records.csv"), work / "history.csv")
    log = work / "corrections.csv"
    log.write_bytes((data / "corrections.csv").read_bytes())
    cli(
        "train",
        "--config",
        str(data / "config.yaml"),
        "--records",
        str(history),
        "--corrections",
        str(log),
        uri=uri,
    )

    rows, counts = [], []
    previous: tuple[Path, Path, set[tuple[str, ...]]] | None = None  # part, its reference, rejected flags
    for r in range(1, ROUNDS + 1):
        part = batch.iloc[(r - 1) * args.part : r * args.part].reset_index(drop=True)
        part_path = write_csv(part, work / f"part{r}.csv")
        part_truth = write_csv(
            truth[truth[s.LOG_RECORD_ID].isin(set(part[id_column]))], work / f"truth{r}.csv"
        )
        reference = write_csv(read(history), work / f"reference{r}.csv")  # the history as this round saw it
        out = work / f"out{r}"
        flags = score(f"models:/{config.name}@{args.score_with}", part_path, out, reference, uri=uri)
        earlier_ids = truth[s.LOG_RECORD_ID].isin(set(batch[id_column].iloc[: (r - 1) * args.part]))
        # The merges among the reference's records (the history's, and the earlier parts'): a link to any
        # record of the true cluster is right.
        earlier_truth = write_csv(
            pd.concat([read(data / "history_truth.csv"), truth[earlier_ids]], ignore_index=True),
            work / f"reference_truth{r}.csv",
        )
        figures = evaluate_output(config, out, part_path, part_truth, reference, earlier_truth)
        summary = json.loads((out / s.SUMMARY_FILE).read_text(encoding="utf-8"))
        evaluation = (part_path, part_truth, reference, earlier_truth)  # the last round's: the fixed part

        came_back = ""
        if previous is not None:
            rescored = score(challenger, previous[0], work / f"rescore{r - 1}", previous[1], uri=uri)
            came_back = len(previous[2] & flag_identity(rescored))

        # The clerk works through the queue; the page's own writer records each decision.
        stored = part.set_index(id_column)
        rejected = []
        for flag in flags.to_dict(orient="records"):
            verdict, typed = clerk.decide(flag)
            append_decision(out / s.DECISIONS_FILE, {**flag, s.DECISION: verdict, s.DECISION_NEW_VALUE: typed,
                            s.DECISION_DECIDED_AT: pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
                            s.DECISION_SECONDS: str(SECONDS[verdict])})  # fmt: skip
            if verdict == s.DECISION_REJECT:
                rejected.append(flag)
            elif flag[s.FLAG_KIND] == s.KIND_ERROR:
                stored.at[flag[s.FLAG_RECORD_ID], flag[s.FLAG_FIELD]] = typed or flag[s.FLAG_SUGGESTION]
        feedback_out = cli("feedback", "--decisions", str(out / s.DECISIONS_FILE), "--corrections", str(log),
                           uri=uri)  # fmt: skip
        write_csv(pd.concat([read(history), stored.reset_index()], ignore_index=True), history)
        cli("train", "--config", str(data / "config.yaml"), "--records", str(history),
            "--corrections", str(log), uri=uri)  # fmt: skip
        promoted = cli("promote", "--name", config.name, uri=uri).strip().splitlines()[-1]

        counts.append({**round_counts(figures), "rejected": len(rejected), "came back": came_back or 0})
        rows.append(
            {
                "round": r,
                "model": summary["model"]["version"],
                "rows": len(part),
                "flags": len(flags),
                **task_figures(counts[-1]),
                "rejected": len(rejected),
                "prev. rejected back unchanged": came_back,
                "promoted after": "yes" if promoted.startswith("moved") else "no",
            }
        )
        print(f"round {r}: {feedback_out.strip().splitlines()[-1]}", file=sys.stderr)
        print(f"round {r}: {promoted}", file=sys.stderr)
        previous = (part_path, reference, flag_identity(pd.DataFrame(rejected, columns=flags.columns)))

    # One fixed part for every round's model: the last round's part is new to each version that scored a
    # round (none was trained on it), so scored by each against the same reference, the differences are
    # the model's alone, not those between parts with different records and errors.
    fixed, fixed_counts = [], []
    for row in rows:
        version = row["model"]
        out = work / f"fixed_v{version}"
        found = score(f"models:/{config.name}/{version}", evaluation[0], out, evaluation[2], uri=uri)
        figures = evaluate_output(config, out, *evaluation)
        fixed_counts.append(round_counts(figures))
        fixed.append({"round": row["round"], "model": version, "rows": row["rows"], "flags": len(found),
                      **task_figures(fixed_counts[-1])})  # fmt: skip

    # Each later round's part scored by the round-1 version too, against the round's own reference: the
    # pairing that judges "F1 no worse than in round one" on the same records and errors.
    paired, paired_counts = [], []
    for r in range(1, ROUNDS + 1):
        out = work / f"out{r}" if r == 1 else work / f"paired{r}_v{rows[0]['model']}"
        if r > 1:
            score(f"models:/{config.name}/{rows[0]['model']}", work / f"part{r}.csv", out,
                  work / f"reference{r}.csv", uri=uri)  # fmt: skip
        figures = evaluate_output(config, out, work / f"part{r}.csv", work / f"truth{r}.csv",
                                  work / f"reference{r}.csv", work / f"reference_truth{r}.csv")  # fmt: skip
        paired_counts.append(round_counts(figures))
        paired.append({"round": r, "model": rows[0]["model"], "rows": rows[r - 1]["rows"],
                       **task_figures(paired_counts[-1])})  # fmt: skip

    # The last round's rejected flags, re-scored by the model trained on them.
    rescored = score(challenger, previous[0], work / f"rescore{ROUNDS}", previous[1], uri=uri)
    last_back = len(previous[2] & flag_identity(rescored))
    realised = _latest_realised(uri, config.name)

    print(
        f"review rounds: demo seed {seed}, history {args.history}, {ROUNDS} x {args.part} batch rows; "
        f"{time.perf_counter() - started:.0f} s; work folder {work}"
    )
    print_table(rows)
    print(f"the model each round scored with, all on round {ROUNDS}'s part against its reference:")
    print_table(fixed)
    print("each round's part scored by the round-1 version (the round's own version: the first table):")
    print_table(paired)
    print(f"rejected flags of round {ROUNDS} back unchanged after the final retraining: {last_back}")
    print("realised-value metrics of the last training run: " + json.dumps(realised))
    return counts, fixed_counts, paired_counts


def round_counts(figures: dict[str, float]) -> dict[str, int]:
    """The counts behind a round's figures (`evaluate_output`'s): true and false positives and misses per
    task, false anomaly flags and rows. Counts, not rates, so that rounds of several seeds add up."""
    counts = {
        f"{task} {c}": int(figures[f"batch_{task}_{c}"])
        for task in ("duplicate", "error", "correction")
        for c in ("tp", "fp", "fn")
    }
    flags = figures["batch_anomaly_flags"]
    counts["anomaly fp"] = int(round(flags * (1 - figures["batch_anomaly_precision"])))
    counts["rows"] = int(figures["batch_rows"])
    return counts


def task_figures(counts: dict[str, int]) -> dict[str, float | str]:
    """The table's quality columns from a round's counts (`round_counts`, or their sum over seeds)."""
    dup, err, corr = (prf(*(counts[f"{task} {c}"] for c in ("tp", "fp", "fn")))
                      for task in ("duplicate", "error", "correction"))  # fmt: skip
    false_alarms = (counts["duplicate fp"], counts["error fp"], counts["anomaly fp"])
    return {
        "dup P": dup["precision"],
        "dup R": dup["recall"],
        "dup F1": dup["f1"],
        "err P": err["precision"],
        "err R": err["recall"],
        "err F1": err["f1"],
        "corr F1": corr["f1"],
        "false alarms /100 rows": 100 * sum(false_alarms) / counts["rows"],
        "false alarms dup/err/anom": "/".join(map(str, false_alarms)),
    }


def pool_rounds(per_seed: list[list[dict[str, int]]]) -> list[dict]:
    """One table row per round from every seed's counts of that round, summed."""
    rows = []
    for r, rounds in enumerate(zip(*per_seed, strict=True), start=1):
        total = {key: sum(counts[key] for counts in rounds) for key in rounds[0]}
        row = {"round": r, "rows": total["rows"], **task_figures(total)}
        if "rejected" in total:
            row["rejected"] = total["rejected"]
            row["prev. rejected back unchanged"] = total["came back"] if r > 1 else ""
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---:" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


def _latest_realised(uri: str, name: str) -> dict[str, float]:
    """The realised_* metrics logged by the newest run of the experiment."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    metrics = runs[0].data.metrics if runs else {}
    keep = ("reviewed", "accepted", "minutes", "euros", "share_duplicate", "share_error", "share_anomaly")
    return {
        k: round(v, 3)
        for k, v in sorted(metrics.items())
        if k.startswith("realised_") and any(word in k for word in keep) and "share_error_" not in k
    }


if __name__ == "__main__":
    main()

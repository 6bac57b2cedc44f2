"""Duplicates at scale through the CLI: a small history, a batch twenty times larger, busy customers.

Runs the product exactly as a user does, one child process per command: `python -m pipeline generate`,
`train` (on its own MLflow store in the work folder), then `score` of the batch against the history, and
compares `records.csv` with the demo's ground truth (`batch_truth.csv`, complete) through
`pipeline.evaluate.evaluate_output`. Each command's wall time and peak resident memory (the child's
ru_maxrss) are measured.

The false alarms are sorted by what the linked records share, to show whether the model still takes a
busy customer's repeat order (same customer and amount, another order number, another date) for a
re-registration:

* `repeat order`: same customer code and amount, order number and order date differ;
* `same customer`: same customer code, something else differs;
* `other`: the rest.

    .venv/bin/python benchmarks/duplicates_scale.py                    # 3,000 customers, 10,000 + 200,000
    .venv/bin/python benchmarks/duplicates_scale.py --batch 20000      # a quick look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A fresh parent per measurement: ru_maxrss of children is the maximum over every child ever waited for.
_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one command."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    seconds, kilobytes = out.stdout.split()
    return float(seconds), int(kilobytes) / 1024


def false_alarm_kinds(work: Path, config_path: Path, truth_path: Path, reference_path: Path) -> dict:
    """Counts the wrong links by what the two records share (see the module docstring)."""
    import pandas as pd

    from pipeline.config import load_config
    from pipeline.corrections import cluster_roots, load_log
    from pipeline.ingest import read_table

    config = load_config(config_path)
    out = read_table(work / "out" / "records.csv")
    reference = read_table(reference_path)
    log = load_log(truth_path)
    merges = log[log["action"] == "merge"]
    roots = cluster_roots(frozenset(p) for p in zip(merges["record_id"], merges["merged_into"], strict=True))
    every = pd.concat([reference, out[reference.columns]], ignore_index=True).set_index(config.id_column)
    kinds = {"repeat order": 0, "same customer": 0, "other": 0}
    for record_id, match in zip(out[config.id_column], out["duplicate_of"], strict=True):
        if not match or (record_id in roots and roots.get(match, match) == roots[record_id]):
            continue
        a, b = every.loc[record_id], every.loc[match]
        same = a["customer_code"] == b["customer_code"] and a["amount"] == b["amount"]
        if same and a["order_number"] != b["order_number"] and a["order_date"] != b["order_date"]:
            kinds["repeat order"] += 1
            continue
        kinds["same customer" if a["customer_code"] == b["customer_code"] else "other"] += 1
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    parser.add_argument("--repeat-share", type=float, default=None, help="generate --repeat-share")
    parser.add_argument("--work", type=Path, default=None, help="keep data here (default: a temp folder)")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_output

    base = args.work or Path(tempfile.mkdtemp(prefix="bench-dupscale-"))
    python = [sys.executable, "-m", "pipeline"]
    rows = []
    for seed in args.seeds:
        work = base / f"seed-{seed}"
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        generate = [*python, "generate", "--out", str(data), "--seed", str(seed)]
        generate += ["--customers", str(args.customers), "--history", str(args.history)]
        generate += ["--batch", str(args.batch)]
        if args.repeat_share is not None:
            generate += ["--repeat-share", str(args.repeat_share)]
        measure(generate, env)
        train = [
            *python,
            "train",
            "--config",
            str(data / "config.yaml"),
            "--records",
            str(data / "records.csv"),
        ]
        train += ["--corrections", str(data / "corrections.csv")]
        train_s, train_mb = measure(train, env)
        score = [*python, "score", "--model", "models:/orders@champion", "--input", str(data / "batch.csv")]
        score += [
            "--reference",
            str(data / "records.csv"),
            "--output",
            str(work / "out"),
            "--overwrite",
            "-q",
        ]
        score_s, score_mb = measure(score, env)
        config = load_config(data / "config.yaml")
        figures = evaluate_output(
            config,
            work / "out",
            data / "batch.csv",
            data / "batch_truth.csv",
            data / "records.csv",
            data / "history_truth.csv",
        )
        kinds = false_alarm_kinds(work, data / "config.yaml", data / "batch_truth.csv", data / "records.csv")
        rows.append((seed, figures, kinds, train_s, train_mb, score_s, score_mb))

    print(
        f"duplicates at scale: {args.customers:,} customers, history {args.history:,}, batch {args.batch:,}"
        f" (work: {base})"
    )
    print(
        "| seed | precision | recall | F1 | flags | false: repeat order | same customer | other "
        "| train s | train MB | score s | score MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seed, m, kinds, train_s, train_mb, score_s, score_mb in rows:
        flags = int(m.get("batch_duplicate_tp", 0) + m.get("batch_duplicate_fp", 0))
        print(
            f"| {seed} | {m['batch_duplicate_precision']:.3f} | {m['batch_duplicate_recall']:.3f} "
            f"| {m['batch_duplicate_f1']:.3f} | {flags:,} | {kinds['repeat order']:,} "
            f"| {kinds['same customer']:,} | {kinds['other']:,} | {train_s:.0f} | {train_mb:.0f} "
            f"| {score_s:.0f} | {score_mb:.0f} |"
        )


if __name__ == "__main__":
    main()

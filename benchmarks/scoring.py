"""Batch-job throughput and memory: batches of N rows scored against a 10,000-record reference.

Trains once on a 10,000-record demo history (the reference), then runs `python -m pipeline score` in a
child process per batch size and reads its peak resident memory from the kernel (ru_maxrss), so the
figure is the whole job's, imports included.

    .venv/bin/python benchmarks/scoring.py                   # 200,000 and 1,000,000 rows
    .venv/bin/python benchmarks/scoring.py --rows 20000      # a quick run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
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


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one command."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], check=True, cwd=ROOT, capture_output=True, text=True
    )
    seconds, kilobytes = out.stdout.split()
    return float(seconds), int(kilobytes) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument(
        "--customers",
        type=int,
        default=20_000,
        help="customers behind the orders: enough that a large batch is not one customer's orders repeated",
    )
    parser.add_argument("--work", type=Path, default=None, help="keep data here (default: a temp folder)")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.generate import generate
    from pipeline.train import train

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    rows_out = []
    started = time.perf_counter()
    base = generate(work / "history", customers=args.customers, history=args.reference, batch=0, seed=1)
    result = train(load_config(base.config), base.records, base.corrections)
    model = result.bundle.save(work / "model")
    train_seconds = time.perf_counter() - started
    for n in args.rows:
        data = generate(
            work / f"batch-{n}", customers=args.customers, history=args.reference, batch=n, seed=1
        )
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "score",
            "--model",
            str(model),
            "--input",
            str(data.batch),
            "--reference",
            str(data.records),
            "--output",
            str(work / f"out-{n}"),
            "--overwrite",
            "-q",
        ]
        seconds, peak_mb = measure(command)
        summary = json.loads((work / f"out-{n}" / "summary.json").read_text())
        flagged = summary["flags"]["total"] / n
        rows_out.append((n, args.reference, seconds, n / seconds, peak_mb, flagged))
    print(f"training on {args.reference} records (generate + train): {train_seconds:.1f} s")
    print("| batch rows | reference | seconds | rows/s | peak MB | flags per row |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, ref, seconds, rate, peak, flagged in rows_out:
        print(f"| {n:,} | {ref:,} | {seconds:.1f} | {rate:,.0f} | {peak:.0f} | {flagged:.3f} |")


if __name__ == "__main__":
    main()

"""`score --engine spark` on one machine against the in-process batch job: wall time, rows/s, peak memory.

Trains once on a 10,000-record demo history (the reference), generates a batch of N rows, then runs
`python -m pipeline score` in a child process per engine and samples the memory of its whole process tree
every 0.2 s (psutil): the driver's Python process, the JVM (in local mode the driver and the executors are
one JVM, so its figure is both) and the Python workers Spark starts for `mapInPandas`. The JVM heap is capped
with `--driver-memory` (default 2g). Also checks that both engines wrote byte-identical records and flags.

    .venv/bin/python benchmarks/spark.py                        # 1,000,000 rows on local[2]
    .venv/bin/python benchmarks/spark.py --rows 20000           # a quick run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.ingest import file_digest  # noqa: E402


def run(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Runs a command; returns its wall seconds and peak resident MB: per role and for the whole tree."""
    peaks = {"driver": 0.0, "jvm": 0.0, "workers": 0.0, "total": 0.0}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    parent = psutil.Process(process.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                sizes = {"driver": 0.0, "jvm": 0.0, "workers": 0.0}
                for proc in tree:
                    rss = proc.memory_info().rss / 2**20
                    name = proc.name()
                    role = "driver" if proc.pid == parent.pid else "jvm" if "java" in name else "workers"
                    sizes[role] += rss
            except psutil.Error:
                continue
            for role, size in sizes.items():
                peaks[role] = max(peaks[role], size)
            peaks["total"] = max(peaks["total"], sum(sizes.values()))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code:
        raise SystemExit(f"{' '.join(command)} exited {code}")
    return {"seconds": time.perf_counter() - started, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="2g")
    parser.add_argument("--engines", nargs="+", default=["local", "spark"], choices=["local", "spark"])
    parser.add_argument("--work", type=Path, default=None, help="keep data here (default: a temp folder)")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.generate import generate
    from pipeline.train import train

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-spark-"))
    started = time.perf_counter()
    model = work / "model"
    if not model.exists():
        base = generate(work / "history", customers=800, history=args.reference, batch=0, seed=1)
        result = train(load_config(base.config), base.records, base.corrections)
        result.bundle.save(model)
    data_dir = work / f"batch-{args.rows}"
    if (data_dir / "batch.csv").exists():
        batch, records = data_dir / "batch.csv", data_dir / "records.csv"
    else:
        data = generate(data_dir, customers=800, history=args.reference, batch=args.rows, seed=1)
        batch, records = data.batch, data.records
    prepare_seconds = time.perf_counter() - started

    env = dict(os.environ)
    # The JVM is started by PySpark inside the scoring process; this is how its heap is set from outside.
    env["PYSPARK_SUBMIT_ARGS"] = f"--driver-memory {args.driver_memory} pyspark-shell"
    results = {}
    for engine in args.engines:
        output = work / f"out-{engine}-{args.rows}"
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "score",
            "--model",
            str(model),
            "--input",
            str(batch),
            "--reference",
            str(records),
            "--output",
            str(output),
            "--overwrite",
            "-q",
            "--engine",
            engine,
        ]
        if engine == "spark":
            command += ["--spark-master", args.master]
        results[engine] = run(command, env)
        outputs = ("records.csv", "flags.csv")
        results[engine]["digests"] = tuple(file_digest(output / name) for name in outputs)

    print(f"model and data (generate + train): {prepare_seconds:.1f} s; {os.cpu_count()} cores")
    print(
        f"{'engine':<16} {'batch rows':>10} {'reference':>9} {'seconds':>8} {'rows/s':>8} "
        f"{'driver MB':>9} {'JVM MB':>7} {'workers MB':>10} {'total MB':>8}"
    )
    for engine, r in results.items():
        name = f"spark {args.master}" if engine == "spark" else "in-process"
        print(
            f"{name:<16} {args.rows:>10,} {args.reference:>9,} {r['seconds']:>8.1f} "
            f"{args.rows / r['seconds']:>8,.0f} {r['driver']:>9.0f} {r['jvm']:>7.0f} "
            f"{r['workers']:>10.0f} {r['total']:>8.0f}"
        )
    if len(results) == 2:
        same = results["local"]["digests"] == results["spark"]["digests"]
        print(f"records.csv and flags.csv identical between engines: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()

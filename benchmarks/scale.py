"""Issue 11 at scale: wall time, rows/s and peak memory of the whole process tree, in one table.

Every measured step runs the product's CLI (`python -m pipeline ...`) in a child process; a sampler
(psutil, every 0.2 s) sums the resident memory of the child and all its descendants (worker processes,
Spark's JVM) and kills the tree when it passes `--max-mb` or `--timeout`, so no run can take the machine
down. That RSS sum is the headline peak (issue 11's targets are judged on it); it counts the pages that
processes share (a `--workers` helper's libraries, copy-on-write pages) once per process. Beside it, the
peak of the PSS sum (proportional set size, /proc/PID/smaps_rollup: each shared page split between the
processes that map it) is the tree's physical memory; on one process the two are nearly equal. The
third, the peak of the tree's anonymous memory (RSS less its file-backed pages, `RssAnon`), leaves out
what the index keeps in memory-mapped temporary files (`ColumnFile`): page cache the system can write
back and reclaim, unlike the heap.
Every sample is also kept, as it is taken, in `<work>/<case>-<n>.memory.csv` (seconds, rows done as the
run's log reports them, RSS-sum MB, anonymous MB); for each `score` run a second table gives the peak in
each quarter of its rows ("MB at 2.5M, 5M, 7.5M, 10M rows"): flat memory reads as equal figures.
Data: the demo generator with 20,000 customers (seed 1), as issue 11 asks.

    benchmarks/.venv-bench/bin/python benchmarks/scale.py                      # 200k and 2M vs 10k
    benchmarks/.venv-bench/bin/python benchmarks/scale.py --cases score-200k --workers 1 2
    benchmarks/.venv-bench/bin/python benchmarks/scale.py --cases train-200k big-reference

The harness needs psutil (the bench venv has it); the product runs in `.venv` (`--python`).
Cases: `score-200k` (200,000 rows against a 10,000-row reference), `score-2m` (2,000,000 rows against it),
`score-10m` (10,000,000 rows against it: is memory flat? generating its data takes ~2 min and ~2.3 GB;
the run about 1-1.5 h at `--workers 1`, so give it `--timeout 6000`),
`train-200k` (`train` on a 200,000-row history, about 25,000 log rows), `train-1m` (`train` on a
1,000,000-row history, about 125,000 log rows), `big-reference` (5,000 rows against a 1,000,000-row
reference), `spark-1m` (`--engine spark`, local[2], 1,000,000 rows, against the in-process job),
`duplicates-200k` (the duplicate work of `score-200k` alone: our duplicate stage in one process and with
`--pair-helper` (two), and Splink 5 on DuckDB
trained unsupervised and predicting on the same reference and batch; see `scale_children.py`; Splink
runs in this harness's own python, so the bench venv needs `requirements-bench.txt`).

    benchmarks/.venv-bench/bin/python benchmarks/scale.py --cases score-200k duplicates-200k --workers 1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.ingest import file_digest  # noqa: E402  (the product's one file hash; needs only pandas)

CUSTOMERS = 20_000
SEED = 1
CASES = (
    "score-200k",
    "score-2m",
    "score-10m",
    "train-200k",
    "train-1m",
    "big-reference",
    "spark-1m",
    "duplicates-200k",
)
CHILDREN = Path(__file__).resolve().parent / "scale_children.py"


@dataclass
class Run:
    case: str
    what: str
    rows: int
    seconds: float
    peak_mb: float  # the peak of the tree's RSS sum (the headline figure)
    status: str = "ok"
    cpu_s: float = 0.0  # user + system CPU seconds of the child and the descendants it waited for
    peak_pss_mb: float = 0.0  # the peak of the tree's PSS sum (shared pages counted once); 0 where unknown
    peak_anon_mb: float = 0.0  # the peak of the tree's anonymous memory (RSS less file-backed pages)
    phases: dict[str, float] | None = None  # what a duplicate-only child reports (seconds per phase)
    output: Path | None = None  # the output folder of a `score` run
    timeline: Path | None = None  # the memory timeline (`measure`, `timeline_path`)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_memory(tree: list[psutil.Process]) -> tuple[int, int, int]:
    """The RSS sum, the PSS sum and the anonymous memory sum of `tree` in bytes (PSS 0 where the system
    does not report it; anonymous = RSS less resident file-backed pages, psutil's `shared` on Linux, which
    is `RssAnon` in /proc/PID/status; RSS where the system does not report it)."""
    import psutil  # here, not at the top: the timeline's summary (and its test) runs without psutil

    rss = pss = anon = 0
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", 0)
            anon += info.rss - getattr(info, "shared", 0)
    return rss, pss, anon


class LogProgress:
    """The rows a `score` run has done so far, read from its log as it grows: the batch job logs "scored N
    rows" (INFO) after each chunk it writes; 0 before the first, and for runs that log no such line."""

    LINE = re.compile(r"scored (\d+) rows$", re.MULTILINE)

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0
        self.pending = ""
        self.rows = 0

    def read(self) -> int:
        with contextlib.suppress(OSError), open(self.log, encoding="utf-8", errors="replace") as fh:
            fh.seek(self.offset)
            text = self.pending + fh.read()
            self.offset = fh.tell()
            complete, _, self.pending = text.rpartition("\n")  # a line still being written waits
            for match in self.LINE.finditer(complete):
                self.rows = int(match.group(1))
        return self.rows


TIMELINE_COLUMNS = ("seconds", "rows", "rss_mb", "anon_mb")


def timeline_path(log: Path) -> Path:
    """`<work>/<case>-<n>.memory.csv` beside the run's `<work>/<case>-<n>.log`."""
    return log.with_suffix(".memory.csv")


def measure(
    command: list[str], *, timeout: float, max_mb: float, log: Path
) -> tuple[float, float, str, float, float, float]:
    """Runs `command`; returns wall seconds, the peak RSS-sum MB of its process tree, "ok" or why it was
    stopped, the CPU seconds of the tree (comparable when other jobs share the machine, unlike wall time),
    the peak PSS-sum MB and the peak anonymous-memory MB of the tree (`tree_memory`).
    Every sample is also written, as it is taken, to the memory timeline beside the log (`timeline_path`):
    seconds since the start, rows done (`LogProgress`), RSS-sum MB and anonymous MB of the tree."""
    import psutil

    cpu_before = children_cpu()
    peak = peak_pss = peak_anon = 0.0
    status = "ok"
    started = time.perf_counter()
    progress = LogProgress(log)
    with open(log, "w") as out, open(timeline_path(log), "w", newline="") as timeline_file:
        timeline = csv.writer(timeline_file)
        timeline.writerow(TIMELINE_COLUMNS)
        # This checkout's package first: a script outside it (scale_children.py) would otherwise import the
        # package the venv was installed from (an editable install may point at another checkout).
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        parent = psutil.Process(child.pid)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_pss, peak_anon, status
            while not stop.is_set():
                try:
                    tree = [parent, *parent.children(recursive=True)]
                except psutil.Error:
                    break
                total, proportional, anonymous = tree_memory(tree)
                peak = max(peak, total / 2**20)
                peak_pss = max(peak_pss, proportional / 2**20)
                peak_anon = max(peak_anon, anonymous / 2**20)
                elapsed = time.perf_counter() - started
                timeline.writerow(
                    [f"{elapsed:.1f}", progress.read(), f"{total / 2**20:.1f}", f"{anonymous / 2**20:.1f}"]
                )
                timeline_file.flush()  # readable while the run goes on, and kept if the harness is stopped
                if peak > max_mb or elapsed > timeout:
                    status = f"stopped: {'memory' if peak > max_mb else 'time'} limit"
                    for proc in reversed(tree):
                        with contextlib.suppress(psutil.Error):
                            proc.kill()
                    break
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if status == "ok" and code != 0:
        status = f"exit {code} (see {log})"
    return seconds, peak, status, children_cpu() - cpu_before, peak_pss, peak_anon


@dataclass
class Sample:
    seconds: float
    rows: int  # rows done when the sample was taken (`LogProgress`)
    rss_mb: float
    anon_mb: float


def read_timeline(path: Path) -> list[Sample]:
    with open(path, newline="") as fh:
        return [
            Sample(float(r["seconds"]), int(r["rows"]), float(r["rss_mb"]), float(r["anon_mb"]))
            for r in csv.DictReader(fh)
        ]


def quarter_peaks(samples: list[Sample], rows: int) -> tuple[list[str], list[tuple[float, float]]]:
    """The peak (RSS MB, anonymous MB) in each part of a run, with each part's label.

    When the run logs its progress: "start", until its first chunk is written (loading, indexing the
    reference, reading the first chunk: not a cost of the batch's length), then each quarter of the rows
    ("2.5M" holds the samples past 0 up to 2,500,000 rows of 10,000,000; the last also the finish after
    the last row). Else quarters of its wall time ("50% s"). Flat memory reads as equal quarters; memory
    that grows with the batch, as rising ones. A quarter no sample fell in (a run stopped early) reads 0.
    """
    by_rows = any(s.rows for s in samples)

    def done(sample: Sample) -> float:
        return sample.rows if by_rows else sample.seconds

    parts = [("start", [s for s in samples if s.rows == 0])] if by_rows else []
    within = [s for s in samples if s.rows > 0] if by_rows else samples
    end = rows if by_rows else max(map(done, samples), default=0.0)
    for quarter in range(1, 5):
        low, high = end * (quarter - 1) / 4, end * quarter / 4
        inside = [s for s in within if (quarter == 1 or done(s) > low) and (quarter == 4 or done(s) <= high)]
        parts.append((short_count(high) if by_rows else f"{25 * quarter}% s", inside))
    labels = [label for label, _ in parts]
    peaks = [
        (max((s.rss_mb for s in inside), default=0.0), max((s.anon_mb for s in inside), default=0.0))
        for _, inside in parts
    ]
    return labels, peaks


def short_count(n: float) -> str:
    """10,000,000 -> "10M", 2,500,000 -> "2.5M", 50,000 -> "50k"."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.4g}{suffix}"
    return f"{n:.0f}"


def print_timelines(runs: list[Run]) -> None:
    """For each run, the peak RSS and anonymous MB before its first chunk is written and in each quarter of
    its rows (`quarter_peaks`) beside its whole peak: does the batch job's memory stay flat as the batch
    goes on?"""
    if not runs:
        return
    print(
        "\nmemory along each run: peak at the start and in each quarter of its rows (<case>-<n>.memory.csv)\n"
    )
    print(
        "| case | run | parts (rows done) | RSS MB by part | anonymous MB by part | peak RSS / anonymous MB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in runs:
        labels, peaks = quarter_peaks(read_timeline(r.timeline), r.rows)
        rss = " / ".join(f"{p[0]:,.0f}" for p in peaks)
        anon = " / ".join(f"{p[1]:,.0f}" for p in peaks)
        peak = f"{r.peak_mb:,.0f} / {r.peak_anon_mb:,.0f}"
        print(f"| {r.case} | {r.what} | {' / '.join(labels)} | {rss} | {anon} | {peak} |")


def duplicate_quality(flags: Path, batch: Path) -> dict[str, float]:
    """The duplicate flags of a `score` output against the generator's truth beside the batch, counted as
    the duplicate-only run counts its links (`scale_children.quality`)."""
    if str(CHILDREN.parent) not in sys.path:
        sys.path.insert(0, str(CHILDREN.parent))
    from scale_children import quality

    links: dict[str, str] = {}
    with open(flags, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["kind"] == "duplicate":
                links[row["record_id"]] = row["match_id"]
    return quality(links, batch)


def cli(python: str, *args: str) -> list[str]:
    return [python, "-m", "pipeline", *args]


def generate(python: str, out: Path, history: int, batch: int) -> Path:
    if not (out / "config.yaml").exists():
        sizes = ["--customers", str(CUSTOMERS), "--history", str(history), "--batch", str(batch)]
        command = cli(python, "generate", "--out", str(out), *sizes, "--seed", str(SEED), "-q")
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


TRAIN_TO_FOLDER = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')\n"
    "from pipeline.config import load_config\n"
    "from pipeline.train import train\n"
    "d = sys.argv[1]\n"
    "r = train(load_config(d + '/config.yaml'), d + '/records.csv', d + '/corrections.csv')\n"
    "r.bundle.save(sys.argv[2])\n"
)


def main() -> None:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=["score-200k", "score-2m"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="score --workers values")
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--work", type=Path, default=None, help="keep data here (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--max-mb", type=float, default=6000.0, help="kill a run whose tree passes this")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    py = args.python
    runs: list[Run] = []

    def run(case: str, what: str, rows: int, command: list[str], timeout: float | None = None) -> Run:
        log = work / f"{case}-{len(runs)}.log"
        seconds, peak, status, cpu, peak_pss, peak_anon = measure(
            command, timeout=timeout or args.timeout, max_mb=args.max_mb, log=log
        )
        result = Run(
            case, what, rows, seconds, peak, status, cpu_s=cpu, peak_pss_mb=peak_pss, peak_anon_mb=peak_anon
        )
        result.timeline = timeline_path(log)
        runs.append(result)
        print(
            f"{case}: {what}: {seconds:.1f} s ({cpu:.1f} CPU s), {result.rate:,.0f} rows/s, "
            f"{peak:,.0f} MB (PSS {peak_pss:,.0f} MB, anonymous {peak_anon:,.0f} MB), {status}",
            flush=True,
        )
        return result

    model = work / "model-10k"
    scoring = [
        c
        for c in args.cases
        if c.startswith("score") or c in ("big-reference", "spark-1m", "duplicates-200k")
    ]
    if scoring and not (model / "bundle.json").exists():
        base = generate(py, work / "data-10k", 10_000, 0)
        run("train-10k", "train on 10,000 rows (model for the scoring cases)", 10_000,
            [py, "-c", TRAIN_TO_FOLDER, str(base), str(model)])  # fmt: skip

    def score(case: str, data: Path, rows: int, reference: Path, *extra: str, what: str = "") -> Run:
        out = work / f"out-{case}-{len(runs)}"
        files = ["--input", str(data / "batch.csv"), "--reference", str(reference), "--output", str(out)]
        files += ["--cache-dir", str(work / "reference-cache")]  # never a cache of another run or user
        # Not `-q`: the job's INFO line after each chunk ("scored N rows") is the timeline's progress.
        command = cli(py, "score", "--model", str(model), *files, "--overwrite", *extra)
        result = run(case, what, rows, command)
        result.output = out
        if result.status == "ok":
            summary = json.loads((out / "summary.json").read_text())
            result.what += f"; {summary['flags']['duplicate']:,} duplicate flags"
            found = duplicate_quality(out / "flags.csv", Path(files[1]))
            if "precision" in found:
                result.what += f" (P {found['precision']:.4f}, R {found['recall']:.4f} against the truth)"
        return result

    for case, rows in (("score-200k", 200_000), ("score-2m", 2_000_000), ("score-10m", 10_000_000)):
        if case in args.cases:
            data = generate(py, work / f"data-{case}", 10_000, rows)
            for workers in args.workers:
                score(case, data, rows, data / "records.csv", "--workers", str(workers),
                      what=f"{rows:,} rows vs 10,000, --workers {workers}")  # fmt: skip
    if "duplicates-200k" in args.cases:
        data = generate(py, work / "data-score-200k", 10_000, 200_000)
        files = ["--reference", str(data / "records.csv"), "--batch", str(data / "batch.csv")]
        systems = (
            ("ours", py, ["--model", str(model)]),
            ("ours --pair-helper", py, ["--model", str(model), "--pair-helper"]),
            ("splink", sys.executable, []),
        )
        for system, python, extra in systems:
            result = run("duplicates-200k", f"duplicate stage only: {system}", 200_000,
                         [python, str(CHILDREN), system.split()[0], *files, *extra])  # fmt: skip
            if result.status == "ok":
                log = (work / f"duplicates-200k-{len(runs) - 1}.log").read_text().splitlines()
                result.phases = json.loads(next(line for line in reversed(log) if line.startswith("{")))
                phases = ", ".join(f"{k} {v:.1f}" for k, v in result.phases.items() if k.endswith("_s"))
                result.what += f" ({phases}; {result.phases['links']:,} batch records linked)"
                print(f"  {result.what}", flush=True)
    for case, rows in (("train-200k", 200_000), ("train-1m", 1_000_000)):
        if case in args.cases:
            data = generate(py, work / f"data-{case}", rows, 0)
            with open(data / "corrections.csv", newline="") as log:
                log_rows = sum(1 for _ in csv.reader(log)) - 1
            model_out = work / f"model-{case.removeprefix('train-')}"
            # The 1M case may take longer than a scoring run: a whole hour before it is stopped.
            run(case, f"train on a {rows:,}-row history, {log_rows:,} log rows", rows,
                [py, "-c", TRAIN_TO_FOLDER, str(data), str(model_out)],
                timeout=max(args.timeout, 3600.0) if rows > 200_000 else None)  # fmt: skip
    if "big-reference" in args.cases:
        data = generate(py, work / "data-ref-1m", 1_000_000, 5_000)
        # First: the reference read, prepared and cached; again: the same model and reference, loaded.
        shutil.rmtree(work / "reference-cache", ignore_errors=True)
        for attempt in ("first", "again, prepared reference loaded from the cache"):
            score(
                "big-reference",
                data,
                5_000,
                data / "records.csv",
                what=f"5,000 rows vs 1,000,000 ({attempt})",
            )
    if "spark-1m" in args.cases:
        data = generate(py, work / "data-spark-1m", 10_000, 1_000_000)
        spark = ("--engine", "spark", "--spark-master", "local[2]")
        local = score("spark-1m", data, 1_000_000, data / "records.csv", what="in-process, 1,000,000 rows")
        on_spark = score(
            "spark-1m", data, 1_000_000, data / "records.csv", *spark, what="spark local[2], 1M rows"
        )
        if local.status == on_spark.status == "ok":
            same = all(
                file_digest(local.output / name) == file_digest(on_spark.output / name)
                for name in ("records.csv", "flags.csv")
            )
            on_spark.what += "; records.csv and flags.csv " + ("byte-identical" if same else "DIFFER")
            print(f"  {on_spark.what}", flush=True)

    print(f"\nwork folder: {work}\n")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(
        "| case | run | rows | seconds | CPU s | rows/s | peak MB (process tree, RSS sum) "
        "| peak PSS MB (second figure: shared pages once) | peak anonymous MB (RSS less file-backed) "
        "| status |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in runs:
        figures = f"{r.rows:,} | {r.seconds:.1f} | {r.cpu_s:.1f} | {r.rate:,.0f} | {r.peak_mb:,.0f}"
        figures += f" | {r.peak_pss_mb:,.0f} | {r.peak_anon_mb:,.0f}"
        print(f"| {r.case} | {r.what} | {figures} | {r.status} |")
    print_timelines([r for r in runs if r.case.startswith("score")])
    (work / "scale.json").write_text(json.dumps([r.__dict__ for r in runs], indent=2, default=str))


if __name__ == "__main__":
    main()

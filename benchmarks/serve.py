"""The entry-time check under load: single-record checks against a 200,000-record reference, on loopback.

Trains once on a modest demo history (4,000 records), generates a 200,000-record history with the same
config as the reference, starts `python -m pipeline serve` on a free 127.0.0.1 port, and measures

* start-up: seconds from the process start until `GET /health` answers 200 (model and reference loaded),
  and the server's resident memory (VmRSS from /proc) then and after the load;
* latency of single-record `POST /check` (not remembered) at 1, 4 and 16 concurrent clients, each client on
  its own keep-alive connection: p50, p99 and throughput, after a short warm-up.

Every level stops after `--requests` checks or `--seconds`, whichever comes first; the server is stopped
at the end. Loopback only; nothing leaves the machine.

    .venv/bin/python benchmarks/serve.py                        # the figures in BENCHMARKS.md
    .venv/bin/python benchmarks/serve.py --reference 20000      # a quick run
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (load-independent, unlike latency)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_costs(model: str, uri: str, reference: Path, records: list[dict[str, str]], n: int = 100) -> dict:
    """CPU milliseconds per single-record check, by stage of `score_chunk`, in this process: what a check
    costs the server before any queueing."""
    import pandas as pd

    from pipeline.ingest import read_table
    from pipeline.registry import load_bundle
    from pipeline.score import _matched_values, score_chunk

    bundle = load_bundle(model, uri=uri)
    matcher = bundle.duplicates.matcher(read_table(reference))
    config = bundle.config
    chunks = [pd.DataFrame([r], dtype=object)[config.required_columns()] for r in records[:n]]
    for chunk in chunks[:5]:
        score_chunk(chunk, bundle, matcher)
    costs: dict[str, float] = {}

    def timed(name: str, fn) -> list:  # noqa: ANN001
        started = time.process_time()
        out = [fn(chunk) for chunk in chunks]
        costs[name] = 1000 * (time.process_time() - started) / len(chunks)
        return out

    links = timed("duplicates (match, not remembered)", lambda c: matcher.match(c, remember=False))
    matched = [
        _matched_values(c, lk, matcher, config.check_fields) for c, lk in zip(chunks, links, strict=True)
    ]
    pairs = iter(matched)
    timed("errors and suggestions (ErrorModel.assess)", lambda c: bundle.errors.assess(c, next(pairs)))
    timed("anomaly score (AnomalyModel.score)", bundle.anomalies.score)
    timed("score_chunk, all of it", lambda c: score_chunk(c, bundle, matcher))
    return costs


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> int:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


def run_level(
    port: int, bodies: list[bytes], clients: int, requests: int, seconds: float
) -> dict[str, float]:
    """`clients` threads, each with its own connection, share `requests` checks (stopping after `seconds`)."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for i in counter:
                if time.monotonic() > deadline:
                    break
                body = bodies[(offset * 7919 + i) % len(bodies)]
                started = time.perf_counter()
                status = _request(conn, "POST", "/check", body)
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    failures[0] += status != 200
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures[0],
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "per_second": len(latencies) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=int, default=200_000, help="records in the reference")
    parser.add_argument("--history", type=int, default=4000, help="records the model is trained on")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=400, help="checks per level at most")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--work", type=Path, default=None, help="keep data and model here (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from pipeline.cli import main as cli

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    uri = f"sqlite:///{(work / 'mlruns').resolve()}/mlflow.db"
    (work / "mlruns").mkdir(parents=True, exist_ok=True)
    train_data, reference_data = work / "train", work / "reference"
    if not (reference_data / "records.csv").exists():
        customers = max(300, args.reference // 10)
        batch = ["--batch", "2000", "--seed", "5"]
        cli(
            [
                "generate",
                "--out",
                str(reference_data),
                "--customers",
                str(customers),
                "--history",
                str(args.reference),
                *batch,
            ]
        )
    if not (train_data / "records.csv").exists():
        cli(["generate", "--out", str(train_data), "--history", str(args.history), "--batch", "10"])
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("orders", "champion")
    except Exception:
        files = [
            "--records",
            str(train_data / "records.csv"),
            "--corrections",
            str(train_data / "corrections.csv"),
        ]
        assert (
            cli(["train", "--config", str(train_data / "config.yaml"), *files, "--tracking-uri", uri, "-q"])
            == 0
        )

    # The checks: the new batch's records, one per request, without notes (not a configured field).
    with open(reference_data / "batch.csv", newline="", encoding="utf-8") as fh:
        records = [{k: v for k, v in row.items() if k != "notes"} for row in csv.DictReader(fh)]
    bodies = [json.dumps({"records": [record]}).encode() for record in records]

    port = _free_port()
    command = [sys.executable, "-m", "pipeline", "serve", "--model", "models:/orders@champion"]
    command += [
        "--reference",
        str(reference_data / "records.csv"),
        "--port",
        str(port),
        "--poll-seconds",
        "0",
    ]
    command += ["--tracking-uri", uri, "-q"]
    log = open(work / "serve.log", "w")  # noqa: SIM115
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "MLFLOW_TRACKING_URI": ""}
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}; see {work / 'serve.log'}")
            if time.perf_counter() - started > 600:
                raise SystemExit("serve did not come up within 600 s")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                if _request(conn, "GET", "/health") == 200:
                    conn.close()
                    break
            except OSError:
                time.sleep(0.1)
        startup = time.perf_counter() - started
        rss_ready = _rss_mb(proc.pid)
        peak_load = _hwm_mb(proc.pid)
        print(
            f"start-up {startup:.1f} s with a {args.reference:,}-record reference; RSS {rss_ready:.0f} MB",
            flush=True,
        )
        run_level(port, bodies, 1, 30, 30)  # warm-up
        levels = []
        for clients in args.clients:
            cpu = _cpu_seconds(proc.pid)
            level = run_level(port, bodies, clients, args.requests, args.seconds)
            level["server_cpu_ms"] = 1000 * (_cpu_seconds(proc.pid) - cpu) / max(level["requests"], 1)
            levels.append(level)
            print(
                f"{clients:>3} clients: {level['requests']} checks, p50 {level['p50_ms']:.1f} ms, "
                f"p99 {level['p99_ms']:.1f} ms, {level['per_second']:.1f} checks/s, "
                f"server CPU {level['server_cpu_ms']:.1f} ms per check",
                flush=True,
            )
        rss_after = _rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    load = os.getloadavg()[0]
    stages = stage_costs("models:/orders@champion", uri, reference_data / "records.csv", records)
    figures = {
        "reference_records": args.reference,
        "startup_seconds": startup,
        "rss_mb_ready": rss_ready,
        "rss_mb_peak_during_load": peak_load,
        "rss_mb_after": rss_after,
        "cpus": os.cpu_count(),
        "load_average": load,
        "levels": levels,
        "stage_cpu_ms": stages,
    }
    print()
    print(
        "| clients | checks | p50 ms | p90 ms | p99 ms | max ms | checks/s | server CPU ms/check | failures |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for level in levels:
        print(
            f"| {level['clients']} | {level['requests']} | {level['p50_ms']:.1f} | {level['p90_ms']:.1f} | "
            f"{level['p99_ms']:.1f} | {level['max_ms']:.1f} | {level['per_second']:.1f} | "
            f"{level['server_cpu_ms']:.1f} | {level['failures']} |"
        )
    print(
        f"\nstart-up {startup:.1f} s (model and {args.reference:,} reference records loaded and indexed); "
        f"server RSS {rss_ready:.0f} MB when ready (peak {peak_load:.0f} MB while loading), "
        f"{rss_after:.0f} MB after the run"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} during the run")
    print("\n| stage of one single-record check | CPU ms |\n| --- | ---: |")
    for name, ms in stages.items():
        print(f"| {name} | {ms:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

"""Tests of `benchmarks/scale.py`'s memory timeline: the progress it reads from a run's log and the peak
it reports in each quarter of a run (the measuring itself needs psutil, which only the bench venv has)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", SCALE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_progress_follows_the_log_as_it_grows_and_waits_for_a_whole_line(scale, tmp_path):
    log = tmp_path / "score-10m-0.log"
    progress = scale.LogProgress(log)
    assert progress.read() == 0  # no log yet
    log.write_text("2026-12-06 12:41:37 INFO pipeline.reference: prepared\n")
    assert progress.read() == 0
    with open(log, "a") as fh:
        fh.write("2026-12-06 12:41:54 INFO pipeline.score: scored 10000 rows\n")
        fh.write("2026-12-06 12:42:00 INFO pipeline.score: scored 20000 rows\n")
        fh.write("2026-12-06 12:42:05 INFO pipeline.score: scored 3")  # still being written
    assert progress.read() == 20_000
    with open(log, "a") as fh:
        fh.write("0000 rows\nscored 30000 rows in 12.0 s: 1 duplicate\n")  # the CLI's last line: not progress
    assert progress.read() == 30_000


def test_quarters_of_rows_follow_the_start_and_hold_the_finish_and_show_growth(scale):
    s = scale.Sample
    samples = [
        s(0.0, 0, 100.0, 50.0),  # before the first chunk is written: the start
        s(0.5, 0, 500.0, 450.0),
        s(1.0, 250, 300.0, 200.0),
        s(2.0, 300, 310.0, 210.0),
        s(3.0, 500, 320.0, 220.0),
        s(4.0, 750, 330.0, 230.0),
        s(5.0, 1000, 340.0, 240.0),
        s(6.0, 1000, 900.0, 800.0),  # finishing after the last row: last quarter
    ]
    labels, peaks = scale.quarter_peaks(samples, 1000)
    assert labels == ["start", "250", "500", "750", "1k"]
    assert peaks == [(500.0, 450.0), (300.0, 200.0), (320.0, 220.0), (330.0, 230.0), (900.0, 800.0)]


def test_a_run_stopped_early_reads_zero_in_the_quarters_it_never_reached(scale):
    samples = [scale.Sample(1.0, 1_000_000, 400.0, 300.0), scale.Sample(2.0, 3_000_000, 410.0, 310.0)]
    labels, peaks = scale.quarter_peaks(samples, 10_000_000)
    assert labels == ["start", "2.5M", "5M", "7.5M", "10M"]
    assert peaks == [(0.0, 0.0), (400.0, 300.0), (410.0, 310.0), (0.0, 0.0), (0.0, 0.0)]


def test_without_progress_the_quarters_are_of_wall_time(scale):
    samples = [scale.Sample(float(t), 0, 100.0 + t, 10.0 * t) for t in range(9)]
    labels, peaks = scale.quarter_peaks(samples, 200_000)
    assert labels == ["25% s", "50% s", "75% s", "100% s"]
    assert peaks == [(102.0, 20.0), (104.0, 40.0), (106.0, 60.0), (108.0, 80.0)]


def test_timeline_written_by_the_harness_reads_back(scale, tmp_path):
    path = scale.timeline_path(tmp_path / "score-2m-1.log")
    assert path.name == "score-2m-1.memory.csv"
    path.write_text("seconds,rows,rss_mb,anon_mb\n0.2,0,7.5,2.2\n9.4,10000,413.1,325.9\n")
    samples = [scale.Sample(0.2, 0, 7.5, 2.2), scale.Sample(9.4, 10_000, 413.1, 325.9)]
    assert scale.read_timeline(path) == samples

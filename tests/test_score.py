"""The batch job: every row once and unchanged, bad input refused cleanly, atomic and repeatable output."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import re_registered, slipped

from pipeline import schema as s
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(demo, tmp_path_factory) -> Path:
    """A model trained on the demo data and saved as a bundle folder (no tracking store involved)."""
    from pipeline.config import load_config
    from pipeline.train import train

    result = train(load_config(demo.config), demo.records, demo.corrections)
    return result.bundle.save(tmp_path_factory.mktemp("model") / "bundle")


def test_a_saved_model_keeps_the_config_it_was_trained_with(demo, model_folder):
    from pipeline.bundle import ModelBundle
    from pipeline.config import load_config

    trained = load_config(demo.config)
    loaded = ModelBundle.load(model_folder).config
    assert list(loaded.fields) == list(trained.fields)  # the order too, not only the same set
    assert loaded.check_fields == trained.check_fields
    assert loaded.model_dump() == trained.model_dump()


def score(model_folder: Path, batch: Path, output: Path, *extra: str) -> int:
    return main(
        ["score", "--model", str(model_folder), "--input", str(batch), "--output", str(output), *extra]
    )


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def batch_lines(demo) -> list[str]:
    return demo.batch.read_text(encoding="utf-8").splitlines(keepends=True)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def test_awkward_values_come_back_exactly(demo, model_folder, tmp_path):
    header, first = read_rows(demo.batch)[:2]
    awkward = [
        "NA",
        "null",
        "None",
        "nan",
        "007",
        "1e5",
        "1,50",
        ' "quoted" ',
        "line\nbreak",
        "Ærø 北京 🙂",
        "  ",
        "-0",
        "lone\rreturn",
        "crlf\r\ninside",
    ]
    rows = []
    for i, value in enumerate(awkward):
        row = dict(zip(header, first, strict=True))
        row["record_id"] = f"X{i:03d}"
        row["notes"] = value
        row["customer_name"] = value if i % 2 else row["customer_name"]
        row["extra_column"] = value
        rows.append(row)
    batch = tmp_path / "awkward.csv"
    with open(batch, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*header, "extra_column"])
        writer.writeheader()
        writer.writerows(rows)
    assert score(model_folder, batch, tmp_path / "out") == 0
    with open(tmp_path / "out" / s.RECORDS_FILE, newline="", encoding="utf-8") as fh:
        back = list(csv.DictReader(fh))
    assert [{k: r[k] for k in rows[0]} for r in back] == rows


def test_chunked_scoring_equals_one_chunk(demo, model_folder, tmp_path):
    assert score(model_folder, demo.batch, tmp_path / "one", "--reference", str(demo.records)) == 0
    assert (
        score(
            model_folder,
            demo.batch,
            tmp_path / "many",
            "--reference",
            str(demo.records),
            "--chunk-rows",
            "37",
        )
        == 0
    )
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name


def test_header_only_batch_is_a_normal_day(demo, model_folder, tmp_path):
    batch = write(tmp_path / "empty.csv", batch_lines(demo)[0])
    assert score(model_folder, batch, tmp_path / "out") == 0
    assert read_rows(tmp_path / "out" / s.RECORDS_FILE) == [[*read_rows(demo.batch)[0], *s.RECORD_COLUMNS]]
    assert read_rows(tmp_path / "out" / s.FLAGS_FILE) == [list(s.FLAG_COLUMNS)]
    summary = json.loads((tmp_path / "out" / s.SUMMARY_FILE).read_text())
    assert summary["input"]["rows"] == 0 and summary["flags"]["total"] == 0


def test_parquet_in_and_out(demo, model_folder, tmp_path):
    import pandas as pd

    frame = pd.read_csv(demo.batch, dtype=str, keep_default_na=False)
    frame.to_parquet(tmp_path / "batch.parquet", index=False)
    assert (
        score(model_folder, tmp_path / "batch.parquet", tmp_path / "out", "--output-format", "parquet") == 0
    )
    records = pd.read_parquet(tmp_path / "out" / "records.parquet")
    assert records["record_id"].tolist() == frame["record_id"].tolist()
    assert records["amount"].tolist() == frame["amount"].tolist()
    assert (tmp_path / "out" / "flags.parquet").exists()


def bad_cases(demo, tmp: Path) -> list[tuple[str, Path, str]]:
    lines = batch_lines(demo)
    header = lines[0]
    cases = [
        ("missing file", tmp / "absent.csv", "file not found"),
        ("empty file", write(tmp / "empty.csv", ""), "file is empty"),
        (
            "not utf-8",
            # 0x81 is neither UTF-8 nor Windows-1252 (a Windows-1252 file is read, see test_ingest)
            write(tmp / "latin1.csv", (header + lines[1]).encode() + b"Caf\x81,x\n"),
            "line 3 is not UTF-8",
        ),
        (
            "too many cells",
            write(tmp / "wide.csv", header + lines[1].rstrip("\n") + ",extra\n"),
            "row 1 (line 2) has 15 cells, the header has 14",
        ),
        (
            "too few cells",
            write(tmp / "narrow.csv", header + lines[1] + "R9,2024-01-01\n"),
            "row 2 (line 3) has 2 cells",
        ),
        (
            "no id column",
            write(tmp / "noid.csv", header.replace("record_id", "id") + lines[1]),
            "missing column 'record_id'",
        ),
        ("duplicate ids", write(tmp / "dupid.csv", header + lines[1] + lines[1]), "appears more than once"),
        (
            "field missing",
            write(tmp / "nofield.csv", header.replace(",amount,", ",amount_eur,") + lines[1]),
            "missing column 'amount'",
        ),
    ]
    return cases


@pytest.mark.parametrize("case", range(8))
def test_bad_batch_exits_2_names_the_fault_and_leaves_nothing(demo, model_folder, tmp_path, capsys, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    name, batch, message = bad_cases(demo, inputs)[case]
    results = tmp_path / "results"
    results.mkdir()
    code = score(model_folder, batch, results / "out")
    err = capsys.readouterr().err
    assert code == 2, name
    assert message in err and str(batch) in err, (name, err)
    assert err.count("\n") == 1
    assert os.listdir(results) == [], "nothing may be left behind"


def test_duplicate_ids_across_chunks_are_caught(demo, model_folder, tmp_path, capsys):
    lines = batch_lines(demo)
    batch = write(tmp_path / "b.csv", lines[0] + "".join(lines[1:6]) + lines[2])
    assert score(model_folder, batch, tmp_path / "out", "--chunk-rows", "2") == 2
    err = capsys.readouterr().err
    repeated = lines[2].split(",")[0]
    assert f"{batch}: row 6: record_id '{repeated}' appears more than once" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["b.csv"], "nothing may be left behind"


def test_unwritable_output_location(demo, model_folder, tmp_path, capsys):
    blocker = write(tmp_path / "file", "x")
    assert score(model_folder, demo.batch, blocker / "out") == 2
    assert "cannot write here" in capsys.readouterr().err


def test_overwrite_replaces_a_previous_result(demo, model_folder, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    assert score(model_folder, demo.batch, output, "--overwrite") == 0
    assert not (output / "stale.txt").exists() and (output / s.FLAGS_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _start(model_folder: Path, batch: Path, output: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "score",
            "--model",
            str(model_folder),
            "--input",
            str(batch),
            "--output",
            str(output),
            "--chunk-rows",
            "50",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_staging(parent: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        staging = [p for p in parent.iterdir() if p.name.startswith(".out.partial-")]
        if (
            staging
            and (staging[0] / s.RECORDS_FILE).exists()
            and (staging[0] / s.RECORDS_FILE).stat().st_size
        ):
            return
        time.sleep(0.05)
    raise AssertionError("the run finished or never started writing")


@pytest.fixture(scope="module")
def big_batch(demo, tmp_path_factory) -> Path:
    """The demo batch repeated under new ids, so a run takes long enough to be killed midway."""
    lines = batch_lines(demo)
    path = tmp_path_factory.mktemp("big") / "big.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(lines[0])
        for copy in range(12):
            for line in lines[1:]:
                fh.write(f"K{copy:02d}" + line)
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_run_leaves_no_result(model_folder, big_batch, tmp_path, sig):
    proc = _start(model_folder, big_batch, tmp_path / "out")
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not (tmp_path / "out").exists()
    if sig == signal.SIGTERM:  # a polite stop also cleans its temporary folder
        assert list(tmp_path.iterdir()) == []
        assert proc.returncode != 0


def test_internal_failure_exits_1_in_one_line_and_leaves_nothing(
    demo, model_folder, tmp_path, capsys, monkeypatch
):
    import pipeline.score

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    # Failure injection: the real job, with the scorer made to fail on the first chunk.
    monkeypatch.setattr(pipeline.score, "assess_chunk", broken)
    assert score(model_folder, demo.batch, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err == "internal error: RuntimeError: disk on fire (rerun with --verbose for details)\n"
    assert list(tmp_path.iterdir()) == []


def _column(path: Path, names: tuple[str, ...]) -> list[tuple[str, ...]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [tuple(row[n] for n in names) for row in csv.DictReader(fh)]


def test_duplicates_do_not_depend_on_chunk_borders(demo, model_folder, tmp_path):
    """Chunks of 7 rows cut through many duplicate pairs of the batch; the links, their clusters and the
    duplicate flags must come out as from one chunk."""
    for name, rows in (("one", "100000"), ("seven", "7")):
        assert score(model_folder, demo.batch, tmp_path / name, "--chunk-rows", rows) == 0
    links = (s.DUPLICATE_OF, s.DUPLICATE_SCORE, s.CLUSTER_ID)
    one = _column(tmp_path / "one" / s.RECORDS_FILE, ("record_id", *links))
    seven = _column(tmp_path / "seven" / s.RECORDS_FILE, ("record_id", *links))
    # The data can break the property: some records link to a batch record of an earlier chunk of 7.
    row_of = {row[0]: i for i, row in enumerate(one)}
    across = [i for i, row in enumerate(one) if row[1] in row_of and row_of[row[1]] // 7 != i // 7]
    assert len(across) >= 3
    assert seven == one
    kinds = ("record_id", "kind", "field", "value", "suggestion", "score")
    flags_one = _column(tmp_path / "one" / s.FLAGS_FILE, kinds)
    flags_seven = _column(tmp_path / "seven" / s.FLAGS_FILE, kinds)
    assert [f for f in flags_seven if f[1] == s.KIND_DUPLICATE] == [
        f for f in flags_one if f[1] == s.KIND_DUPLICATE
    ]


def test_error_and_anomaly_flags_do_not_depend_on_chunk_borders(demo, model_folder, tmp_path):
    """Chunks of 7 rows: every row's running number (order number) is judged against the rows entered
    before it, most of them in earlier chunks; records.csv and flags.csv must come out byte for byte as
    from one chunk (errors, their scores, suggestions and reasons, and anomalies)."""
    import pandas as pd

    from pipeline.bundle import ModelBundle
    from pipeline.detectors import RunningNumbers
    from pipeline.ingest import read_table

    for name, rows in (("one", "100000"), ("seven", "7")):
        assert score(model_folder, demo.batch, tmp_path / name, "--chunk-rows", rows) == 0
    # The data can break the property: each chunk of 7 judged alone (no running numbers carried over)
    # scores many order numbers differently, and flags other cells.
    errors = ModelBundle.load(model_folder).errors
    batch = read_table(demo.batch)
    fresh = RunningNumbers(errors.running_numbers().names)
    pieces = range(0, len(batch), 7)
    alone = pd.concat([errors.cell_scores(batch.iloc[i : i + 7], numbers=fresh) for i in pieces])
    assert (alone["order_number"] != errors.cell_scores(batch)["order_number"]).sum() >= len(batch) // 7
    flagged_alone = pd.concat([errors.detect(batch.iloc[i : i + 7], numbers=fresh) for i in pieces])
    flagged = errors.detect(batch)
    cells = ("row", "field")
    assert set(flagged_alone[list(cells)].itertuples(index=False)) != set(
        flagged[list(cells)].itertuples(index=False)
    )
    kinds = [kind for _, kind in _column(tmp_path / "one" / s.FLAGS_FILE, ("record_id", "kind"))]
    assert s.KIND_ANOMALY in kinds and s.KIND_ERROR in kinds
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "seven" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


@pytest.mark.parametrize(("run_flags", "written"), [(1, 2), (4, 2), (5, 1), (8, 1)])
def test_flag_runs_merge_in_the_order_of_one_sort(tmp_path, run_flags, written):
    """Spilled runs merged k-way give `sort_flags`' order of all flags at once, ties and all, whether
    each chunk's flags make a run, chunks share one, or all flags are held until the merge."""
    import pandas as pd

    from pipeline.score import FlagRuns, sort_flags

    def flags(rows: list[tuple[int, str, str, float]]) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "_row": r,
                    s.FLAG_RECORD_ID: f"R{r}",
                    s.FLAG_KIND: k,
                    s.FLAG_FIELD: f,
                    s.FLAG_VALUE: "v",
                    s.FLAG_SUGGESTION: "",
                    s.FLAG_MATCH_ID: "",
                    s.FLAG_SCORE: sc,
                    s.FLAG_REASON: 'why, "so"',
                    s.FLAG_SUGGEST_EMPTY: "false",
                }
                for r, k, f, sc in rows
            ]
        )

    first = flags(
        [
            (0, "error", "b", 0.9),
            (0, "error", "a", 0.9),
            (1, "anomaly", "", 0.1 + 0.2),
            (2, "duplicate", "", 1.0),
        ]
    )
    second = flags(
        [(3, "duplicate", "", 0.9), (3, "error", "a", 0.9), (4, "error", "x", 0.30000000000000004 - 1e-17)]
    )
    runs = FlagRuns(tmp_path / "runs", run_flags=run_flags)
    runs.add(first)
    runs.add(second.iloc[:0])
    runs.add(second)
    assert runs.merge_into(tmp_path / "flags.csv") == 7
    assert len(runs.paths) == written
    expected = sort_flags(pd.concat([first, second], ignore_index=True))
    got = pd.read_csv(tmp_path / "flags.csv", dtype=str, keep_default_na=False)
    assert got[s.FLAG_RECORD_ID].tolist() == expected[s.FLAG_RECORD_ID].tolist()
    assert got[s.FLAG_FIELD].tolist() == expected[s.FLAG_FIELD].tolist()
    assert got[s.FLAG_SCORE].tolist()[:3] == ["1.0000", "0.9000", "0.9000"]
    assert not (tmp_path / "runs").exists()


def test_evicting_matcher_links_as_the_full_index(demo, model_folder):
    """With a window of 2 and only the blocking rules whose blocks are large, most records leave every
    block window and are dropped; the links are the same. (A rule on a nearly unique key such as an order
    number keeps every record in its own block's window: nothing can be evicted exactly then.)"""
    from pipeline.bundle import ModelBundle
    from pipeline.ingest import iter_table, read_table

    bundle = ModelBundle.load(model_folder)
    reference = read_table(demo.records)
    keys, _ = bundle.duplicates.blocking_keys(reference)
    rules = bundle.duplicates.rules_
    busy = [rule for rule, values in zip(rules, keys, strict=True) if len(set(values)) < 200]
    assert busy
    bundle.duplicates.rules_ = busy
    bundle.duplicates.window = 2
    full = bundle.duplicates.matcher(reference)
    lean = bundle.duplicates.matcher(reference, evict=True)
    for chunk in iter_table(demo.batch, chunk_rows=25):
        expected = full.match(chunk)
        got = lean.match(chunk)
        assert got.equals(expected)
        linked = expected[s.DUPLICATE_OF] != ""
        # What the batch job reads of each link's record: by the position the link carries.
        at = got.loc[linked, s.DUPLICATE_POSITION].tolist()
        assert lean.records_at(at) == full.records(expected.loc[linked, s.DUPLICATE_OF].tolist())
    assert lean.resident < len(lean) / 2


def test_worker_processes_write_what_one_process_writes(demo, model_folder, tmp_path, monkeypatch):
    """Errors and anomalies in two worker processes, duplicates here: the same files byte for byte. The
    helpers' model file (a temporary pickle) is gone afterwards."""
    import tempfile

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    common = ("--reference", str(demo.records), "--chunk-rows", "50")
    assert score(model_folder, demo.batch, tmp_path / "one", *common) == 0
    assert score(model_folder, demo.batch, tmp_path / "two", *common, "--workers", "2") == 0
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert list(temporary.glob("pipeline-assess-*")) == []


def test_run_batch_spawns_its_own_helpers_when_none_are_given(demo, model_folder, tmp_path):
    """Called without `helpers` (not from the CLI), `run_batch` spawns them once the models are loaded:
    the same files byte for byte as one process."""
    from pipeline.bundle import ModelBundle
    from pipeline.score import run_batch

    common = {"reference_path": demo.records, "chunk_rows": 50}
    run_batch(ModelBundle.load(model_folder), demo.batch, tmp_path / "one", **common)
    run_batch(ModelBundle.load(model_folder), demo.batch, tmp_path / "two", workers=2, **common)
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.skipif(sys.platform != "linux", reason="helpers are forked on Linux only")
def test_helpers_are_forked_before_the_models_load():
    """`start_helpers` forks its helpers at once (where fork exists), so what this process imports or
    loads afterwards is not in them, and no resource-tracker process is started beside them."""
    probe = (
        "import os, sys\n"
        "from pipeline.score import start_helpers\n"
        "def loaded(name):\n"
        "    return name in sys.modules\n"
        "helpers = start_helpers(2)\n"
        "import pipeline.registry\n"
        "names = ('pipeline.registry', 'pipeline.errors')\n"
        "found = [helpers.submit(loaded, name).result() for name in names]\n"
        "print(*found, helpers.submit(os.getppid).result() == os.getpid())\n"
        "from multiprocessing import resource_tracker\n"
        "print(resource_tracker._resource_tracker._pid)\n"
        "helpers.shutdown()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["False", "True", "True", "None"]


def test_pieces_across_helpers_write_what_one_process_writes(demo, model_folder, tmp_path, monkeypatch):
    """Chunks cut into 7-row pieces shared between this process and two helpers (each piece with the
    running numbers of the rows before it): the same files byte for byte as one process in one piece."""
    from pipeline import score as score_module

    assert score(model_folder, demo.batch, tmp_path / "one", "--reference", str(demo.records)) == 0
    monkeypatch.setattr(score_module, "PIECE_ROWS", 7)
    common = ("--reference", str(demo.records), "--chunk-rows", "60", "--workers", "3")
    assert score(model_folder, demo.batch, tmp_path / "pieces", *common) == 0
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "pieces" / name).read_bytes(), name


def test_matcher_parts_write_what_one_part_writes(demo, model_folder, tmp_path, monkeypatch):
    """One chunk given to the matcher 7 rows at a time (`MATCH_ROWS`; duplicates found across those parts
    and the matched values handed on per part): the same files byte for byte as in one part."""
    from pipeline import score as score_module

    common = ("--reference", str(demo.records), "--chunk-rows", "100000")
    assert score(model_folder, demo.batch, tmp_path / "one", *common) == 0
    calls = []
    real_link_chunk = score_module.link_chunk

    def link_chunk(chunk, bundle, matcher):
        calls.append(len(chunk))
        return real_link_chunk(chunk, bundle, matcher)

    monkeypatch.setattr(score_module, "MATCH_ROWS", 7)
    monkeypatch.setattr(score_module, "link_chunk", link_chunk)
    assert score(model_folder, demo.batch, tmp_path / "parts", *common, "--workers", "2") == 0
    assert len(calls) == 1 and calls[0] > 7  # one chunk, so only the matcher's parts cut it
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes(), name


@pytest.mark.skipif(sys.platform != "linux", reason="the pair helper is forked on Linux only")
def test_the_pair_helper_writes_what_one_process_alone_writes(demo, model_folder, tmp_path, monkeypatch):
    """With `pair_helper` a `PairHelper` scores the matcher parts' pairs (7-row parts, 50-row chunks: parts
    linked across chunk borders, two parts behind), as `score --pair-helper` asks: the same files byte for
    byte as without it (the default), and the helper is gone when the job is."""
    import multiprocessing

    from pipeline import linkage
    from pipeline import score as score_module
    from pipeline.bundle import ModelBundle
    from pipeline.score import run_batch

    monkeypatch.setattr(score_module, "MATCH_ROWS", 7)
    scored = []
    real = linkage.PairHelper.receive

    def receive(self):
        scores = real(self)
        scored.append(len(scores))
        return scores

    monkeypatch.setattr(linkage.PairHelper, "receive", receive)
    run_batch(
        ModelBundle.load(model_folder),
        demo.batch,
        tmp_path / "one",
        reference_path=demo.records,
        chunk_rows=50,
    )
    assert not scored
    common = ("--reference", str(demo.records), "--chunk-rows", "50", "--pair-helper")
    assert score(model_folder, demo.batch, tmp_path / "two", *common) == 0
    assert len(scored) > 20 and sum(scored) > 1000
    assert multiprocessing.active_children() == []
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_the_index_is_freed_before_the_last_pieces_are_assessed(demo, model_folder, tmp_path, monkeypatch):
    """Once every chunk is linked, `run_batch` lets go of the matcher (a long batch's largest part) before
    this process assesses the last pieces beside the helpers: freed then, without a collector pass."""
    import weakref

    from pipeline import score as score_module

    matchers, alive_at_finish = [], []
    real_init, real_finish = score_module._Scorer.__init__, score_module._Scorer.finish

    def init(self, bundle, matcher, workers, *args):
        matchers.append(weakref.ref(matcher))
        real_init(self, bundle, matcher, workers, *args)

    def finish(self):
        alive_at_finish.append(matchers[0]() is not None)
        yield from real_finish(self)

    monkeypatch.setattr(score_module._Scorer, "__init__", init)
    monkeypatch.setattr(score_module._Scorer, "finish", finish)
    common = ("--reference", str(demo.records), "--chunk-rows", "50", "--workers", "2")
    assert score(model_folder, demo.batch, tmp_path / "out", *common) == 0
    assert alive_at_finish == [False]
    assert (tmp_path / "out" / s.FLAGS_FILE).read_text().count(s.KIND_DUPLICATE) > 0


def test_a_helper_loads_no_duplicate_model(model_folder, tmp_path):
    """A `--workers` helper imports `pipeline.score` and unpickles what it is sent (`AssessModel`): neither
    pulls in dedupe or the linkage modules (~15 MB of a helper's memory). What helpers write is checked
    by the tests above."""
    import pickle

    from pipeline.bundle import ModelBundle
    from pipeline.score import AssessModel

    bundle = ModelBundle.load(model_folder)
    sent = tmp_path / "sent.pkl"
    sent.write_bytes(pickle.dumps(AssessModel(bundle.config, bundle.errors, bundle.anomalies)))
    probe = (
        "import pickle, sys\n"
        "import pipeline.score\n"
        f"model = pickle.loads(open({str(sent)!r}, 'rb').read())\n"
        "print(type(model).__name__, sorted(m for m in ('dedupe', 'pipeline.linkage', 'pipeline.bundle', "
        "'pipeline.reference') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["AssessModel", "[]"]


def test_workers_below_one_is_refused(demo, model_folder, tmp_path, capsys):
    assert score(model_folder, demo.batch, tmp_path / "out", "--workers", "0") == 2
    assert "--workers 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_pair_helper_needs_one_worker(demo, model_folder, tmp_path, capsys):
    assert score(model_folder, demo.batch, tmp_path / "out", "--workers", "2", "--pair-helper") == 2
    err = capsys.readouterr().err
    assert "--pair-helper: only with --workers 1" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _record_chunk_rows(monkeypatch) -> list[int]:
    """The `chunk_rows` of each `iter_table` call `score` makes from now on, in a list filled as it runs."""
    from pipeline import score as score_module

    sizes: list[int] = []
    real_iter_table = score_module.iter_table

    def iter_table(*args, **kwargs):
        sizes.append(kwargs["chunk_rows"])
        return real_iter_table(*args, **kwargs)

    monkeypatch.setattr(score_module, "iter_table", iter_table)
    return sizes


def test_default_chunk_size_writes_what_one_chunk_writes(demo, model_folder, tmp_path, monkeypatch):
    """Without --chunk-rows, `score` reads `SCORE_CHUNK_ROWS` rows at a time (here 9, so the demo batch is
    many chunks, each cut into pieces shared with a helper): the same files byte for byte as one chunk."""
    from pipeline import score as score_module

    common = ("--reference", str(demo.records))
    assert score(model_folder, demo.batch, tmp_path / "one", *common, "--chunk-rows", "100000") == 0
    sizes = _record_chunk_rows(monkeypatch)
    monkeypatch.setattr(score_module, "SCORE_CHUNK_ROWS", 9)
    monkeypatch.setattr(score_module, "PIECE_ROWS", 4)
    assert score(model_folder, demo.batch, tmp_path / "default", *common, "--workers", "2") == 0
    assert sizes == [9]
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "default" / name).read_bytes(), name


def test_one_process_reads_a_matcher_part_at_a_time_by_default(demo, model_folder, tmp_path, monkeypatch):
    """Without --chunk-rows and helpers, `score` reads `MATCH_ROWS` rows at a time (one matcher part: here
    11), with helpers `SCORE_CHUNK_ROWS` (here 9): the same files byte for byte either way."""
    from pipeline import score as score_module

    assert score_module.default_chunk_rows(1) == score_module.MATCH_ROWS
    assert score_module.default_chunk_rows(2) == score_module.SCORE_CHUNK_ROWS
    sizes = _record_chunk_rows(monkeypatch)
    monkeypatch.setattr(score_module, "MATCH_ROWS", 11)
    monkeypatch.setattr(score_module, "SCORE_CHUNK_ROWS", 9)
    common = ("--reference", str(demo.records))
    assert score(model_folder, demo.batch, tmp_path / "one", *common) == 0
    assert score(model_folder, demo.batch, tmp_path / "two", *common, "--workers", "2") == 0
    assert sizes == [11, 9]
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_chunk_rows_below_one_is_refused(demo, model_folder, tmp_path, capsys):
    assert score(model_folder, demo.batch, tmp_path / "out", "--chunk-rows", "0") == 2
    assert "--chunk-rows 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_value_entered_alike_in_a_duplicate_beside_the_link_is_no_error(demo, model_folder):
    """A batch row re-registers an order the reference holds twice: as first entered, and re-registered
    with a slip in its order number. The row links to the re-registration (the later of two near-equal
    candidates) and keeps the original's number: entered alike in a record it duplicates, so no error.
    With only the re-registration in the reference, the same row's number is flagged (the data can break
    the property)."""
    import pandas as pd

    from pipeline.bundle import ModelBundle
    from pipeline.ingest import read_table
    from pipeline.score import score_chunk

    bundle = ModelBundle.load(model_folder)
    reference = read_table(demo.records)
    original = reference.iloc[700].to_dict()
    entered = pd.Timestamp(original["entered_at"])
    again = re_registered(original, "RE-1", (entered + pd.Timedelta(hours=1)).isoformat())
    again["order_number"] = slipped(original["order_number"])
    later = pd.Timestamp(reference["entered_at"].iloc[-1]) + pd.Timedelta(days=1)
    row = pd.DataFrame([re_registered(original, "RE-2", later.isoformat())])
    flagged = {}
    for name, frame in (("both", reference), ("re-registration only", reference.drop(index=700))):
        matcher = bundle.duplicates.matcher(pd.concat([frame, pd.DataFrame([again])], ignore_index=True))
        result = score_chunk(row, bundle, matcher)
        assert result.columns[s.DUPLICATE_OF].tolist() == ["RE-1"], name
        flagged[name] = result.flags.loc[result.flags[s.FLAG_KIND] == s.KIND_ERROR, s.FLAG_FIELD].tolist()
    assert flagged == {"both": [], "re-registration only": ["order_number"]}


def test_rows_duplicating_two_records_give_the_same_bytes_in_chunks_workers_and_with_the_pair_helper(
    demo, model_folder, re_registrations, tmp_path, monkeypatch
):
    """Rows that duplicate two records (`reference_duplicate_positions`) across chunk and matcher-part
    borders: chunks of 7 in two worker processes, and 7-row matcher parts scored by the pair helper, write
    what one process in one chunk writes, byte for byte."""
    import pandas as pd

    from pipeline import score as score_module
    from pipeline.bundle import ModelBundle
    from pipeline.ingest import read_table

    bundle = ModelBundle.load(model_folder)
    links = bundle.duplicates.matcher(read_table(demo.records)).match(read_table(re_registrations))
    # The data can break the property: rows with a second duplicate, some linked to the slipped copy.
    again = links[links.index >= len(links) - 8]
    assert (again[s.REFERENCE_DUPLICATE_POSITIONS].map(len) > 0).sum() >= 4
    assert again[s.DUPLICATE_OF].str.startswith("SL-").sum() >= 2
    common = ("--reference", str(demo.records))
    assert score(model_folder, re_registrations, tmp_path / "one", *common, "--chunk-rows", "100000") == 0
    assert score(model_folder, re_registrations, tmp_path / "seven", *common, "--chunk-rows", "7",
                 "--workers", "2") == 0  # fmt: skip
    monkeypatch.setattr(score_module, "MATCH_ROWS", 7)
    assert score(model_folder, re_registrations, tmp_path / "helper", *common, "--chunk-rows", "50",
                 "--pair-helper") == 0  # fmt: skip
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        expected = (tmp_path / "one" / name).read_bytes()
        assert (tmp_path / "seven" / name).read_bytes() == expected, name
        assert (tmp_path / "helper" / name).read_bytes() == expected, name
    flags = pd.read_csv(tmp_path / "one" / s.FLAGS_FILE, dtype=str, keep_default_na=False)
    again_flags = flags[flags[s.FLAG_RECORD_ID].str.startswith("AG-") & (flags[s.FLAG_KIND] == s.KIND_ERROR)]
    assert "order_number" not in set(again_flags[s.FLAG_FIELD])

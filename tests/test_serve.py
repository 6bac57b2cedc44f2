"""The entry-time check: the real `python -m pipeline serve` on a free loopback port, against a small demo."""

from __future__ import annotations

import copy
import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import train_argv

from pipeline.cli import main

BATCH_ROWS = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store(demo, tmp_path_factory) -> str:
    """A SQLite store with one trained model (version 1, champion)."""
    folder = tmp_path_factory.mktemp("serve-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert main(train_argv(demo, uri)) == 0
    return uri


@pytest.fixture(scope="module")
def server(demo, store, tmp_path_factory):
    """`python -m pipeline serve` following models:/orders@champion, polling every second."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "serve",
            "--model",
            "models:/orders@champion",
            "--reference",
            str(demo.records),
            "--port",
            str(port),
            "--poll-seconds",
            "1",
            "--max-body-bytes",
            "100000",
            "--max-records",
            "200",
            "--tracking-uri",
            store,
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        cwd=Path(__file__).resolve().parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if _get(url + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post(url: str, body: object, *, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _batch(demo) -> list[dict[str, str]]:
    with open(demo.batch, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:BATCH_ROWS]
    return [{k: v for k, v in row.items() if k != "notes"} for row in rows]


def _flag_key(flag: dict) -> tuple:
    score = flag["score"] if isinstance(flag["score"], str) else f"{flag['score']:.4f}"
    return (
        flag["record_id"],
        flag["kind"],
        flag["field"],
        flag["value"],
        flag["suggestion"],
        flag["match_id"],
        score,
        flag["reason"],
    )


def test_check_gives_the_flags_score_gives(demo, store, server, tmp_path):
    url, _ = server
    records = _batch(demo)
    status, health = _get(url + "/health")
    assert status == 200 and health["model"] == "orders" and health["version"] == "1"
    indexed = health["indexed_records"]

    status, answer = _post(url + "/check", {"records": records})
    assert status == 200
    results = answer["results"]
    assert [r["record_id"] for r in results] == [r["record_id"] for r in records]

    batch = tmp_path / "batch.csv"
    pd.DataFrame(records).to_csv(batch, index=False)
    out = tmp_path / "scored"
    argv = ["score", "--model", "models:/orders@champion", "--input", str(batch), "--output", str(out)]
    assert main([*argv, "--reference", str(demo.records), "--tracking-uri", store]) == 0
    with open(out / "flags.csv", newline="", encoding="utf-8") as fh:
        expected = sorted(_flag_key(f) for f in csv.DictReader(fh))
    got = sorted(_flag_key(f) for r in results for f in r["flags"])
    assert {k[1] for k in expected} >= {"duplicate", "error"}, "the sample must hold both kinds of flag"
    assert got == expected
    scored = pd.read_csv(out / "records.csv", dtype=str, keep_default_na=False)
    assert [r["duplicate_of"] for r in results] == scored["duplicate_of"].tolist()
    assert [f"{r['duplicate_score']:.4f}" for r in results] == scored["duplicate_score"].tolist()
    assert [str(r["needs_review"]).lower() for r in results] == scored["needs_review"].tolist()

    # A check without "remember" leaves the index as it was: the same answer again.
    assert _get(url + "/health")[1]["indexed_records"] == indexed
    assert _post(url + "/check", {"records": records})[1] == answer


def test_remembered_records_are_matched_and_unsaved_ids_not_reported(demo, server):
    url, _ = server
    first = _batch(demo)[0]
    new = {**first, "record_id": "NEW-1", "order_number": "SO-2099-123456", "amount": "4321.09"}
    copy_of_new = {**new, "record_id": "", "customer_name": new["customer_name"] + "x"}

    before = _post(url + "/check", {"records": [copy_of_new]})[1]["results"][0]
    assert before["record_id"] == "" and before["duplicate_of"] != "NEW-1"
    status, answer = _post(url + "/check", {"records": [new], "remember": True})
    assert status == 200 and answer["results"][0]["record_id"] == "NEW-1"
    after = _post(url + "/check", {"records": [copy_of_new]})[1]["results"][0]
    assert after["record_id"] == "" and after["duplicate_of"] == "NEW-1" and after["needs_review"]
    duplicate = [f for f in after["flags"] if f["kind"] == "duplicate"]
    assert duplicate and duplicate[0]["record_id"] == "" and duplicate[0]["match_id"] == "NEW-1"
    assert _get(url + "/health")[1]["remembered_records"] == 1
    # The same id cannot be remembered twice; the next request is served.
    assert _post(url + "/check", {"records": [new], "remember": True})[0] == 409


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        ([1, 2], 422, "JSON object"),
        ({"records": "R1"}, 422, "list of objects"),
        ({"records": [{"record_id": "X"}]}, 422, "missing field"),
        ({"records": ["text"]}, 422, "record 0"),
        ({"records": [], "remember": "yes"}, 422, "true or false"),
        ({"records": [{"record_id": 7}]}, 422, "must be a string"),
        ({"records": [{}] * 201}, 413, "at most 200"),
        (b'{"records": ["' + b"x" * 200_000 + b'"]}', 413, "over the limit"),
    ],
)
def test_bad_input_is_refused_and_the_next_request_served(demo, server, body, status, words):
    url, log = server
    answer = _post(url + "/check", body, raw=isinstance(body, bytes))
    assert answer[0] == status and words in answer[1]["error"]
    assert "\n" not in answer[1]["error"]
    record = _batch(demo)[1]
    assert _post(url + "/check", {"records": [record]})[0] == 200


def test_wrong_types_and_routes(demo, server):
    url, log = server
    record = _batch(demo)[1]
    assert _post(url + "/check", {"records": [{**record, "amount": 12.5}]})[0] == 422
    assert _post(url + "/check", {"records": [{**record, "city": None}]})[0] == 422
    assert _get(url + "/nothing-here")[0] == 404
    assert _get(url + "/check")[0] == 405
    assert _post(url + "/check", {"records": [record]})[0] == 200
    # No record value reaches the log at the default level.
    text = log.read_text()
    assert record["customer_name"] not in text and record["email"] not in text


def test_follows_the_champion_alias_without_failing_requests(demo, store, server):
    from mlflow import MlflowClient

    url, _ = server
    # A second version of the registered model (the same artifact: training again takes half a minute).
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    first = client.get_model_version("orders", "1")
    second = client.create_model_version("orders", source=first.source, run_id=first.run_id)
    record = _batch(demo)[2]
    statuses: list[int] = []
    stop = threading.Event()

    def keep_checking() -> None:
        while not stop.is_set():
            statuses.append(_post(url + "/check", {"records": [record]})[0])

    worker = threading.Thread(target=keep_checking)
    worker.start()
    try:
        client.set_registered_model_alias("orders", "champion", second.version)
        deadline = time.monotonic() + 30
        while _get(url + "/health")[1]["version"] != str(second.version):
            assert time.monotonic() < deadline, "the served version did not follow the alias"
            time.sleep(0.3)
    finally:
        stop.set()
        worker.join()
    assert statuses and set(statuses) == {200}
    # Records remembered before the swap are in the new version's index.
    health = _get(url + "/health")[1]
    assert health["remembered_records"] == 1
    new_copy = {**_batch(demo)[0], "record_id": "", "order_number": "SO-2099-123456", "amount": "4321.09"}
    assert _post(url + "/check", {"records": [new_copy]})[1]["results"][0]["duplicate_of"] == "NEW-1"


def test_matching_without_remembering_leaves_the_index_as_it_was(demo, store):
    from pipeline.ingest import read_table
    from pipeline.registry import load_bundle

    bundle = load_bundle("models:/orders/1", uri=store)
    reference, batch = read_table(demo.records), read_table(demo.batch)
    matcher = bundle.duplicates.matcher(reference)

    def plain(value: object) -> object:
        """The matcher's state as comparable Python values (its arrays and block indexes unpacked)."""
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, np.ndarray):
            return value.tolist()
        if hasattr(value, "view") and hasattr(value, "truncate"):  # a growable array
            return value.view().tolist()
        if hasattr(value, "in_key_order"):  # sorted runs: what they hold, however they were merged
            return plain(value.in_key_order())
        if hasattr(value, "prev") and hasattr(value, "blocks"):  # one blocking rule's index
            names = ("blocks", "big", "prev")
            return [plain(getattr(value, name)) for name in names]
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return copy.deepcopy(value)

    def state() -> dict:
        return {k: plain(v) for k, v in vars(matcher).items() if k not in ("_model", "_lock")}

    before = state()
    checked = matcher.match(batch, remember=False)
    # Ids that are already indexed (an edited record) get their old positions back.
    again = batch.iloc[:20].assign(record_id=reference["record_id"].iloc[:20].to_numpy())
    matcher.match(again, remember=False)
    after = state()
    assert after == before
    assert checked.equals(bundle.duplicates.matcher(reference).match(batch))
    assert (checked["duplicate_of"] != "").sum() > 0

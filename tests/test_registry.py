"""MLflow: nothing personal in tracking, and the whole lifecycle against a real `mlflow server`."""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import train_argv

from pipeline.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _personal_values(records: Path) -> set[str]:
    """Names, codes, streets, e-mails, phones and order numbers of the demo history."""
    values: set[str] = set()
    with open(records, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for column in ("customer_name", "customer_code", "street", "email", "phone", "order_number"):
                if len(row[column]) >= 5:
                    values.add(row[column])
    return values


def _logged_text(uri: str, experiment_name: str) -> list[str]:
    """Everything logged for an experiment outside the model artifact, as text."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    texts = [experiment.name]
    for run in client.search_runs([experiment.experiment_id]):
        texts.append(run.info.run_name)
        texts += [f"{k}={v}" for k, v in run.data.params.items()]
        texts += [f"{k}={v}" for k, v in run.data.tags.items() if not k.startswith("mlflow.log-model")]
        texts += list(run.data.metrics)
        for dataset_input in run.inputs.dataset_inputs:
            texts.append(
                f"{dataset_input.dataset.name} {dataset_input.dataset.schema} {dataset_input.dataset.source}"
            )
        mlflow.set_tracking_uri(uri)
        client_artifacts = [a.path for a in client.list_artifacts(run.info.run_id) if a.path != "model"]
        assert "duplicate_pr_curve.png" in client_artifacts and "evaluation" in client_artifacts
        for artifact in client_artifacts:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifact))
            for path in [folder] if folder.is_file() else folder.rglob("*"):
                if path.is_file():
                    texts.append(path.read_bytes().decode("latin-1"))
    return texts


def test_nothing_personal_is_logged(demo, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(train_argv(demo, uri)) == 0
    texts = _logged_text(uri, "orders")
    assert any("test_duplicate_f1" in t for t in texts), "the search must see the metrics"
    assert any(t.startswith("records_sha256=") for t in texts)
    blob = "\n".join(texts)
    personal = _personal_values(demo.records)
    assert len(personal) > 100
    leaked = sorted(v for v in personal if v in blob)
    assert leaked == [], leaked[:5]


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not come up")


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"),  # noqa: SIM115
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_train_promote_score_against_a_tracking_server(demo, mlflow_server, tmp_path, capsys):
    uri = mlflow_server
    assert main(train_argv(demo, uri)) == 0
    out = capsys.readouterr().out
    assert re.search(r"run id: [0-9a-f]{32}", out) and "version 1" in out
    assert main(["promote", "--name", "orders", "--tracking-uri", uri]) == 0
    assert "already the champion" in capsys.readouterr().out
    output = tmp_path / "scored"
    assert (
        main(
            [
                "score",
                "--model",
                "models:/orders@champion",
                "--input",
                str(demo.batch),
                "--output",
                str(output),
                "--reference",
                str(demo.records),
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    assert (output / "flags.csv").exists()
    # The artifacts went through the server, not to a local folder.
    assert any((tmp_path / "artifacts").rglob("bundle.json"))


def test_training_keeps_the_champions_error_threshold_unless_clearly_worse(demo, tmp_path):
    from mlflow import MlflowClient

    from pipeline.registry import champion_error_threshold, load_bundle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert champion_error_threshold("orders", uri=uri) is None  # no model yet
    assert main(train_argv(demo, uri)) == 0
    own = load_bundle("models:/orders@champion", uri=uri).errors.threshold_
    assert champion_error_threshold("orders", uri=uri) == pytest.approx(own)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion_run = client.get_model_version_by_alias("orders", "champion").run_id
    # A cut flagging the same out-of-fold cells as the model's own (nothing scores in between): kept as it is.
    anchor = own - 1e-9
    client.log_metric(champion_run, "error_threshold", anchor)
    assert main(train_argv(demo, uri)) == 0
    assert load_bundle("models:/orders/2", uri=uri).errors.threshold_ == anchor
    # A cut that flags almost nothing is clearly worse on the same history: the model chooses its own.
    client.log_metric(champion_run, "error_threshold", 0.9999)
    assert main(train_argv(demo, uri)) == 0
    assert load_bundle("models:/orders/3", uri=uri).errors.threshold_ == pytest.approx(own)

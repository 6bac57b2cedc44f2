"""generate -> train -> score -> export -> promote, through the CLI, on a real MLflow store, checking
every column and rule of the contract's outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_argv

from pipeline import schema as s
from pipeline.cli import main

CHECK_OUTPUT = Path(__file__).resolve().parents[2] / "shared" / "tools" / "check-output"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """Trains once on the demo data into a temporary MLflow store; yields (uri, stdout)."""
    store = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    out = tmp_path_factory.mktemp("train") / "stdout.txt"
    code = _run_cli(
        train_argv(demo, uri),
        out,
    )
    assert code == 0, out.read_text()
    return uri, out.read_text()


def _run_cli(argv: list[str], stdout_file: Path) -> int:
    old = sys.stdout
    with open(stdout_file, "w", encoding="utf-8") as fh:
        sys.stdout = fh
        try:
            return main(argv)
        finally:
            sys.stdout = old


def test_train_prints_held_out_figures_run_and_version(trained):
    _, text = trained
    for label in ("duplicates", "error detection", "corrections", "run id:", "model version:", "champion"):
        assert label in text


@pytest.fixture(scope="module")
def scored(demo, trained, tmp_path_factory):
    uri, _ = trained
    folder = tmp_path_factory.mktemp("score")
    output = folder / "out"
    code = _run_cli(
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
        ],
        folder / "stdout.txt",
    )
    assert code == 0, (folder / "stdout.txt").read_text()
    return output


def test_records_csv_keeps_every_row_and_value_and_adds_the_contract_columns(demo, scored):
    batch = read_csv(demo.batch)
    records = read_csv(scored / s.RECORDS_FILE)
    assert len(records) == len(batch)
    header = list(records[0])
    assert header == [*batch[0].keys(), *s.RECORD_COLUMNS]
    flags = read_csv(scored / s.FLAGS_FILE)
    flagged_ids = {f[s.FLAG_RECORD_ID] for f in flags}
    error_fields_by_id: dict[str, set[str]] = {}
    for f in flags:
        if f[s.FLAG_KIND] == s.KIND_ERROR:
            error_fields_by_id.setdefault(f[s.FLAG_RECORD_ID], set()).add(f[s.FLAG_FIELD])
    for before, after in zip(batch, records, strict=True):
        assert {k: after[k] for k in before} == before
        for column in (s.DUPLICATE_SCORE, s.ERROR_SCORE, s.ANOMALY_SCORE):
            assert 0.0 <= float(after[column]) <= 1.0
        assert after[s.CLUSTER_ID] != ""
        assert after[s.NEEDS_REVIEW] == ("true" if before["record_id"] in flagged_ids else "false")
        fields = set(filter(None, after[s.ERROR_FIELDS].split(s.ERROR_FIELD_SEPARATOR)))
        assert fields == error_fields_by_id.get(before["record_id"], set())
        if after[s.DUPLICATE_OF]:
            assert after[s.DUPLICATE_OF] != before["record_id"]


def test_flags_csv_is_a_sorted_review_queue_with_reasons(demo, scored):
    batch = {r["record_id"]: r for r in read_csv(demo.batch)}
    history_ids = {r["record_id"] for r in read_csv(demo.records)}
    flags = read_csv(scored / s.FLAGS_FILE)
    assert flags, "the demo batch has injected errors; some must be flagged"
    assert list(flags[0]) == list(s.FLAG_COLUMNS)
    scores = [float(f[s.FLAG_SCORE]) for f in flags]
    assert scores == sorted(scores, reverse=True)
    kinds = {f[s.FLAG_KIND] for f in flags}
    assert kinds <= set(s.KINDS) and {s.KIND_DUPLICATE, s.KIND_ERROR} <= kinds
    for f in flags:
        assert f[s.FLAG_REASON].strip(), f
        assert 0.0 <= float(f[s.FLAG_SCORE]) <= 1.0
        record = batch[f[s.FLAG_RECORD_ID]]
        if f[s.FLAG_KIND] == s.KIND_ERROR:
            assert f[s.FLAG_FIELD] in record and f[s.FLAG_VALUE] == record[f[s.FLAG_FIELD]]
            assert f[s.FLAG_MATCH_ID] == ""
        elif f[s.FLAG_KIND] == s.KIND_DUPLICATE:
            assert f[s.FLAG_MATCH_ID] in batch or f[s.FLAG_MATCH_ID] in history_ids
            assert f[s.FLAG_FIELD] == f[s.FLAG_VALUE] == f[s.FLAG_SUGGESTION] == ""
        else:
            assert f[s.FLAG_FIELD] == f[s.FLAG_MATCH_ID] == ""


def test_summary_json_counts_model_input_and_minutes(demo, scored):
    summary = json.loads((scored / s.SUMMARY_FILE).read_text())
    flags = read_csv(scored / s.FLAGS_FILE)
    assert summary["flags"]["total"] == len(flags)
    for kind in s.KINDS:
        assert summary["flags"][kind] == sum(f[s.FLAG_KIND] == kind for f in flags)
    assert summary["model"]["name"] == "orders" and summary["model"]["version"] == "1"
    assert len(summary["model"]["run_id"]) == 32
    assert summary["input"]["rows"] == len(read_csv(demo.batch))
    assert len(summary["input"]["sha256"]) == 64
    assert summary["seconds"] > 0
    assert summary["minutes_saved_basis"]["minutes_per_correction"] == 4
    assert isinstance(summary["minutes_saved_estimate"], float)
    html = (scored / s.REPORT_FILE).read_text()
    assert "<svg" in html and "http" not in html.replace("http://www.w3.org", "")


def test_own_contract_checker_accepts_the_output(demo, scored):
    from pipeline.contract import check_output

    assert check_output(scored, demo.batch) == []


def test_shared_contract_checker_accepts_the_output(demo, scored):
    # The shared tool sits beside the repository in the team's checkout only; the repository's own check
    # (above, and tests/test_contract.py) always runs.
    if not CHECK_OUTPUT.exists():
        pytest.skip(f"no shared contract checker at {CHECK_OUTPUT}")
    result = subprocess.run(
        [sys.executable, str(CHECK_OUTPUT), str(scored), str(demo.batch)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")


def test_demo_quality_on_the_batch_ground_truth(demo, scored):
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_output

    figures = evaluate_output(
        load_config(demo.config), scored, demo.batch, demo.batch_truth, demo.records, demo.history_truth
    )
    # Loose floors for this small data set; the full figures are in BENCHMARKS.md.
    assert figures["batch_duplicate_f1"] >= 0.8, figures
    assert figures["batch_error_f1"] >= 0.6, figures
    assert figures["batch_correction_precision"] >= 0.6, figures


def test_a_link_to_any_record_of_the_true_cluster_counts_as_right(demo, scored, tmp_path):
    """The reference may hold an earlier re-registration of the entity (merged in the history): linking a
    new record to it is right, once the history's merges are given."""
    import shutil

    import pandas as pd

    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_output

    truth = pd.read_csv(demo.batch_truth, dtype=str, keep_default_na=False)
    reference_ids = set(pd.read_csv(demo.records, dtype=str, keep_default_na=False)["record_id"])
    merged = truth[(truth["action"] == "merge") & truth["merged_into"].isin(reference_ids)].iloc[0]
    partner = sorted(reference_ids - {merged["merged_into"]})[0]
    out = tmp_path / "out"
    shutil.copytree(scored, out)
    records = pd.read_csv(out / s.RECORDS_FILE, dtype=str, keep_default_na=False)
    records.loc[records["record_id"] == merged["record_id"], s.DUPLICATE_OF] = partner
    records.to_csv(out / s.RECORDS_FILE, index=False)
    history = tmp_path / "history_truth.csv"
    history.write_text(
        "record_id,action,field,old_value,new_value,merged_into,corrected_at\n"
        f"{partner},merge,,,,{merged['merged_into']},\n",
        encoding="utf-8",
    )
    config = load_config(demo.config)
    alone = evaluate_output(config, out, demo.batch, demo.batch_truth, demo.records)
    joined = evaluate_output(config, out, demo.batch, demo.batch_truth, demo.records, history)
    assert joined["batch_duplicate_tp"] == alone["batch_duplicate_tp"] + 1
    assert joined["batch_duplicate_fp"] == alone["batch_duplicate_fp"] - 1


def test_rerun_is_byte_identical_and_export_scores_the_same(demo, trained, scored, tmp_path):
    uri, _ = trained
    again = tmp_path / "again"
    assert (
        _run_cli(
            [
                "score",
                "--model",
                "models:/orders/1",
                "--input",
                str(demo.batch),
                "--output",
                str(again),
                "--reference",
                str(demo.records),
                "--tracking-uri",
                uri,
            ],
            tmp_path / "o1",
        )
        == 0
    )
    assert (again / s.FLAGS_FILE).read_bytes() == (scored / s.FLAGS_FILE).read_bytes()
    assert (again / s.RECORDS_FILE).read_bytes() == (scored / s.RECORDS_FILE).read_bytes()

    exported = tmp_path / "models" / "orders"
    assert (
        _run_cli(
            ["export", "--model", "models:/orders@champion", "--to", str(exported), "--tracking-uri", uri],
            tmp_path / "o2",
        )
        == 0
    )
    assert (exported / "MLmodel").exists()
    from_folder = tmp_path / "from_folder"
    # No tracking store reachable: point at a URI that does not exist.
    assert (
        _run_cli(
            [
                "score",
                "--model",
                str(exported),
                "--input",
                str(demo.batch),
                "--output",
                str(from_folder),
                "--reference",
                str(demo.records),
                "--tracking-uri",
                "http://127.0.0.1:9",
            ],
            tmp_path / "o3",
        )
        == 0
    )
    assert (from_folder / s.FLAGS_FILE).read_bytes() == (scored / s.FLAGS_FILE).read_bytes()
    summary = json.loads((from_folder / s.SUMMARY_FILE).read_text())
    assert summary["model"]["version"] == "1"


def test_pyfunc_model_predicts_the_record_columns(demo, trained):
    import mlflow
    import pandas as pd

    uri, _ = trained
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/orders@champion")
    batch = pd.read_csv(demo.batch, dtype=str, keep_default_na=False).head(50)
    predicted = model.predict(batch)
    assert list(predicted.columns) == list(s.RECORD_COLUMNS)
    assert len(predicted) == 50
    assert set(predicted[s.NEEDS_REVIEW]) <= {"true", "false"}


def test_promote_explains_and_records_its_decision(demo, trained, tmp_path):
    uri, _ = trained
    out = tmp_path / "promote.txt"
    assert _run_cli(["promote", "--name", "orders", "--tracking-uri", uri], out) == 0
    assert "already the champion" in out.read_text()

    # A second training (same data, other seed) becomes challenger; promote compares the two.
    config = tmp_path / "config.yaml"
    config.write_text(demo.config.read_text() + "seed: 3\n", encoding="utf-8")
    assert (
        _run_cli(
            train_argv(demo, uri, config=config),
            tmp_path / "t2",
        )
        == 0
    )
    assert _run_cli(["promote", "--name", "orders", "--dry-run", "--tracking-uri", uri], out) == 0
    text = out.read_text()
    assert "challenger version 2 vs champion version 1" in text and "test_duplicate_f1" in text
    assert ("would move champion" in text) or ("champion stays" in text)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert "promotion.decision" not in client.get_model_version("orders", "2").tags
    assert _run_cli(["promote", "--name", "orders", "--tracking-uri", uri], out) == 0
    tags = client.get_model_version("orders", "2").tags
    assert tags["promotion.decision"] in {"promoted", "rejected"}
    champion = str(client.get_model_version_by_alias("orders", "champion").version)
    assert champion == ("2" if tags["promotion.decision"] == "promoted" else "1")
    assert tags["promotion.basis"] == "same_period"


def test_promote_does_not_judge_the_champion_on_labels_its_own_flags_made(demo, trained, tmp_path):
    """When review decisions labelled the challenger's held-out period, the champion (whose flags those
    decisions answered) is not re-scored on it: each model's own held-out figures are compared."""
    import pandas as pd
    from mlflow import MlflowClient

    uri, _ = trained
    log = pd.read_csv(demo.corrections, dtype=str, keep_default_na=False)
    # The newest third of the log came from the review page, as `feedback` writes it.
    log["source"] = ["review" if i >= 2 * len(log) // 3 else "" for i in range(len(log))]
    log["seconds"] = ["20" if i >= 2 * len(log) // 3 else "" for i in range(len(log))]
    reviewed = tmp_path / "corrections.csv"
    log.to_csv(reviewed, index=False)
    argv = train_argv(demo, uri)
    argv[argv.index("--corrections") + 1] = str(reviewed)
    assert _run_cli(argv, tmp_path / "train.txt") == 0, (tmp_path / "train.txt").read_text()

    client = MlflowClient(tracking_uri=uri)
    challenger = client.get_model_version_by_alias("orders", "challenger").version
    champion = client.get_model_version_by_alias("orders", "champion").version
    assert challenger != champion
    out = tmp_path / "promote.txt"
    assert _run_cli(["promote", "--name", "orders", "--tracking-uri", uri], out) == 0
    tags = client.get_model_version("orders", challenger).tags
    assert tags["promotion.basis"] == "own_figures"
    assert "review labelled" in tags["promotion.reason"]
    assert "measurement noise" in tags["promotion.reason"] or "champion stays" in tags["promotion.reason"]

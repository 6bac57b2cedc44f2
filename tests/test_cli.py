"""Bad input through the CLI: exit code 2, one line on stderr naming the fault, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_argv

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_usage_error_is_one_line_exit_2(tmp_path):
    result = run(["score", "--model", "x"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "required" in result.stderr


def test_train_with_missing_config_names_the_file(tmp_path, capsys):
    code = main(
        [
            "train",
            "--config",
            str(tmp_path / "c.yaml"),
            "--records",
            "r.csv",
            "--corrections",
            "l.csv",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "c.yaml: config file not found" in err and err.count("\n") == 1


def test_train_with_records_missing_a_configured_column(demo, tmp_path, capsys):
    records = tmp_path / "records.csv"
    lines = demo.records.read_text(encoding="utf-8").splitlines(keepends=True)
    header = lines[0].replace("amount", "amount_eur")
    records.write_text(header + "".join(lines[1:]), encoding="utf-8")
    code = main(train_argv(demo, f"sqlite:///{tmp_path / 'db.sqlite'}", records=records))
    err = capsys.readouterr().err
    assert code == 2 and "missing column 'amount'" in err and str(records) in err


def test_score_with_unknown_model_leaves_nothing(demo, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(
        ["score", "--model", str(tmp_path / "nomodel"), "--input", str(demo.batch), "--output", str(output)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no such model folder" in err
    assert not output.exists() and os.listdir(tmp_path) == []


def test_score_into_existing_folder_needs_overwrite(demo, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code = main(
        ["score", "--model", "models:/x@champion", "--input", str(demo.batch), "--output", str(output)]
    )
    assert code == 2 and "exists already" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("uri", ["models:/orders", "models:/nosuchmodel@champion"])
def test_bad_registry_uris(uri, tmp_path, capsys):
    code = main(
        [
            "score",
            "--model",
            uri,
            "--input",
            "b.csv",
            "--output",
            str(tmp_path / "o"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and uri in err and err.count("\n") == 1

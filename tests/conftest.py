"""Shared fixtures: a small generated demo data set and a throwaway MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """A small demo data set (the generator's real output), made once per test session."""
    from pipeline.generate import generate

    return generate(tmp_path_factory.mktemp("demo"), customers=120, history=1500, batch=300, seed=11)


@pytest.fixture(autouse=True)
def reference_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`score`'s reference cache in a folder of this test session, never the user's own."""
    folder = tmp_path_factory.getbasetemp() / "reference-cache"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder."""
    store = tmp_path / "mlruns"
    store.mkdir()
    return f"sqlite:///{store / 'mlflow.db'}"


def train_argv(demo, uri: str, *, config: Path | None = None, records: Path | None = None) -> list[str]:
    """The `train` command line for the demo data (optionally with another config or records file)."""
    return [
        "train",
        "--config",
        str(config or demo.config),
        "--records",
        str(records or demo.records),
        "--corrections",
        str(demo.corrections),
        "--tracking-uri",
        uri,
    ]


def re_registered(order: dict[str, str], record_id: str, entered_at: str, **changes: str) -> dict[str, str]:
    """A copy of a record (a dict of its cells) under a new id and entry time, with these cells changed."""
    return {**order, "record_id": record_id, "entered_at": entered_at, **changes}


def slipped(number: str) -> str:
    """An order number with its last digit mistyped."""
    return number[:-1] + str((int(number[-1]) + 3) % 10)


@pytest.fixture(scope="module")
def re_registrations(demo, tmp_path_factory) -> Path:
    """The demo batch and, after it, eight reference orders re-registered twice: first with a slip in the
    order number, then as first entered (each of those duplicates the original and the slipped copy)."""
    import pandas as pd

    from pipeline.ingest import read_table

    batch, reference = read_table(demo.batch), read_table(demo.records)
    later = pd.Timestamp(batch["entered_at"].iloc[-1])
    originals = [reference.iloc[i].to_dict() for i in range(600, 1400, 100)]
    rows = []
    for k, original in enumerate(originals):
        at = (later + pd.Timedelta(hours=k + 1)).isoformat()
        rows.append(re_registered(original, f"SL-{k}", at, order_number=slipped(original["order_number"])))
    for k, original in enumerate(originals):
        rows.append(re_registered(original, f"AG-{k}", (later + pd.Timedelta(days=1, hours=k)).isoformat()))
    path = tmp_path_factory.mktemp("re-registrations") / "batch.csv"
    pd.concat([batch, pd.DataFrame(rows)], ignore_index=True).to_csv(path, index=False)
    return path

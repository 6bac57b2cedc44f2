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

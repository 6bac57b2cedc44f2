"""Shared fixtures: a small generated demo data set and a throwaway MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """A small demo data set (the generator's real output), made once per test session."""
    from pipeline.generate import generate

    return generate(tmp_path_factory.mktemp("demo"), customers=120, history=1500, batch=300, seed=11)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder."""
    store = tmp_path / "mlruns"
    store.mkdir()
    return f"sqlite:///{store / 'mlflow.db'}"

"""The trained model as one folder: the config, the three models, and what was measured.

A bundle is what `train` logs to MLflow (as the artifact of a pyfunc model), what `export` writes under
`models/`, and what `score` loads. It holds no tracking-store state, so it loads anywhere.

    bundle/
      bundle.json        format version, package versions, config, held-out metrics
      duplicates/        the duplicate model (dedupe comparators + classifier + blocking)
      errors/            the error model
      anomalies/         the anomaly model
      holdout/           the held-out test period (as entered, its reference and its labels), for `promote`
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import __version__
from pipeline.anomalies import AnomalyModel
from pipeline.config import Config, config_from_dict
from pipeline.errors import ErrorModel
from pipeline.exceptions import ModelLoadError
from pipeline.linkage import DuplicateModel

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
BUNDLE_FILE = "bundle.json"
HOLDOUT_FILES = ("batch.parquet", "reference.parquet", "log.parquet")
MODEL_PARTS = (BUNDLE_FILE, "duplicates", "errors", "anomalies")  # what `digest` covers (not the holdout)


@dataclass
class Holdout:
    """The held-out period: its records as entered, the earlier records as stored, and their log rows."""

    batch: pd.DataFrame
    reference: pd.DataFrame
    log: pd.DataFrame


@dataclass
class ModelBundle:
    config: Config
    duplicates: DuplicateModel
    errors: ErrorModel
    anomalies: AnomalyModel
    metrics: dict[str, float] = field(default_factory=dict)
    holdout: Holdout | None = None
    # Where it came from; filled by whoever loads it (registry or exported folder).
    source: dict[str, Any] = field(default_factory=dict)
    # SHA-256 of the saved model's files (`folder_digest`), set by `load`; "" for a bundle never saved.
    digest: str = ""

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.duplicates.save(folder / "duplicates")
        self.errors.save(folder / "errors")
        self.anomalies.save(folder / "anomalies")
        if self.holdout is not None:
            (folder / "holdout").mkdir(exist_ok=True)
            for name, frame in zip(
                HOLDOUT_FILES, (self.holdout.batch, self.holdout.reference, self.holdout.log), strict=True
            ):
                frame.reset_index(drop=True).to_parquet(folder / "holdout" / name, index=False)
        meta = {
            "format": BUNDLE_FORMAT,
            "pipeline_version": __version__,
            "config": self.config.model_dump(mode="json"),
            "metrics": self.metrics,
        }
        # Not sorted: the config's fields keep the order they were trained in (a model loaded back has the
        # same `check_fields`, in the same order, as the one `train` fitted).
        (folder / BUNDLE_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: Path, *, with_holdout: bool = False) -> ModelBundle:
        folder = Path(folder)
        meta_path = folder / BUNDLE_FILE
        if not meta_path.exists():
            raise ModelLoadError(f"{folder}: not a model folder ({BUNDLE_FILE} is missing)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{meta_path}: unreadable model metadata ({exc})") from None
        if meta.get("format") != BUNDLE_FORMAT:
            raise ModelLoadError(
                f"{folder}: model format {meta.get('format')!r} was written by pipeline "
                f"{meta.get('pipeline_version', '?')}; this is {__version__} "
                f"(format {BUNDLE_FORMAT}); retrain it"
            )
        holdout = None
        if with_holdout and (folder / "holdout").is_dir():
            frames = [pd.read_parquet(folder / "holdout" / name) for name in HOLDOUT_FILES]
            holdout = Holdout(*frames)
        return cls(
            config=config_from_dict(meta["config"], source=str(meta_path)),
            duplicates=DuplicateModel.load(folder / "duplicates"),
            errors=ErrorModel.load(folder / "errors"),
            anomalies=AnomalyModel.load(folder / "anomalies"),
            metrics=meta.get("metrics", {}),
            holdout=holdout,
            digest=folder_digest(folder),
        )


def folder_digest(folder: Path) -> str:
    """SHA-256 over the names and bytes of the model's files (`MODEL_PARTS`, not the holdout): the same
    digest for the same model wherever it was loaded from (an exported folder, a registry download), a
    different one after any retraining. What the reference cache keys a prepared reference by."""
    folder = Path(folder)
    sha = hashlib.sha256()
    for part in MODEL_PARTS:
        path = folder / part
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if not file.is_file():
                continue
            sha.update(file.relative_to(folder).as_posix().encode() + b"\0")
            sha.update(file.stat().st_size.to_bytes(8, "little"))
            with open(file, "rb") as fh:
                sha.update(hashlib.file_digest(fh, "sha256").digest())
    return sha.hexdigest()


def find_bundle(folder: Path) -> Path:
    """The bundle inside a folder: the folder itself, or an MLflow model folder's `artifacts/bundle`."""
    folder = Path(folder)
    for candidate in (folder, folder / "artifacts" / "bundle", folder / "bundle"):
        if (candidate / BUNDLE_FILE).exists():
            return candidate
    raise ModelLoadError(f"{folder}: no model found here (expected {BUNDLE_FILE} or artifacts/bundle/)")

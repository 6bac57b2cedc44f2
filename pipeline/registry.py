"""Everything MLflow: the tracking store, the logged run, the pyfunc model, the registry and its aliases.

This is the only module that imports mlflow. Nothing personal is logged outside the model artifact:
params are settings and field names, tags are digests and versions, metrics are counts and rates, plots
show scores, never values.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import __version__
from pipeline import schema as s
from pipeline.bundle import ModelBundle, find_bundle
from pipeline.exceptions import BadInputError, ModelLoadError
from pipeline.metrics import (
    PROMOTION_METRICS,
    PROMOTION_TOLERANCE,
    non_inferiority_decision,
    promotion_decision,
)

logger = logging.getLogger(__name__)

CHAMPION = "champion"
ERROR_THRESHOLD_METRIC = "error_threshold"
# What `promote` compares on (the `promotion.basis` tag): both models on the challenger's held-out period,
# or each model's own held-out figures when review decisions labelled that period.
BASIS_SAME_PERIOD = "same_period"
BASIS_OWN_FIGURES = "own_figures"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
DEFAULT_STORE = "mlruns"
PACKAGE_DIR = Path(__file__).resolve().parent
PINNED = (
    "dedupe",
    "BTrees",
    "scikit-learn",
    "pandas",
    "numpy",
    "pyarrow",
    "pydantic",
    "rapidfuzz",
    "joblib",
    "pyyaml",
)
# A promoted challenger may lose at most this much F1 on any one task while winning on the mean.


def tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns (created on first use)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path.cwd() / DEFAULT_STORE
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _mlflow(uri: str | None):  # noqa: ANN202
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside the database; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def _experiment_id(mlflow: Any, name: str, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(name, artifact_location=_artifact_root(uri))


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def requirements() -> list[str]:
    """The pyfunc model's pinned requirements: the versions it was trained with."""
    pins = [f"{name}=={_version(name)}" for name in PINNED if _version(name) != "unknown"]
    return [*pins, f"mlflow>={_version('mlflow')}"]


# ------------------------------------------------------------------------------------------ pyfunc model


def _pyfunc_class():  # noqa: ANN202
    import mlflow.pyfunc

    class PipelineModel(mlflow.pyfunc.PythonModel):
        """Scores a DataFrame of records and returns the contract's record columns.

        Anyone with MLflow can use it: `mlflow.pyfunc.load_model(uri).predict(df)`.
        """

        def load_context(self, context: Any) -> None:
            from pipeline.bundle import ModelBundle

            self.bundle = ModelBundle.load(Path(context.artifacts["bundle"]))

        def predict(
            self, context: Any, model_input: pd.DataFrame, params: dict | None = None
        ) -> pd.DataFrame:
            from pipeline.score import score_frame

            frame = (
                model_input.astype(object).where(model_input.notna(), s.MISSING).astype(str).astype(object)
            )
            return score_frame(frame.reset_index(drop=True), self.bundle)[list(s.RECORD_COLUMNS)]

    return PipelineModel


def _signature(config: Any) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", name) for name in config.required_columns()])
    outputs = Schema([ColSpec("string", name) for name in s.RECORD_COLUMNS])
    return ModelSignature(inputs=inputs, outputs=outputs)


# ----------------------------------------------------------------------------------------------- logging


@dataclass
class RegisteredRun:
    run_id: str
    experiment_id: str
    name: str
    version: str
    aliases: list[str]
    tracking_uri: str


def log_training(result: Any, *, records_path: Path, log_path: Path, uri: str | None = None) -> RegisteredRun:
    """Logs one run for a `TrainingResult` and registers its model as `challenger` (and `champion`
    when there is none)."""
    from pipeline import plots

    uri = tracking_uri(uri)
    mlflow = _mlflow(uri)
    config = result.bundle.config
    experiment_id = _experiment_id(mlflow, config.name, uri)
    run_name = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{result.sizes['records']}rows"
    with (
        tempfile.TemporaryDirectory(prefix="pipeline-train-") as tmp,
        mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run,
    ):
        tmp_path = Path(tmp)
        mlflow.log_params(result.params)
        mlflow.set_tags(
            {
                "records_sha256": result.digests["records_sha256"],
                "log_sha256": result.digests["log_sha256"],
                "evaluation.scheme": result.plan.scheme,
                "code_version": _git_commit(),
                "pipeline_version": __version__,
                "dedupe_version": _version("dedupe"),
                "sklearn_version": _version("scikit-learn"),
                "mlflow_version": _version("mlflow"),
                "python_version": platform.python_version(),
            }
        )
        mlflow.log_metrics({f"size_{k}": float(v) for k, v in result.sizes.items()})
        mlflow.log_metrics({f"seconds_{k}": float(v) for k, v in result.durations.items()})
        mlflow.log_metrics(result.bundle.metrics)
        # The threshold the model flags errors with: the next training keeps it unless clearly worse
        # (`champion_error_threshold`).
        mlflow.log_metric(ERROR_THRESHOLD_METRIC, float(result.bundle.errors.threshold_))
        _log_inputs(mlflow, config, records_path, log_path, result.digests)

        # Plots at the top of the run's artifacts, where the MLflow compare view lines them up side by side.
        for png in plots.write_evaluation_plots(result.evaluation, tmp_path):
            mlflow.log_artifact(str(png))
        report = tmp_path / "report"
        report.mkdir()
        result.evaluation.per_field.to_csv(report / "per_field.csv", index=False)
        (report / "evaluation.json").write_text(
            json.dumps(
                {"metrics": result.bundle.metrics, "sizes": result.sizes, "durations": result.durations},
                indent=2,
                sort_keys=True,
            ),
            encoding="utf-8",
        )
        mlflow.log_artifacts(str(report), artifact_path="evaluation")

        bundle_dir = result.bundle.save(tmp_path / "bundle")
        # The model is logged as an object on purpose (its code travels in code_paths), and it has no input
        # example because an example would put record values into the artifact's metadata.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=_pyfunc_class()(),
            artifacts={"bundle": str(bundle_dir)},
            code_paths=[str(PACKAGE_DIR)],
            signature=_signature(config),
            pip_requirements=requirements(),
            registered_model_name=config.name,
        )
    version = str(info.registered_model_version)
    aliases = _set_initial_aliases(config.name, version, uri)
    return RegisteredRun(run.info.run_id, experiment_id, config.name, version, aliases, uri)


def _log_inputs(
    mlflow: Any, config: Any, records_path: Path, log_path: Path, digests: dict[str, str]
) -> None:
    """Records the inputs with `mlflow.data`: name, digest and schema only, never rows."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    for path, digest, columns, context in (
        (records_path, digests["records_sha256"], config.required_columns(), "training"),
        (log_path, digests["log_sha256"], list(s.LOG_COLUMNS), "labels"),
    ):
        dataset = MetaDataset(
            source=_LocalSource(str(Path(path).name)),
            name=Path(path).name,
            digest=digest[:32],
            schema=Schema([ColSpec("string", name) for name in columns]),
        )
        mlflow.log_input(dataset, context=context)


def _LocalSource(name: str) -> Any:  # noqa: N802
    from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource

    class _Source(FileSystemDatasetSource):
        def __init__(self, uri: str) -> None:
            self._uri = uri

        @property
        def uri(self) -> str:
            return self._uri

        @staticmethod
        def _get_source_type() -> str:
            return "local"

        def load(self, dst_path: str | None = None) -> str:  # pragma: no cover - never loaded back
            return self._uri

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> _Source:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self._uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> _Source:
            return cls(source_dict["uri"])

    return _Source(name)


def _set_initial_aliases(name: str, version: str, uri: str) -> list[str]:
    client = _client(uri)
    client.set_registered_model_alias(name, CHALLENGER, version)
    aliases = [CHALLENGER]
    if _alias_version(client, name, CHAMPION) is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    return aliases


def champion_error_threshold(name: str, *, uri: str | None = None) -> float | None:
    """The error flag threshold of the registered model `name`'s champion (as its training run logged it),
    or None when there is no champion or its run did not log one. Training a successor anchors to it
    (`train(error_anchor=)`), so the error flags do not move from version to version for nothing."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        champion = _alias_version(client, name, CHAMPION)
        if champion is None or not champion.run_id:
            return None
        value = client.get_run(champion.run_id).data.metrics.get(ERROR_THRESHOLD_METRIC)
    except MlflowException:
        return None
    return None if value is None else float(value)


def _client(uri: str | None) -> Any:
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias_version(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


# ----------------------------------------------------------------------------------------------- loading


def load_bundle(model: str, *, uri: str | None = None, with_holdout: bool = False) -> ModelBundle:
    """Loads a model given as a local folder (from `export`), `models:/NAME@alias`, `models:/NAME/3` or
    `runs:/RUN_ID/model`. Raises `ModelLoadError` with one clear line when it cannot."""
    local = Path(model)
    if not model.startswith(("models:/", "runs:/")):
        if not local.exists():
            raise ModelLoadError(
                f"{model}: no such model folder; give an exported folder, "
                "models:/NAME@champion or runs:/ID/model"
            )
        bundle = ModelBundle.load(find_bundle(local), with_holdout=with_holdout)
        info_path = local / "model_info.json"
        bundle.source = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
        bundle.source.setdefault("uri", str(local))
        return bundle
    source = _resolve_uri(model, uri)
    with tempfile.TemporaryDirectory(prefix="pipeline-model-") as tmp:
        folder = _download(model, source["download_uri"], uri, Path(tmp))
        bundle = ModelBundle.load(find_bundle(folder), with_holdout=with_holdout)
    bundle.source = source
    return bundle


def resolve_model(model: str, *, uri: str | None = None) -> dict[str, str]:
    """What a registry URI points at now, without loading it: `uri`, `name`, `version`, `run_id` and
    `download_uri` (`models:/NAME/VERSION`, to load exactly that version). A service following
    `models:/NAME@champion` polls this to notice the alias move. Raises `ModelLoadError` when unknown."""
    if not model.startswith(("models:/", "runs:/")):
        raise ModelLoadError(f"{model}: not a registry URI (models:/NAME@alias, models:/NAME/3 or runs:/ID)")
    return _resolve_uri(model, uri)


def _resolve_uri(model: str, uri: str | None) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    store = tracking_uri(uri)
    try:
        if model.startswith("runs:/"):
            run_id = model.removeprefix("runs:/").split("/", 1)[0]
            client.get_run(run_id)
            return {"uri": model, "name": "", "version": "", "run_id": run_id, "download_uri": model}
        rest = model.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in rest:
            name, number = rest.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise ModelLoadError(
                f"{model}: say which version, e.g. models:/{rest}@champion or models:/{rest}/1"
            )
    except MlflowException as exc:
        raise ModelLoadError(f"{model}: not found in tracking store {store} ({exc.error_code})") from None
    return {
        "uri": model,
        "name": version.name,
        "version": str(version.version),
        "run_id": version.run_id or "",
        "download_uri": f"models:/{version.name}/{version.version}",
    }


def _download(model: str, download_uri: str, uri: str | None, dst: Path) -> Path:
    from mlflow.exceptions import MlflowException

    mlflow = _mlflow(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=download_uri, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        raise ModelLoadError(f"{model}: cannot download the model ({exc.__class__.__name__})") from None


# ------------------------------------------------------------------------------------- promote and export


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    challenger: dict[str, Any]
    champion: dict[str, Any] | None
    table: pd.DataFrame


def promote(name: str, *, uri: str | None = None, dry_run: bool = False) -> PromotionDecision:
    """Moves `champion` to the challenger when it is at least as good, on one of two bases:

    - **the same held-out period** (the usual case): the champion is scored on the challenger's held-out
      period and compared with the challenger's figures there (`pipeline.metrics.promotion_decision`:
      mean F1 over duplicates, error detection and corrections not lower, no task worse by more than
      PROMOTION_TOLERANCE);
    - **each model's own held-out figures**, when review decisions labelled part of that period: those
      labels exist because the champion flagged the records, so its recall there is 1 by construction and
      no challenger could win. Each model's figures from its own training are compared instead, and the
      challenger wins unless it is worse on a task beyond the noise of the two measurements
      (`pipeline.metrics.non_inferiority_decision`).
    """
    from pipeline.evaluate import evaluate_bundle, review_labelled

    client = _client(uri)
    challenger_version = _alias_version(client, name, CHALLENGER)
    if challenger_version is None:
        raise BadInputError(
            f"model {name!r} has no `{CHALLENGER}` version in {tracking_uri(uri)}; run train first"
        )
    champion_version = _alias_version(client, name, CHAMPION)
    challenger = load_bundle(f"models:/{name}@{CHALLENGER}", uri=uri, with_holdout=True)
    if challenger.holdout is None:
        raise ModelLoadError(f"models:/{name}@{CHALLENGER}: has no held-out data to compare on; retrain it")
    # The challenger was refitted on its whole history, held-out period included: its own figures are those
    # its training procedure measured there. The champion is scored on that same period now. (A champion
    # trained on the same history has seen the period, which favours it: a challenger must be clearly better.)
    new = challenger.metrics if PROMOTION_METRICS[0] in challenger.metrics else None
    if new is None:
        new = evaluate_bundle(challenger, challenger.holdout).metrics
    old = None
    basis, described = BASIS_SAME_PERIOD, "the challenger's held-out period"
    reviewed = review_labelled(challenger.holdout, challenger.config)
    if champion_version is not None and champion_version.version != challenger_version.version:
        champion = load_bundle(f"models:/{name}@{CHAMPION}", uri=uri)
        if reviewed and PROMOTION_METRICS[0] in champion.metrics:
            basis = BASIS_OWN_FIGURES
            described = f"each model's own held-out figures: review labelled {reviewed} held-out records"
            old = champion.metrics
        else:
            old = evaluate_bundle(champion, challenger.holdout).metrics
    rows = [
        {"metric": key, "champion": (old or {}).get(key, float("nan")), "challenger": new[key]}
        for key in (
            *PROMOTION_METRICS,
            "test_duplicate_precision",
            "test_error_precision",
            "test_minutes_saved",
        )
    ]
    table = pd.DataFrame(rows)
    if champion_version is not None and old is None:
        promoted, reason = False, f"version {challenger_version.version} is already the champion"
    else:
        if basis == BASIS_OWN_FIGURES:
            decision = non_inferiority_decision(new, old, metrics=PROMOTION_METRICS)
        else:
            decision = promotion_decision(new, old, metrics=PROMOTION_METRICS, tolerance=PROMOTION_TOLERANCE)
        promoted = decision.promoted
        reason = decision.reason if old is None else f"{decision.reason} (compared on {described})"
    if not dry_run and (old is not None or champion_version is None):
        version = challenger_version.version
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        client.set_model_version_tag(
            name, version, "promotion.decision", "promoted" if promoted else "rejected"
        )
        client.set_model_version_tag(name, version, "promotion.reason", reason)
        client.set_model_version_tag(name, version, "promotion.basis", basis)
        client.set_model_version_tag(name, version, "promotion.at", stamp)
        if champion_version is not None:
            client.set_model_version_tag(
                name, version, "promotion.compared_with", str(champion_version.version)
            )
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
    return PromotionDecision(
        promoted=promoted,
        reason=reason,
        challenger={"version": str(challenger_version.version), "run_id": challenger_version.run_id},
        champion=None
        if champion_version is None
        else {"version": str(champion_version.version), "run_id": champion_version.run_id},
        table=table,
    )


def export(model: str, to: Path, *, uri: str | None = None, overwrite: bool = False) -> Path:
    """Writes a self-contained MLflow model folder (MLmodel, code, bundle) plus `model_info.json`."""
    to = Path(to)
    if to.exists() and not overwrite:
        raise BadInputError(f"{to}: exists already; choose another folder or pass --overwrite")
    if model.startswith(("models:/", "runs:/")):
        source = _resolve_uri(model, uri)
    else:
        raise BadInputError(f"{model}: export takes a registry URI (models:/NAME@champion or runs:/ID/model)")
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.partial-", dir=to.parent))
    try:
        folder = _download(model, source["download_uri"], uri, staging)
        if not (folder / "MLmodel").exists():
            raise ModelLoadError(f"{model}: the downloaded artifact is not an MLflow model")
        ModelBundle.load(find_bundle(folder))  # fails now, not at scoring time
        info = {k: v for k, v in source.items() if k != "download_uri"}
        info["exported_from"] = tracking_uri(uri)
        (folder / "model_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        if to.exists():
            shutil.rmtree(to)
        folder.rename(to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return to

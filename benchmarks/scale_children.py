"""The two duplicate-only runs of `scale.py`, each in its own child process so its memory is its own.

`ours` (run with the product's python): the duplicate stage of `score` alone, as `run_batch` runs it:
read the reference (configured columns), index it, then `link_chunk` on each 50,000-row chunk (matched in
`MATCH_ROWS` parts by `Matcher(evict=True)`, with the linked records' values for the error model), no
error model, anomaly model or writing. With `--pair-helper` (as `run_batch(pair_helper=True)`; Linux), a
`linkage.PairHelper` process started before the reference is indexed scores each part's pairs while the
next parts are indexed (`score.LinkAhead`); its CPU seconds are counted with this process's.

`splink` (run with the bench venv's python, which has splink and duckdb): Splink on DuckDB on the same
work, unsupervised: the reference and the batch linked against each other and deduplicated within
(`link_and_dedupe`), the probability two random records match from deterministic rules, u by random
sampling, m by expectation maximisation on two blocking rules, then `predict`.

Each prints one JSON line: wall seconds per phase, CPU seconds of the duplicate work (user + system, all
threads: comparable when other jobs share the machine), and links found with their precision and recall.

    python benchmarks/scale_children.py ours --model M --reference R --batch B
    benchmarks/.venv-bench/bin/python benchmarks/scale_children.py splink --reference R --batch B
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

SPLINK_THRESHOLD = 0.5


def cpu_seconds(helper: int | None = None) -> float:
    """User + system CPU time of this process so far, all threads (DuckDB's included), and of its child
    process `helper` (ours' pair helper, still running: read from /proc, as `getrusage(RUSAGE_CHILDREN)`
    counts only children that have exited and been waited for)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + (process_cpu_seconds(helper) if helper else 0.0)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux `/proc/PID/stat`, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_ours(
    model: Path, reference_path: Path, batch_path: Path, pair_helper: bool = False
) -> dict[str, float]:
    from pipeline.bundle import ModelBundle
    from pipeline.ingest import ReadOptions, iter_table, read_table
    from pipeline.linkage import PairHelper
    from pipeline.score import DEFAULT_CHUNK_ROWS, LinkAhead, link_chunk

    started = time.perf_counter()
    bundle = ModelBundle.load(model)
    config = bundle.config
    options = ReadOptions.from_config(config)
    loaded, cpu_loaded = time.perf_counter(), cpu_seconds()
    # As `run_batch` starts it: once, before the reference is indexed (its CPU time starts at 0).
    helper = PairHelper(bundle.duplicates) if pair_helper and PairHelper.available() else None
    pid = helper.pid if helper else None
    reference = read_table(reference_path, options=options, columns=config.required_columns())
    matcher = bundle.duplicates.matcher(reference, evict=True)
    del reference
    indexed = time.perf_counter()
    rows = 0
    links: dict[str, str] = {}
    id_column = config.id_column
    ahead = LinkAhead(bundle, matcher, helper) if helper is not None else None

    def add(done: list) -> None:
        for chunk, chunk_links, _matched in done:
            found = chunk_links["duplicate_of"].to_numpy()
            linked = found != ""
            links.update(zip(chunk[id_column].to_numpy()[linked], found[linked], strict=True))

    for chunk in iter_table(batch_path, chunk_rows=DEFAULT_CHUNK_ROWS, options=options):
        # What `score` runs per chunk for duplicates: the links and the linked records' values.
        add(ahead.submit(chunk) if ahead else [(chunk, *link_chunk(chunk, bundle, matcher))])
        rows += len(chunk)
    add(ahead.finish() if ahead else [])
    matched = time.perf_counter()
    cpu = cpu_seconds(pid) - cpu_loaded
    if helper is not None:
        helper.close()
    return {
        "load_s": loaded - started,
        "index_s": indexed - loaded,
        "match_s": matched - indexed,
        "duplicate_stage_s": matched - loaded,
        "duplicate_stage_cpu_s": cpu,
        "rows": rows,
        "pair_helper": helper is not None,
        **quality(links, batch_path),
    }


def run_splink(reference_path: Path, batch_path: Path) -> dict[str, float]:
    import pandas as pd
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    started = time.perf_counter()
    frames = []
    for path in (reference_path, batch_path):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=["notes"], errors="ignore")
        frames.append(frame.replace("", None))
    read, cpu_read = time.perf_counter(), cpu_seconds()
    db_api = DuckDBAPI()
    tables = [
        db_api.register(frame, dataset_display_name=name)
        for frame, name in zip(frames, ("ref", "batch"), strict=True)
    ]
    settings = SettingsCreator(
        unique_id_column_name="record_id",
        link_type="link_and_dedupe",
        blocking_rules_to_generate_predictions=[
            block_on("order_number"),
            block_on("customer_code", "amount"),
            block_on("customer_name", "order_date"),
            block_on("email", "amount"),
        ],
        comparisons=[
            cl.JaroWinklerAtThresholds("customer_code", [0.9]).configure(term_frequency_adjustments=True),
            cl.NameComparison("customer_name").configure(term_frequency_adjustments=True),
            cl.LevenshteinAtThresholds("street", [2]),
            cl.LevenshteinAtThresholds("postcode", [1]),
            cl.ExactMatch("city").configure(term_frequency_adjustments=True),
            cl.EmailComparison("email"),
            cl.LevenshteinAtThresholds("phone", [1, 2]),
            cl.LevenshteinAtThresholds("order_number", [1, 2]),
            cl.AbsoluteDateDifferenceAtThresholds(
                "order_date", input_is_string=True, metrics=["day", "day"], thresholds=[3, 31]
            ),
            cl.ExactMatch("amount").configure(term_frequency_adjustments=True),
            cl.ExactMatch("vat_rate"),
        ],
        retain_intermediate_calculation_columns=False,
        retain_matching_columns=False,
    )
    linker = Linker(tables, settings)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("order_number"), block_on("customer_code", "order_date", "amount")], recall=0.8
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("order_number"))
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("customer_code", "amount"))
    trained = time.perf_counter()
    predictions = linker.inference.predict(threshold_match_probability=SPLINK_THRESHOLD)
    pairs = predictions.as_pandas_dataframe()
    predicted = time.perf_counter()
    # Links as ours makes them: each batch record to its best-scoring earlier record above the threshold
    # (record ids grow with entry order in the generator's data).
    both = pd.concat(
        [
            pairs[["record_id_l", "record_id_r", "match_probability"]].set_axis(["a", "b", "p"], axis=1),
            pairs[["record_id_r", "record_id_l", "match_probability"]].set_axis(["a", "b", "p"], axis=1),
        ]
    )
    batch_ids = set(frames[1]["record_id"])
    both = both[both["a"].isin(batch_ids) & (both["b"] < both["a"])]
    best = both.sort_values(["a", "p", "b"], ascending=[True, False, False]).drop_duplicates("a")
    return {
        "read_s": read - started,
        "train_s": trained - read,
        "predict_s": predicted - trained,
        "duplicate_stage_s": predicted - read,
        "duplicate_stage_cpu_s": cpu_seconds() - cpu_read,
        "rows": len(frames[1]),
        "pairs": len(pairs),
        **quality(dict(zip(best["a"], best["b"], strict=True)), batch_path),
        # Unsupervised, Splink has no threshold of its own; what stricter ones would have given:
        **{
            f"{name}_at_{cut}": value
            for cut in (0.9, 0.99, 0.999)
            for name, value in quality(
                dict(zip(best.loc[best["p"] >= cut, "a"], best.loc[best["p"] >= cut, "b"], strict=True)),
                batch_path,
            ).items()
        },
    }


def quality(links: dict[str, str], batch_path: Path) -> dict[str, float]:
    """Links (batch record -> the earlier record it duplicates) against the generator's truth beside the
    batch (`batch_truth.csv` merges, with the history's `corrections.csv` merges): a link is right when
    both records are one entity; recall over the batch records the truth merges."""
    import pandas as pd

    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    truth_rows = []
    for name in ("corrections.csv", "batch_truth.csv"):
        path = batch_path.parent / name
        if path.exists():
            log = pd.read_csv(path, dtype=str, keep_default_na=False)
            merges = log[log["action"] == "merge"]
            for a, b in zip(merges["record_id"], merges["merged_into"], strict=True):
                parent[root(a)] = root(b)
            if name == "batch_truth.csv":
                truth_rows = list(merges["record_id"])
    if not truth_rows:
        return {"links": len(links)}
    right = sum(root(a) == root(b) for a, b in links.items())
    return {
        "links": len(links),
        "precision": right / max(len(links), 1),
        "recall": sum(a in links and root(a) == root(links[a]) for a in truth_rows) / len(truth_rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=("ours", "splink"))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--batch", type=Path, required=True)
    parser.add_argument(
        "--pair-helper",
        action="store_true",
        help="ours: score the pairs in a helper process (run_batch(pair_helper=True); `score --pair-helper`)",
    )
    args = parser.parse_args()
    if args.system == "ours":
        result = run_ours(args.model, args.reference, args.batch, pair_helper=args.pair_helper)
    else:
        result = run_splink(args.reference, args.batch)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

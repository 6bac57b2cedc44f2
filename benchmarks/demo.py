"""Quality and cost on the generated demo data, over several seeds: the product path end to end.

For each seed: generate, `train` (held-out figures on the latest 20% of the history, by time), then
score the new batch against the history with `run_batch` and compare with the batch's ground truth.

    .venv/bin/python benchmarks/demo.py                          # seeds 7, 3, 11 at the default size
    .venv/bin/python benchmarks/demo.py --history 20000 --customers 1200 --seeds 7
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = (("duplicate", "duplicates"), ("error", "error detection"), ("correction", "corrections"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 3, 11])
    parser.add_argument("--history", type=int, default=4000)
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--batch", type=int, default=800)
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_output
    from pipeline.generate import generate
    from pipeline.score import run_batch
    from pipeline.train import train

    rows = []
    for seed in args.seeds:
        work = Path(tempfile.mkdtemp(prefix=f"bench-demo-{seed}-"))
        paths = generate(work, customers=args.customers, history=args.history, batch=args.batch, seed=seed)
        config = load_config(paths.config)
        started = time.perf_counter()
        result = train(config, paths.records, paths.corrections)
        trained = time.perf_counter()
        run_batch(result.bundle, paths.batch, work / "out", reference_path=paths.records)
        scored = time.perf_counter()
        batch = evaluate_output(
            config, work / "out", paths.batch, paths.batch_truth, paths.records, paths.history_truth
        )
        for key, label in TASKS:
            m = result.bundle.metrics
            rows.append(
                (
                    seed,
                    label,
                    *(m[f"test_{key}_{x}"] for x in ("precision", "recall", "f1")),
                    *(batch[f"batch_{key}_{x}"] for x in ("precision", "recall", "f1")),
                )
            )
        rows.append(
            (
                seed,
                "seconds: train / score",
                trained - started,
                scored - trained,
                float("nan"),
                float("nan"),
                float("nan"),
                float("nan"),
            )
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"demo: history {args.history}, batch {args.batch}, customers {args.customers}; peak {peak:.0f} MB")
    print("| seed | task | held-out P | R | F1 | batch P | R | F1 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seed, label, *values in rows:
        cells = " | ".join("" if v != v else f"{v:.3f}" for v in values)
        print(f"| {seed} | {label} | {cells} |")


if __name__ == "__main__":
    main()

"""Runs Raha (detection) and then Baran (correction) on one benchmark data set; prints one JSON line.

Executed with the separate environment that has the PyPI package `raha` (it needs pandas < 3), not with
the project's: `benchmarks/raha.py` calls it as a child process.

    benchmarks/.venv-raha/bin/python benchmarks/raha_baseline.py --dirty D --clean C --name hospital --seed 0

Raha picks its own 20 tuples to label (LABELING_BUDGET=20) and Baran, given Raha's detections, picks and
labels its own 20. Figures are Raha's own `get_data_cleaning_evaluation` over the whole table (the way the
papers report them). The data set is copied into a scratch folder first: raha writes its results beside
the input file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dirty", required=True)
    parser.add_argument("--clean", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--skip-correction", action="store_true")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    # This script's folder also holds benchmarks/raha.py, which would shadow the package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    import numpy
    import raha

    random.seed(args.seed)
    numpy.random.seed(args.seed)
    work = tempfile.mkdtemp(prefix=f"raha-{args.name}-")
    try:
        dirty, clean = os.path.join(work, "dirty.csv"), os.path.join(work, "clean.csv")
        shutil.copyfile(args.dirty, dirty)
        shutil.copyfile(args.clean, clean)
        dataset = {"name": args.name, "path": dirty, "clean_path": clean}

        started = time.perf_counter()
        detector = raha.Detection()
        detector.LABELING_BUDGET = args.budget
        detector.VERBOSE = False
        detector.SAVE_RESULTS = False
        detected = detector.run(dataset)
        detection_seconds = time.perf_counter() - started

        data = raha.dataset.Dataset(dataset)
        p, r, f = data.get_data_cleaning_evaluation(detected)[:3]
        result = {
            "name": args.name,
            "seed": args.seed,
            "detection_precision": p,
            "detection_recall": r,
            "detection_f1": f,
            "detection_seconds": detection_seconds,
            "flags": len(detected),
            "true_errors": len(data.get_actual_errors_dictionary()),
        }
        if not args.skip_correction:
            started = time.perf_counter()
            data.detected_cells = dict(detected)
            corrector = raha.Correction()
            corrector.LABELING_BUDGET = args.budget
            corrector.VERBOSE = False
            corrector.SAVE_RESULTS = False
            corrected = corrector.run(data)
            correction_seconds = time.perf_counter() - started
            p, r, f = data.get_data_cleaning_evaluation(corrected)[-3:]
            result.update(
                correction_precision=p,
                correction_recall=r,
                correction_f1=f,
                correction_seconds=correction_seconds,
                suggestions=len(corrected),
            )
        result["peak_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation plots for MLflow: precision-recall curves and score histograms.

They show scores and rates only, never a record value, so they are safe to log.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.evaluate import Evaluation


def write_evaluation_plots(evaluation: Evaluation, folder: Path) -> list[Path]:
    """Writes one PR curve and one score histogram per task (duplicates, errors) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    written = []
    for task, (scores, labels) in (
        ("duplicate", evaluation.duplicate_curve),
        ("error", evaluation.error_curve),
    ):
        fig, ax = plt.subplots(figsize=(5, 4))
        if labels.sum():
            precision, recall, _ = precision_recall_curve(labels, scores)
            ax.plot(recall, precision, drawstyle="steps-post")
        ax.set(
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.02),
            title=f"{task}: held-out PR curve",
        )
        path = folder / f"{task}_pr_curve.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(5, 4))
        bins = np.linspace(0, 1, 21)
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="not corrected", log=True)
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="corrected by staff", log=True)
        ax.set(xlabel="score", ylabel="count (log)", title=f"{task}: held-out score histogram")
        ax.legend()
        path = folder / f"{task}_score_histogram.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written

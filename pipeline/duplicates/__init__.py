"""The duplicate model's parts, one job each; `pipeline.linkage.DuplicateModel` puts them together.

* `blocking`: which records are compared (`BlockingRule`, `BlockingLearner`: the keys that cover the known
  pairs at the fewest comparisons);
* `labels`: which pairs the classifier learns from (`LabelSampler`: positives, hard and made-up negatives);
* `classifier`: what a pair's comparisons are worth (`PairClassifier`: logistic regression, signs fixed by
  the field plugins);
* `calibration`: where to link (`choose_link_threshold` on held-out data);
* `reasons`: what the clerk reads (`ReasonWriter`).

Each takes plain arrays, frames or field plugins, so each is testable alone (`tests/test_duplicates.py`).
"""

"""The duplicate model on tiny literal registers: training from a log, matching, clustering, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Config
from pipeline.exceptions import ModelLoadError, TrainingDataError
from pipeline.linkage import META_FILE, SETTINGS_FILE, DuplicateModel
from pipeline.metrics import link_metrics

CONFIG = Config.model_validate(
    {
        "name": "orders",
        "id_column": "record_id",
        "time_column": "entered_at",
        "fields": {
            "customer_code": {"type": "code"},
            "customer_name": {"type": "text"},
            "city": {"type": "category"},
            "order_date": {"type": "date"},
            "amount": {"type": "number"},
            "notes": {"type": "text", "match": False},
        },
    }
)
COLUMNS = [
    "record_id",
    "entered_at",
    "customer_code",
    "customer_name",
    "city",
    "order_date",
    "amount",
    "notes",
]
CUSTOMERS = [
    ("C-10021", "Jan de Vries", "Amsterdam"),
    ("C-10437", "Bakkerij Smit", "Utrecht"),
    ("C-20988", "Van Dam Installaties", "Groningen"),
    ("C-31552", "Fam. Jansen", "Zwolle"),
    ("C-47710", "Hoveniersbedrijf Groen", "Arnhem"),
    ("C-52019", "Pieters en Zn", "Utrecht"),
    ("C-63305", "Autobedrijf Mulder", "Amsterdam"),
    ("C-78814", "De Boer Advies", "Leiden"),
]
# (order index, field, entered value): re-registrations of earlier orders, with the usual slips.
SLIPS = [
    (0, "customer_name", "Jan de Vriess"),
    (3, "customer_code", "C-13437"),
    (5, "order_date", "2024-{day:02d}-{month:02d}"),
    (8, "customer_name", "van Dam Instalaties"),
    (11, "amount", "{amount_cents}"),
    (13, "customer_code", ""),
    (16, "customer_name", "Hoveniersbedryf Groen"),
    (19, "order_date", "2024-{month:02d}-{day_after:02d}"),
    (21, "customer_name", "Autobedrijf Muller"),
    (22, "city", ""),
]


def order(n: int) -> dict[str, str]:
    code, name, city = CUSTOMERS[n % len(CUSTOMERS)]
    month, day = 1 + n % 9, 1 + (n * 7) % 27
    return {
        "record_id": f"R{n:04d}",
        "entered_at": f"2024-{month:02d}-{day:02d}T09:00:00",
        "customer_code": code,
        "customer_name": name,
        "city": city,
        "order_date": f"2024-{month:02d}-{day:02d}",
        "amount": f"{100 + 37 * n:.2f}",
        "notes": "",
    }


def history() -> tuple[pd.DataFrame, set[frozenset[str]]]:
    """24 orders of 8 customers plus 10 re-registrations of them, entered a day later."""
    rows = [order(n) for n in range(24)]
    pairs = set()
    for k, (n, field, value) in enumerate(SLIPS):
        original = order(n)
        month, day = int(original["order_date"][5:7]), int(original["order_date"][8:])
        copy = dict(
            original, record_id=f"D{k:04d}", entered_at=original["entered_at"].replace("09:00", "15:00")
        )
        copy[field] = value.format(
            day=day, month=month, day_after=day + 1, amount_cents=original["amount"].replace(".", ",")
        )
        rows.append(copy)
        pairs.add(frozenset((copy["record_id"], original["record_id"])))
    frame = pd.DataFrame(rows, columns=COLUMNS, dtype=object)
    return frame.sort_values("entered_at", kind="stable").reset_index(drop=True), pairs


@pytest.fixture(scope="module")
def trained() -> tuple[DuplicateModel, pd.DataFrame]:
    records, pairs = history()
    return DuplicateModel(CONFIG, seed=0).fit(records, pairs), records


def batch(rows: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS, dtype=object)


def test_fit_learns_blocking_to_the_recall_target_and_counts_its_labels(trained) -> None:
    model, _ = trained
    assert model.blocking_recall_ >= 0.99
    assert model.candidate_recall_ >= 0.9
    assert 1 <= len(model.blocking_rules_) <= 12
    assert model.label_counts_["positive"] == len(SLIPS)
    assert model.label_counts_["lookalike_negative"] > 0
    assert model.label_counts_["field_agreement_negative"] > 0
    assert sum(v for k, v in model.label_counts_.items() if k != "dropped_as_unmerged_duplicates") == 1000
    assert model.threshold_ == 0.5
    assert len(model.weights_) == len(model.feature_names_) == model.n_features_


def test_features_are_dedupes_own_distances(trained) -> None:
    model, records = trained
    matcher = model.matcher(records)
    left, right = np.array([25, 3, 7]), np.array([0, 2, 1])
    pairs = []
    for a, b in zip(left, right, strict=True):
        pairs.append(tuple({f: matcher._parsed_value(f, i) for f in matcher._fields} for i in (a, b)))
    assert np.allclose(matcher._features(left, right), model.data_model_.distances(pairs), equal_nan=True)


def test_a_new_registration_is_matched_to_the_reference_with_a_reason(trained) -> None:
    model, records = trained
    original = order(6)
    again = dict(
        original, record_id="N1", entered_at="2024-07-20T10:00:00", customer_name="Autobedrjf Mulder"
    )
    other = order(40) | {"record_id": "N2", "amount": "9999.00", "order_date": "2024-12-01"}
    links = model.matcher(records).match(batch([again, other]).set_index(pd.Index([10, 11])))
    assert links.index.tolist() == [10, 11]
    assert links.loc[10, "duplicate_of"] == original["record_id"]
    assert links.loc[10, "duplicate_score"] > 0.9
    assert links.loc[10, "cluster_id"] == original["record_id"]
    reason = links.loc[10, "reason"]
    assert reason.startswith("same ")
    assert "customer name differs by one letter" in reason
    assert reason.endswith(f"entered 4 days after {original['record_id']}")
    assert links.loc[11].to_dict() == {
        "duplicate_of": "",
        "duplicate_score": pytest.approx(links.loc[11, "duplicate_score"]),
        "cluster_id": "N2",
        "reason": "",
    }
    assert links.loc[11, "duplicate_score"] < model.threshold_


def test_duplicates_within_a_batch_are_found_across_chunks_and_chained_into_one_cluster(trained) -> None:
    model, records = trained
    first = order(50) | {"record_id": "A", "amount": "4321.00", "entered_at": "2025-01-01T09:00:00"}
    second = first | {"record_id": "B", "customer_name": first["customer_name"] + "x"}
    third = second | {"record_id": "C", "entered_at": "2025-01-02T09:00:00"}
    matcher = model.matcher(records)
    one = matcher.match(batch([first, second]))
    two = matcher.match(batch([third]))
    assert one["duplicate_of"].tolist() == ["", "A"]
    assert two["duplicate_of"].tolist() == ["B"]
    assert one["cluster_id"].tolist() + two["cluster_id"].tolist() == ["A", "A", "A"]
    assert matcher.record("B") == {k: v for k, v in second.items() if k not in ("record_id", "entered_at")}
    assert matcher.record(records["record_id"][0])["customer_code"] == records["customer_code"][0]
    assert matcher.record("unknown") is None


def test_a_matcher_without_reference_only_matches_within_the_batch(trained) -> None:
    model, _ = trained
    rows = [order(3) | {"record_id": "X"}, order(3) | {"record_id": "Y"}]
    links = model.matcher(None).match(batch(rows))
    assert links["duplicate_of"].tolist() == ["", "X"]
    assert links["reason"].iloc[1] == "same amount, order date and customer name; entered the same day as X"


def test_calibrate_chooses_the_threshold_on_held_out_records(trained) -> None:
    model, records = trained
    held_out = [
        order(2) | {"record_id": "H1", "customer_name": "Bakkerij Smith"},
        order(60) | {"record_id": "H2", "amount": "1.00"},
        order(9) | {"record_id": "H3", "order_date": "2024-01-09"},
    ]
    copy = DuplicateModel(CONFIG, seed=0)
    copy.__dict__.update(model.__dict__)
    figures = copy.calibrate(batch(held_out), records, {"H1": "R0002", "H3": "R0009"})
    assert figures["f1"] == 1.0 and figures["tp"] == 2 and figures["fp"] == 0
    assert 0 < copy.threshold_ < 1
    scores = copy.candidate_scores(batch(held_out), records)
    assert set(scores.columns) == {"record_id", "candidate_id", "score"}
    assert scores.groupby("record_id")["score"].max()["H1"] >= copy.threshold_


def test_save_and_load_give_identical_scores(trained, tmp_path: Path) -> None:
    model, records = trained
    model.save(tmp_path / "duplicates")
    loaded = DuplicateModel.load(tmp_path / "duplicates")
    probe = batch(
        [order(5) | {"record_id": "P1", "customer_code": "C-10473"}, order(70) | {"record_id": "P2"}]
    )
    before = model.matcher(records).match(probe)
    after = loaded.matcher(records).match(probe)
    pd.testing.assert_frame_equal(before, after)
    assert loaded.blocking_rules_ == model.blocking_rules_
    assert loaded.label_counts_ == model.label_counts_
    meta = json.loads((tmp_path / "duplicates" / META_FILE).read_text())
    assert meta["dedupe_version"].startswith("3.")
    assert meta["field_plugins"]["customer_code"] == "code"


def test_loading_an_incompatible_or_missing_model_says_so_in_one_line(trained, tmp_path: Path) -> None:
    model, _ = trained
    with pytest.raises(ModelLoadError, match="not found"):
        DuplicateModel.load(tmp_path / "nowhere")
    model.save(tmp_path / "old")
    meta_path = tmp_path / "old" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"format_version": 0}))
    with pytest.raises(ModelLoadError, match="format version 0") as caught:
        DuplicateModel.load(tmp_path / "old")
    assert "\n" not in str(caught.value)
    meta_path.write_text(json.dumps(meta | {"dedupe_version": "2.0.23"}))
    with pytest.raises(ModelLoadError, match="dedupe 2.0.23"):
        DuplicateModel.load(tmp_path / "old")
    meta_path.write_text(json.dumps(meta))
    settings_path = tmp_path / "old" / SETTINGS_FILE
    settings = json.loads(settings_path.read_text())
    settings["classifier"]["features"] = settings["classifier"]["features"][:-1]
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(ModelLoadError, match="features do not match"):
        DuplicateModel.load(tmp_path / "old")
    settings_path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        DuplicateModel.load(tmp_path / "old")


def test_without_known_pairs_the_model_links_nothing_and_round_trips(tmp_path: Path) -> None:
    records, _ = history()
    model = DuplicateModel(CONFIG).fit(records, {frozenset(("R0001", "nobody"))})
    assert model.blocking_rules_ == [] and model.label_counts_ == {"positive": 0}
    model.save(tmp_path / "m")
    for candidate in (model, DuplicateModel.load(tmp_path / "m")):
        links = candidate.matcher(records).match(records.assign(record_id=records["record_id"] + "-new"))
        assert (links["duplicate_of"] == "").all()
        assert (links["cluster_id"] == records["record_id"].to_numpy() + "-new").all()
        assert (links["duplicate_score"] == 0).all()


def test_fit_on_too_few_records_is_a_training_data_error() -> None:
    records, pairs = history()
    with pytest.raises(TrainingDataError, match="too few"):
        DuplicateModel(CONFIG).fit(records.head(3), pairs)


def test_link_metrics_counts_links_to_any_earlier_member_of_the_true_cluster() -> None:
    predicted = pd.DataFrame({"duplicate_of": ["A2", "", "Z", "B"]}, index=["A3", "B2", "C2", "Q"])
    truth = {"A3": "A1", "B2": "B", "C2": "C"}
    clusters = {"A1": "A1", "A2": "A1", "A3": "A1", "B": "B", "B2": "B", "C": "C", "C2": "C"}
    assert link_metrics(predicted, truth, clusters) == {
        "precision": pytest.approx(1 / 3),
        "recall": pytest.approx(1 / 3),
        "f1": pytest.approx(1 / 3),
        "tp": 1,
        "fp": 2,
        "fn": 2,
    }

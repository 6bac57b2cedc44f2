"""The duplicate model on tiny literal registers: training from a log, matching, clustering, persistence."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import schema as s
from pipeline.config import Config
from pipeline.duplicates.calibration import link_floor
from pipeline.exceptions import ModelLoadError, TrainingDataError
from pipeline.fields.text import token_distance
from pipeline.linkage import META_FILE, SETTINGS_FILE, DuplicateModel, running_rarities
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
    assert model.label_counts_["chance_negative"] > 0
    assert sum(v for k, v in model.label_counts_.items() if k != "dropped_as_unmerged_duplicates") == 1000
    assert model.threshold_ == 0.5
    assert len(model.weights_) == len(model.feature_names_) == model.n_features_


def test_features_are_dedupes_own_distances(trained) -> None:
    model, records = trained
    matcher = model.matcher(records)
    # The last pair: two orders of one customer, agreeing on the code, name and city.
    customer = np.flatnonzero(records["customer_code"] == records.loc[0, "customer_code"])
    left, right = np.array([25, 3, 7, customer[1]]), np.array([0, 2, 1, customer[0]])
    pairs = []
    for a, b in zip(left, right, strict=True):
        pairs.append(tuple({f: matcher._parsed_value(f, i) for f in matcher._fields} for i in (a, b)))
    # The reference is indexed in one part: each record's value counted among the records up to it.
    rarities = matcher._counted(left)
    features = matcher._features(left, right, rarities=rarities)
    dedupes = len(model.data_model_)
    assert np.allclose(features[:, :dedupes], model.data_model_.distances(pairs), equal_nan=True)
    # Then one term-frequency column per field: the shared value's counted rarity where the two agree,
    # else 0; the rarity as `running_rarities` counts the records in entry order.
    order = model._entry_order(records)
    agreements = 0
    for column, field in enumerate(matcher._fields):
        plugin = next(plugin for plugin in model.plugins_ if plugin.field == field)
        normalised = plugin.normalise(records[field].iloc[order].astype(object)).to_numpy(dtype=object)
        counted = running_rarities(normalised, model.term_frequencies_[field].scale_total)
        entered = np.empty(len(order), dtype=np.int64)
        entered[order] = np.arange(len(order))
        for row, (a, b) in enumerate(zip(left, right, strict=True)):
            same = records.loc[a, field] == records.loc[b, field] != ""
            expected = counted[entered[a]] if same else 0.0
            assert features[row, dedupes + column] == pytest.approx(expected, abs=1e-6)
            agreements += same
    assert agreements >= 3


def test_scoring_skips_comparisons_the_classifier_weighs_zero_and_scores_the_same(trained) -> None:
    model, records = trained
    data_model = model.data_model_
    text_column = next(  # the name's affine-gap distance, dedupe's String
        start
        for (field, _, start, _), variable in zip(
            data_model._field_comparators, data_model.field_variables, strict=True
        )
        if field == "customer_name" and variable.type == "String"
    )
    indicator = data_model._derived_start + list(data_model._missing_field_indices).index(text_column)
    zeroed = copy.copy(model)
    zeroed.weights_ = model.weights_.copy()
    zeroed.weights_[[text_column, indicator]] = [0.0, 1.0]
    # Its "both present" column still counts, and a NaN distance would turn it off: compared then.
    assert text_column not in zeroed.matcher(None)._unweighed()
    zeroed.weights_[indicator] = 0.0
    matcher = zeroed.matcher(records)
    assert text_column in matcher._unweighed()
    left, right = np.arange(1, len(records)), np.arange(0, len(records) - 1)
    rarities = matcher._counted(left)
    full = matcher._features(left, right, rarities=rarities)
    scored = matcher._features(left, right, scoring=True, rarities=rarities)
    assert not np.array_equal(full[:, text_column], scored[:, text_column])  # not computed when scoring
    assert np.array_equal(zeroed.probabilities(full), zeroed.probabilities(scored))  # bit for bit


def all_text_deferred(model: DuplicateModel) -> DuplicateModel:
    """A copy of the model whose every affine gap and token-set distance counts against a match: all of
    them deferred by `Matcher._settle`."""
    data_model = model.data_model_
    strings = [
        start
        for (_, _, start, _), variable in zip(
            data_model._field_comparators, data_model.field_variables, strict=True
        )
        if variable.type == "String"
    ]
    tokens = [
        start
        for (_, compare, start, _), variable in zip(
            data_model._field_comparators, data_model.field_variables, strict=True
        )
        if variable.type == "Custom" and compare is token_distance
    ]
    weighed = copy.copy(model)
    weighed.weights_ = model.weights_.copy()
    weighed.weights_[strings + tokens] = -0.3
    assert tokens and weighed.matcher(None)._deferrable() == set(strings + tokens)
    return weighed


def test_matching_computes_the_text_distances_only_where_a_pair_may_be_best_and_links_the_same(
    trained, monkeypatch
) -> None:
    """`match` leaves dedupe's affine gap and the token-set distance out of a pair's score until the pair
    may be its record's best (`Matcher._settle`): each row's best candidate and score are bit for bit those
    of scoring every pair in full, with far fewer text comparisons."""
    from pipeline.linkage import Matcher

    model, records = trained
    weighed = all_text_deferred(model)
    rows = [
        order(n) | {"record_id": f"B{n}", "entered_at": "2025-01-01T09:00:00", "amount": f"{n}.00"}
        for n in range(40)
    ]
    rows += [
        order(n) | {"record_id": f"S{n}", "entered_at": "2025-01-02T09:00:00", "customer_name": name}
        for n, name in [(1, "Bakkery Smit"), (2, "Van Dam Instalaties"), (9, "Bakkerij Smid"), (30, "")]
    ]
    computed: list[int] = []  # pairs whose affine gaps `_settle` computes
    real = Matcher._compute_deferred

    def counting(self, rows, *args):
        computed.append(len(rows))
        return real(self, rows, *args)

    monkeypatch.setattr(Matcher, "_compute_deferred", counting)
    full, pairs = weighed.matcher(records)._score(batch(rows))  # every pair scored in full
    assert not computed
    links = weighed.matcher(records).match(batch(rows))
    assert 0 < sum(computed) < len(pairs)  # some pairs were left with their bound
    assert np.array_equal(links["duplicate_score"].to_numpy(), full["score"].to_numpy())
    linked = full["score"].to_numpy() >= weighed.threshold_
    assert links["duplicate_of"].tolist() == np.where(linked, full["candidate_id"], "").tolist()
    assert linked[-4:].tolist() == [True, True, True, False]


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
        "duplicate_position": -1,
        "reference_duplicate_positions": (),
    }
    assert links.loc[11, "duplicate_score"] < model.threshold_


def records_named(matcher, positions) -> set[tuple[str, ...]]:
    """The field values of the records at these index positions (what a link carries), one tuple each."""
    return set(zip(*matcher.records_at(list(positions)).values(), strict=True))


def test_a_row_names_every_reference_record_it_duplicates_beside_its_link(trained) -> None:
    """An order registered, re-registered with a slip, and entered again as first registered: the third
    row duplicates both earlier ones. One is its link; the other, a reference record, is named by its
    position in `reference_duplicate_positions`. A batch row it duplicates is not named there (its values
    are as entered)."""
    model, records = trained
    original = order(6)
    slipped = original | {"record_id": "A1", "entered_at": "2024-07-20T10:00:00"}
    slipped["customer_name"] = "Autobedrjf Mulder"
    again = original | {"record_id": "A2", "entered_at": "2024-07-21T10:00:00"}
    unrelated = order(40) | {"record_id": "A3", "amount": "9999.00", "order_date": "2024-12-01"}
    reference = pd.concat([records, batch([slipped])], ignore_index=True)
    matcher = model.matcher(reference)
    links = matcher.match(batch([again, unrelated]))
    named = [links[s.DUPLICATE_POSITION].iloc[0], *links[s.REFERENCE_DUPLICATE_POSITIONS].iloc[0]]
    both = matcher.records([original["record_id"], "A1"])
    assert len(named) == 2 and records_named(matcher, named) == set(zip(*both.values(), strict=True))
    # The link's position is that of the record `duplicate_of` names (what the batch job reads).
    assert matcher.records_at(named[:1]) == matcher.records(links[s.DUPLICATE_OF].iloc[:1].tolist())
    assert links[s.REFERENCE_DUPLICATE_POSITIONS].iloc[1] == () and links[s.DUPLICATE_POSITION].iloc[1] == -1
    # The slipped copy in the batch instead: the row still links to one of the two, but names no batch row
    # (a batch row is indexed after the reference: at a position from len(records) on).
    matcher = model.matcher(records)
    matcher.match(batch([slipped]))
    links = matcher.match(batch([again]))
    assert links[s.DUPLICATE_OF].iloc[0] in (original["record_id"], "A1")
    assert all(position < len(records) for position in links[s.REFERENCE_DUPLICATE_POSITIONS].iloc[0])


def test_the_reference_duplicates_are_those_scoring_at_the_threshold_in_full(trained) -> None:
    """With the text distances deferred, `match` may leave a candidate that cannot be the best with a
    bound above its exact score (`Matcher._settle`). One whose bound reaches the threshold and whose exact
    score does not is no duplicate: the link and `reference_duplicate_positions` name exactly the
    reference records scoring at or above the threshold when every pair is scored in full (`_score`)."""
    model, records = trained
    weighed = all_text_deferred(model)
    weighed.threshold_ = 0.9  # between A1's exact score against A3 (about 0.83) and its bound (about 0.96)
    original = order(6)
    rows = [
        original | {"record_id": "A1", "customer_name": "Pietersen Auto", "city": "Leiden"},
        original | {"record_id": "A2", "customer_name": "Autobedrjf Mulder"},
    ]
    rows = [row | {"entered_at": f"2024-07-2{i}T10:00:00"} for i, row in enumerate(rows)]
    reference = pd.concat([records, batch(rows)], ignore_index=True)
    again = batch([original | {"record_id": "A3", "entered_at": "2024-07-23T10:00:00"}])
    _, pairs = weighed.matcher(reference)._score(again)
    matcher = weighed.matcher(reference)
    links = matcher.match(again)
    sure = set(pairs.loc[pairs["score"] >= weighed.threshold_, "candidate_id"])
    assert sure == {"R0006", "A2"}
    named = [links[s.DUPLICATE_POSITION].iloc[0], *links[s.REFERENCE_DUPLICATE_POSITIONS].iloc[0]]
    assert len(named) == 2
    assert records_named(matcher, named) == set(zip(*matcher.records(sorted(sure)).values(), strict=True))


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
    assert links["reason"].iloc[1] == "same order date, amount and customer code; entered the same day as X"


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


def test_a_reference_indexed_in_parts_and_a_batch_calibrated_in_parts_give_the_same_links(
    trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.linkage as linkage

    model, records = trained
    # Re-registrations of orders from all over the history, and a pair within the batch.
    rows = [
        order(n) | {"record_id": f"N{n}", "customer_name": order(n)["customer_name"] + "x"}
        for n in range(0, 24, 3)
    ]
    rows.append(rows[-1] | {"record_id": "N99", "entered_at": "2025-01-01T09:00:00"})
    probe = batch(rows)
    whole = model.matcher(records).match(probe)
    assert (whole["duplicate_of"] != "").sum() >= 5
    truth = {f"N{n}": f"R{n:04d}" for n in range(0, 24, 3)}
    copy = DuplicateModel(CONFIG, seed=0)
    copy.__dict__.update(model.__dict__)
    figures = copy.calibrate(probe, records, truth)
    monkeypatch.setattr(linkage, "REFERENCE_ROWS", 4)  # 34 records in nine parts, pairs across the cuts
    monkeypatch.setattr(linkage, "MATCH_ROWS", 2)
    for evict in (False, True):
        parts = model.matcher(records, evict=evict).match(probe)
        pd.testing.assert_frame_equal(parts, whole)
    copy_parts = DuplicateModel(CONFIG, seed=0)
    copy_parts.__dict__.update(model.__dict__)
    assert copy_parts.calibrate(probe, records, truth) == figures
    assert copy_parts.threshold_ == copy.threshold_


def test_calibrate_does_not_link_below_the_models_own_boundary(trained) -> None:
    # A held-out period as sparse as the history: its weakest duplicate (the amount retyped 3% off) is
    # the only pair between 0.05 and 0.99, and the best F1 would put the threshold at 0.05, where a batch
    # twenty times denser holds many more look-alikes than the held-out period showed. The model's own
    # boundary is its link floor: with 10 known pairs among 1,000 labels (99 negatives per positive) the
    # classifier's 0.5 asks for the labels' odds, so the floor asks for 19:1 (about 0.16), still above H1.
    model, records = trained
    held_out = [
        order(2) | {"record_id": "H1", "amount": "179.00"},
        order(5) | {"record_id": "H2", "customer_name": "Pieters & Zn"},
    ]
    copy = DuplicateModel(CONFIG, seed=0)
    copy.__dict__.update(model.__dict__)
    scores = copy.candidate_scores(batch(held_out), records).groupby("record_id")["score"].max()
    floor = link_floor(copy.label_counts_)
    assert 0.1 < floor < 0.5
    assert scores["H1"] < floor <= scores["H2"]
    figures = copy.calibrate(batch(held_out), records, {"H1": "R0002", "H2": "R0005"})
    assert copy.threshold_ == floor
    assert figures["tp"] == 1 and figures["fn"] == 1 and figures["recall"] == 0.5


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


# ------------------------------------------------------- evidence weighed by how common it is

ORDERS_CONFIG = Config.model_validate(
    {
        "name": "orders",
        "id_column": "record_id",
        "time_column": "entered_at",
        "fields": {
            "customer_code": {"type": "code"},
            "customer_name": {"type": "text"},
            "city": {"type": "category"},
            "order_number": {"type": "code"},
            "order_date": {"type": "date"},
            "amount": {"type": "number"},
        },
    }
)
FIRST = ("Jan", "Piet", "Kees", "Anna", "Sara", "Eva", "Bram", "Lotte", "Daan", "Noor", "Sem", "Fleur")
LAST = ("de Vries", "Jansen", "Bakker", "Visser", "Smit", "Mulder", "de Boer", "Bos", "Vos", "Dekker")
CITIES = ("Amsterdam", "Utrecht", "Zwolle", "Leiden", "Arnhem", "Delft")
STANDING_AMOUNT = "250.00"


def register(
    orders: int, *, seed: int = 0, start: int = 0, far_numbers: bool = True
) -> tuple[pd.DataFrame, set[frozenset[str]]]:
    """Orders of 60 customers, two of them busy (half the orders) and reordering a standing amount, with
    about one re-registration per twelve orders (same amount, the same date or a day or two later, the old
    or a new order number, often a typo in the name), entered a day later. `start` shifts ids, numbers and
    dates, for a later period."""
    rng = np.random.default_rng(seed)
    customers = [
        (f"C-{10000 + 37 * k}", f"{FIRST[k % 12]} {LAST[k // 6 % 10]} {k}", CITIES[k % 6]) for k in range(60)
    ]
    weights = np.r_[[15.0, 15.0], np.ones(58)]
    base = pd.Timestamp("2023-01-02")
    rows, pairs = [], set()
    number = 500000 + start
    for i in range(start, start + orders):
        k = int(rng.choice(60, p=weights / weights.sum()))
        code, name, city = customers[k]
        day = base + pd.Timedelta(days=i // 4)
        amount = STANDING_AMOUNT if k < 2 and rng.random() < 0.7 else f"{rng.uniform(20, 2000):.2f}"
        number += 1
        row = {
            "record_id": f"R{i:06d}",
            "entered_at": (day + pd.Timedelta(hours=9 + i % 4)).isoformat(),
            "customer_code": code,
            "customer_name": name,
            "city": city,
            "order_number": f"SO-{number}",
            "order_date": day.date().isoformat(),
            "amount": amount,
        }
        rows.append(row)
        if i % 12 == 5:
            again = dict(row, record_id=f"D{i:06d}")
            again["entered_at"] = (day + pd.Timedelta(days=1, hours=9)).isoformat()
            if rng.random() < 0.5:
                # A new number is the running number when it is entered again: in a busy register
                # thousands of orders later, nothing like the original's (`far_numbers`), else the next.
                number += 1
                again["order_number"] = f"SO-{900000 + 7 * i if far_numbers else number}"
            if rng.random() < 0.3:
                slipped = day + pd.Timedelta(days=int(rng.integers(1, 3)))
                again["order_date"] = slipped.date().isoformat()
            if rng.random() < 0.5:
                again["customer_name"] = name.replace("a", "e", 1) if "a" in name else name + "s"
            rows.append(again)
            pairs.add(frozenset((row["record_id"], again["record_id"])))
    return pd.DataFrame(rows, dtype=object), pairs


@pytest.fixture(scope="module")
def standing_orders() -> tuple[DuplicateModel, pd.DataFrame]:
    records, pairs = register(480)
    return DuplicateModel(ORDERS_CONFIG, seed=0).fit(records, pairs), records


def busy_order(records: pd.DataFrame) -> dict[str, str]:
    busy = records[(records["amount"] == STANDING_AMOUNT) & records["record_id"].str.startswith("R")]
    return busy.iloc[-1].to_dict()


def test_agreeing_on_a_common_value_is_weaker_evidence_than_on_a_rare_one(standing_orders) -> None:
    model, records = standing_orders
    names = model.term_frequencies_["customer_name"]
    busy, rare = busy_order(records)["customer_name"], records["customer_name"].value_counts().index[-1]
    assert names.rarity(busy.lower()) < 0.5 < names.rarity(rare.lower())
    assert model.term_frequencies_["amount"].rarity("250") < model.term_frequencies_["amount"].rarity(
        "1234.56"
    )
    # The learned weight of a shared value's rarity is positive: two records agreeing on a rare amount are
    # more alike than two agreeing on the busy customers' standing amount, everything else equal.
    weight = dict(zip(model.feature_names_, model.weights_, strict=True))["(amount: term frequency)"]
    assert weight > 0
    pair = {"order_number": "SO-1", "order_date": "2023-05-01", "city": "Delft"}
    common = pair | {"customer_code": "C-99999", "customer_name": "X Y", "amount": STANDING_AMOUNT}
    rare = common | {"amount": "1234.56"}
    scored = model.matcher(None).match(
        batch_of([common | {"record_id": "A1"}, common | {"record_id": "A2"}])
    )["duplicate_score"]
    scored_rare = model.matcher(None).match(
        batch_of([rare | {"record_id": "B1"}, rare | {"record_id": "B2"}])
    )["duplicate_score"]
    assert scored.iloc[1] < scored_rare.iloc[1]


def batch_of(rows: list[dict[str, str]]) -> pd.DataFrame:
    columns = ["record_id", "entered_at", *ORDERS_CONFIG.fields]
    return pd.DataFrame([{"entered_at": "2023-09-01T10:00:00"} | row for row in rows], columns=columns)


def test_a_repeat_order_is_not_a_duplicate_but_a_re_registration_is(standing_orders) -> None:
    model, records = standing_orders
    last = busy_order(records)
    later = (pd.Timestamp(last["order_date"]) + pd.Timedelta(days=60)).date().isoformat()
    repeat = last | {"record_id": "N1", "order_number": "SO-999001", "order_date": later}
    retyped = last | {"record_id": "N2", "customer_name": last["customer_name"] + "x"}
    # A quiet customer's order entered again two days later under a new number: the amount is rare evidence.
    quiet = records[records["customer_code"] == records["customer_code"].value_counts().index[-1]].iloc[-1]
    shifted = (pd.Timestamp(quiet["order_date"]) + pd.Timedelta(days=2)).date().isoformat()
    moved = quiet.to_dict() | {"record_id": "N3", "order_date": shifted}
    scores = {}
    for row, duplicate in ((repeat, False), (retyped, True), (moved, True)):
        links = model.matcher(records).match(batch_of([row]))
        score = scores[row["record_id"]] = links["duplicate_score"].iloc[0]
        assert (score >= model.threshold_) == duplicate, (row["record_id"], score, links["reason"].iloc[0])
    # ... and under a new number too (0.59 in this small history, with six such re-registrations).
    renumbered = moved | {"record_id": "N4", "order_number": "SO-999002"}
    score = model.matcher(records).match(batch_of([renumbered]))["duplicate_score"].iloc[0]
    assert score >= model.threshold_ > 100 * scores["N1"], (score, scores)


def test_rejected_pairs_become_negatives_and_the_false_alarm_is_not_raised_again() -> None:
    records, pairs = register(480, seed=1, far_numbers=False)
    # An order delivered in two parts is entered twice with every field the same; a clerk looked at each
    # such pair the model flagged and said they are two records, not a re-registration.
    originals = records[records["record_id"].str.startswith("R")].iloc[10:460:15].to_dict("records")
    twins, rejected = [], set()
    for k, row in enumerate(originals):
        twin = row | {"record_id": f"T{k:04d}"}
        twins.append(twin)
        rejected.add(frozenset((row["record_id"], twin["record_id"])))
    # Before the review a model of the register flags such a twin; after it, the history holds the twins,
    # unmerged, and the clerk's rejections.
    unseen = DuplicateModel(ORDERS_CONFIG, seed=0).fit(records, pairs)
    history = pd.concat([records, pd.DataFrame(twins[:-1])], ignore_index=True)
    unmerged = DuplicateModel(ORDERS_CONFIG, seed=0).fit(history, pairs)
    after = DuplicateModel(ORDERS_CONFIG, seed=0).fit(history, pairs, non_pairs=rejected)
    assert unmerged.label_counts_["rejected_negative"] == 0
    assert after.label_counts_["rejected_negative"] == len(rejected) - 1  # the last twin is not in history
    probe = batch_of([twins[-1]])
    score_unseen = unseen.matcher(records).match(probe)["duplicate_score"].iloc[0]
    score_unmerged = unmerged.matcher(records).match(probe)["duplicate_score"].iloc[0]
    score_after = after.matcher(records).match(probe)["duplicate_score"].iloc[0]
    assert score_unseen >= unseen.threshold_
    assert score_after < after.threshold_
    # The rejections teach more than the twins left unmerged do.
    assert score_after < score_unmerged - 0.1, (score_after, score_unmerged)


def test_a_model_fitted_on_a_small_period_stays_calibrated_against_a_ten_times_larger_reference(
    standing_orders,
) -> None:
    model, small = standing_orders
    large, _ = register(4800, seed=2, start=480)
    large = pd.concat([small, large], ignore_index=True)
    # New orders (no re-registrations): nothing may be flagged, whatever the reference's size.
    fresh, _ = register(600, seed=3, start=5280)
    fresh = fresh[fresh["record_id"].str.startswith("R")]
    rates = {}
    for reference in (small, large):
        links = model.matcher(reference).match(fresh)
        rates[len(reference)] = (links["duplicate_of"] != "").mean()
    assert rates[len(small)] <= 0.05
    assert rates[len(large)] <= rates[len(small)] + 0.01


def test_twenty_merges_are_enough_to_learn_from(standing_orders) -> None:
    records, pairs = register(480, seed=4)
    few = set(sorted(pairs, key=sorted)[:20])
    model = DuplicateModel(ORDERS_CONFIG, seed=0).fit(records, few)
    assert model.label_counts_["positive"] == 20
    quiet = records[records["customer_code"] == records["customer_code"].value_counts().index[-1]].iloc[-1]
    retyped = quiet.to_dict() | {"record_id": "N2", "customer_name": quiet["customer_name"] + "x"}
    score = model.matcher(records).match(batch_of([retyped]))["duplicate_score"].iloc[0]
    assert score >= model.threshold_


def test_a_log_without_merges_flags_nothing_and_says_so(caplog) -> None:
    records, _ = register(100)
    with caplog.at_level("WARNING"):
        model = DuplicateModel(ORDERS_CONFIG, seed=0).fit(records, set())
    assert "duplicates will not be flagged" in caplog.text
    links = model.matcher(records).match(records.iloc[:20])
    assert (links["duplicate_of"] == "").all()


def dense_day(
    first: int, *, orders: int = 400, customers: int = 20, seed: int = 5
) -> tuple[pd.DataFrame, set[str]]:
    """One busy day after `register`'s history: `customers` customers place about twenty orders each on
    it, every order another amount (1-16% apart) under its own number, and one order in ten is entered
    again an hour later (same date and amount, the old or a new number). Returns the rows in entry order
    and the ids of the re-registrations."""
    rng = np.random.default_rng(seed)
    day = pd.Timestamp("2023-01-02") + pd.Timedelta(days=first // 4 + 1)
    rows, again_ids = [], set()
    for i in range(orders):
        k = int(rng.integers(0, customers))
        usual = 100.0 + 40.0 * k
        row = {
            "record_id": f"B{i:06d}",
            "entered_at": (day + pd.Timedelta(hours=8, seconds=60 * i)).isoformat(),
            "customer_code": f"C-{10000 + 37 * k}",
            "customer_name": f"{FIRST[k % 12]} {LAST[k // 6 % 10]} {k}",
            "city": CITIES[k % 6],
            "order_number": f"SO-{700000 + i}",
            "order_date": day.date().isoformat(),
            "amount": f"{usual * (1 + rng.uniform(0.01, 0.16) * rng.choice([-1, 1])):.2f}",
        }
        rows.append(row)
        if i % 10 == 3:
            again = row | {"record_id": f"A{i:06d}"}
            again["entered_at"] = (day + pd.Timedelta(hours=9, seconds=60 * i)).isoformat()
            if rng.random() < 0.5:
                again["order_number"] = f"SO-{800000 + i}"
            rows.append(again)
            again_ids.add(again["record_id"])
    frame = pd.DataFrame(rows, dtype=object)
    return frame.sort_values("entered_at", kind="stable").reset_index(drop=True), again_ids


def test_a_batch_far_denser_than_the_history_does_not_link_a_customers_orders_of_one_day(
    standing_orders,
) -> None:
    # The history has about four orders a day; the batch puts twenty orders of one customer on one day.
    # Agreeing on the customer and the date is what re-registrations do in the history, and what every
    # second order of the day does in the batch: the date's agreement must count for less there.
    # The price: a busy customer's order entered again under a new number on such a day has only its
    # amount to tell it from her other orders, and some of those fall below the threshold.
    model, records = standing_orders
    assert model.label_counts_["denser_negative"] > 0
    day, again = dense_day(len(records), orders=100, customers=5)
    links = model.matcher(records).match(day)
    linked = links["duplicate_of"].to_numpy() != ""
    is_again = day["record_id"].isin(again).to_numpy()
    assert linked[~is_again].mean() <= 0.02
    assert linked[is_again].mean() >= 0.7
    same_number = (day["order_number"].isin(day.loc[~is_again, "order_number"])).to_numpy()
    assert linked[is_again & same_number].all()


def test_agreeing_on_a_date_counts_less_where_the_batch_crowds_it(standing_orders) -> None:
    # An order and the same order under a new number (a re-registration, or a second order of the same
    # amount): scored right after the history, and again after that day's other orders (twenty per
    # customer) have been indexed. Same pair, same model; only how common the date and the customer are
    # in the data being matched differs, and with it how rare agreeing on them is (what that is worth is
    # the classifier's learned weight: this small history teaches none of it for the date and a little
    # for the customer, so the score falls by a few thousandths).
    model, records = standing_orders
    day, _ = dense_day(len(records))
    late = pd.Timestamp(day["entered_at"].iloc[-1])
    first = day.iloc[0].to_dict() | {
        "record_id": "X1",
        "entered_at": (late + pd.Timedelta(hours=1)).isoformat(),
    }
    second = first | {"record_id": "X2", "order_number": "SO-999999"}
    second["entered_at"] = (late + pd.Timedelta(hours=2)).isoformat()

    def pair_score(matcher) -> float:
        # What `match` computes for the pair (second, first), whichever candidates the blocks offer.
        start = matcher._add(model._encode(batch_of([first, second])))
        left, right = np.array([start + 1]), np.array([start])
        features = matcher._features(left, right, rarities=matcher._counted(left))
        return float(model.probabilities(features)[0])

    sparse = pair_score(model.matcher(records))
    crowded_matcher = model.matcher(records)
    crowded_matcher.match(day)
    crowded = pair_score(crowded_matcher)
    assert sparse > crowded, (sparse, crowded)
    assert sparse >= 0.5


def test_density_does_not_depend_on_chunks_and_another_engine_can_count_it(standing_orders) -> None:
    model, records = standing_orders
    day, _ = dense_day(len(records), orders=120)
    whole = model.matcher(records).match(day)
    chunked = model.matcher(records)
    parts = pd.concat(
        [chunked.match(day.iloc[:37]), chunked.match(day.iloc[37:90]), chunked.match(day.iloc[90:])]
    )
    assert parts["duplicate_score"].tolist() == whole["duplicate_score"].tolist()
    # A check that does not remember leaves the counts as they were.
    probe = model.matcher(records)
    probe.match(day.iloc[:60])
    probe.match(day.iloc[60:], remember=False)
    again = probe.match(day.iloc[60:])
    assert again["duplicate_score"].tolist() == whole["duplicate_score"].iloc[60:].tolist()
    # ... also when the counts start from the fitted ones (no reference), and forgets the values' counts.
    empty = model.matcher(None)
    before = dict(empty._present)
    empty.match(records.iloc[:20], remember=False)
    assert empty._present == before and all(len(seen) == 0 for seen in empty._seen.values())
    empty.match(records.iloc[:20])
    assert all(empty._present[field] > before[field] for field in ("customer_name", "order_date"))
    # `score_pairs` with the counts another engine made gives the in-process scores of the same pairs.
    matcher = model.matcher(records)
    best, _ = matcher._score(day)
    linked = best[best["candidate_position"] >= 0]
    every = pd.concat([records, day], ignore_index=True).set_index("record_id")
    values = model.match_values(pd.concat([records.iloc[model._entry_order(records)], day]))
    counts, totals = [], []
    for column in values.values():
        column = pd.Series(column)
        present = column != ""
        count = column.groupby(column).cumcount() + 1
        counts.append(np.where(present, count, 0)[len(records) :])
        totals.append(np.cumsum(present.to_numpy())[len(records) :])
    rows = linked["position"].to_numpy() - len(records)
    density = (np.column_stack(counts)[rows], np.column_stack(totals)[rows])
    left = every.loc[linked.index].reset_index()
    right = every.loc[linked["candidate_id"]].reset_index()
    pairs = model.matcher(None).score_pairs(left, right, density)
    assert pairs.scores.tolist() == pytest.approx(linked["score"].tolist(), abs=1e-12)


def test_label_features_need_only_the_records_they_name(trained) -> None:
    """`fit` computes its labels' features from an index of just the labelled records: equal, pair for
    pair, to the features an index of the whole history gives, the shared values counted as the matcher
    counts them up to the later record of each pair (a made-up record: its real partner)."""
    from pipeline.linkage import Matcher

    model, records = trained
    made = records.iloc[[5]].assign(record_id="\x00made-0", amount="1.00")
    whole = Matcher(model, None)  # how fit indexed them before: the history, then the made-up records
    whole._add(model._encode(records))
    counted = whole._counted(np.arange(len(records)))
    whole._add(model._encode(made))
    left, right = np.array([25, 3, 30, 33, len(records)]), np.array([0, 2, 7, 24, 5])
    normalised = {p.field: p.normalise(records[p.field].fillna("").astype(str)) for p in model.plugins_}
    alone = model._label_features(records, [made], left, right, normalised)
    later = np.array([25, 3, 30, 33, 5])
    expected = whole._features(left, right, rarities={f: r[later] for f, r in counted.items()})
    np.testing.assert_array_equal(alone, expected)
    assert alone.shape == (5, model.n_features_)


def test_training_and_scoring_count_a_shared_value_the_same_way(trained) -> None:
    """The term-frequency feature of a pair is the rarity of the value among the records entered up to
    the later one: `fit`'s count over the history in entry order equals the matcher's over the same
    records indexed in chunks, and a value counts as rarer the fewer records held it so far."""
    from pipeline.linkage import Matcher, counted_rarity, running_rarities

    model, records = trained
    ordered = records.iloc[model._entry_order(records)].reset_index(drop=True)
    matcher = Matcher(model, None)
    chunks = []
    for begin in range(0, len(ordered), 7):
        start = matcher._add(model._encode(ordered.iloc[begin : begin + 7]))
        chunks.append(matcher._counted(np.arange(start, len(matcher))))
    for plugin in model.plugins_:
        values = plugin.normalise(ordered[plugin.field].fillna("").astype(str)).to_numpy(dtype=object)
        fitted = running_rarities(values, model.term_frequencies_[plugin.field].scale_total)
        scored = np.concatenate([chunk[plugin.field] for chunk in chunks])
        np.testing.assert_array_equal(scored, fitted)
    scale = model.term_frequencies_["order_date"].scale_total
    first, third = counted_rarity(np.array([1, 3]), np.array([scale, scale]), scale)
    assert first == pytest.approx(1.0) and third < first


def test_a_new_day_counts_as_the_records_entered_on_it_so_far(standing_orders) -> None:
    """A batch's day the fit never saw is not the rarest value: its agreement counts by how many records
    of the batch (after the reference) were entered on it so far, as a history day did when it was new."""
    model, records = standing_orders
    day, _ = dense_day(len(records), orders=60)
    assert day["order_date"].iloc[0] not in set(records["order_date"])
    matcher = model.matcher(records)
    start = matcher._add(model._encode(day))
    rarity = matcher._counted(np.arange(start, len(matcher)))["order_date"]
    assert rarity[0] == pytest.approx(1.0)
    assert np.all(np.diff(rarity) < 0)  # each further order of the day makes it less rare


def test_candidates_come_from_the_latest_records_only(monkeypatch) -> None:
    """Above `CANDIDATE_RECORDS` the look-alikes and the candidate figures come from the latest records;
    the model still learns from every known pair."""
    import pipeline.linkage as linkage

    records, pairs = history()
    monkeypatch.setattr(linkage, "CANDIDATE_RECORDS", 20)
    model = DuplicateModel(CONFIG, seed=0).fit(records, pairs)
    assert model.label_counts_["positive"] == len(SLIPS)
    assert model.label_counts_["lookalike_negative"] > 0
    assert 0.0 < model.candidates_per_record_ <= model.top_k
    assert model.candidate_recall_ >= 0.9
    scores = model.matcher(records).match(batch([dict(order(3), record_id="N1", amount="211.00")]))
    assert scores["duplicate_of"].iloc[0] == "R0003"


@pytest.mark.parametrize("clash", [False, True])
def test_the_value_code_table_finds_each_text_exactly_even_when_hashes_clash(monkeypatch, clash) -> None:
    from pipeline.linkage import _CodeTable

    if clash:  # every text the same hash: only the stored text can tell them apart
        monkeypatch.setattr(_CodeTable, "hash", lambda self, values: np.zeros(len(values), np.uint32))
    table, texts = _CodeTable(), ["b", "a"]
    table.insert(np.array(texts, dtype=object), np.array([0, 1]))
    found = table.find(np.array(["a", "c", "b"], dtype=object), texts)
    assert found.tolist() == [1, -1, 0]
    texts.append("c")
    table.insert(np.array(["c"], dtype=object), np.array([2]))
    assert table.find(np.array(["c", "a"], dtype=object), texts).tolist() == [2, 1]
    table.truncate(1)
    del texts[1:]
    assert table.find(np.array(["a", "b", "c"], dtype=object), texts).tolist() == [-1, 0, -1]
    assert len(table) == 1
    # Hashed once by the caller for `find` and then `insert` (as `Matcher._add` does): the same table.
    again, values = _CodeTable(), np.array(["b", "a", "c"], dtype=object)
    hashes = again.hash(values)
    assert again.find(values, [], hashes).tolist() == [-1, -1, -1]
    again.insert(values[:1], np.array([0]), hashes[:1])
    assert again.find(values, ["b"], hashes).tolist() == [0, -1, -1]
    again.insert(values[1:], np.array([1, 2]), hashes[1:])
    plain = _CodeTable()
    plain.insert(values, np.array([0, 1, 2]))
    assert again == plain and again.find(values, ["b", "a", "c"]).tolist() == [0, 1, 2]


def test_the_value_code_table_looks_up_clashes_only_for_their_hashes(monkeypatch) -> None:
    """Texts sharing a hash with a stored one (a clash) are found by their text; others with a hash no
    clash has are not looked up and not found."""
    from pipeline.linkage import _CodeTable

    by_first_letter = lambda self, values: np.array([ord(v[0]) for v in values], dtype=np.uint32)  # noqa: E731
    monkeypatch.setattr(_CodeTable, "hash", by_first_letter)
    table, texts = _CodeTable(), ["ab", "ac", "zz"]
    table.insert(np.array(texts, dtype=object), np.array([0, 1, 2]))
    assert table.clashes == {"ac": 1}
    found = table.find(np.array(["ac", "zz", "ad", "q", "ab"], dtype=object), texts)
    assert found.tolist() == [1, 2, -1, -1, 0]


def test_running_counts_give_each_value_its_count_so_far_and_the_counts_after() -> None:
    from pipeline.linkage import _running_counts

    rng = np.random.default_rng(5)
    for size, distinct in ((0, 1), (1, 1), (500, 7), (2000, 1500)):
        codes = rng.integers(0, distinct, size)
        seen = rng.integers(0, 4, distinct).astype(np.uint8)
        count, total, (held, after) = _running_counts(codes, seen, 10)
        running, expected = seen.astype(np.int64), []
        for code in codes.tolist():
            running[code] += 1
            expected.append(running[code])
        assert count.tolist() == expected and total.tolist() == list(range(11, 11 + size))
        assert sorted(held.tolist()) == sorted(set(codes.tolist())) and (running[held] == after).all()


@pytest.mark.parametrize("spill", [None, 1, 20])
def test_the_text_list_gives_back_each_text_as_stored_and_truncates(monkeypatch, spill) -> None:
    from pipeline.linkage import _TextList

    if spill is not None:  # older texts in the temporary file: all of them (1 byte) or some (20)
        monkeypatch.setattr(_TextList, "SPILL_BYTES", spill)
        monkeypatch.setattr(_TextList, "GAP", 3)
        monkeypatch.setattr(_TextList, "READ_BYTES", 16)
    texts = _TextList()
    stored = ["SO-2023-000001", "", "Ünïcode ß", "\udcff lone surrogate", "x"]
    texts.extend(stored[:2])
    texts.extend(stored[2:])
    assert [texts[i] for i in range(len(texts))] == stored
    assert texts[-1] == "x"
    assert texts.take([4, 0, 2, 0, 3, 1]) == [stored[i] for i in (4, 0, 2, 0, 3, 1)]
    copied = pickle.loads(pickle.dumps(texts))
    assert copied == texts and copied.take([3, 0]) == [stored[3], stored[0]]
    texts.truncate(3)
    assert len(texts) == 3 and texts[2] == "Ünïcode ß"
    with pytest.raises(IndexError):
        texts[3]
    texts.extend(["y"])
    assert [texts[i] for i in range(len(texts))] == [*stored[:3], "y"]
    assert texts.take([3, 0]) == ["y", stored[0]]
    texts.truncate(0)
    assert len(texts) == 0 and len(texts._buffer) == 0


def test_value_codes_widen_from_8_to_16_to_32_bits_as_a_field_gains_values(trained) -> None:
    """Per-record codes take as few bytes as the field's codes need so far; widening keeps every code, so
    the records indexed before still read back their own values and match the same."""
    model, records = trained
    matcher = model.matcher(records)
    assert matcher._codes["amount"].dtype == np.int8
    amounts = [f"{1000 + n}.00" for n in range(40_000)]
    rows = pd.DataFrame(
        [dict(order(n % 24), record_id=f"N{n:05d}", amount=amount) for n, amount in enumerate(amounts)],
        columns=COLUMNS,
        dtype=object,
    )
    first = len(matcher)
    matcher.match(rows.iloc[:100])
    assert matcher._codes["amount"].dtype == np.int8  # the history's 34 and 100 new amounts fit in 8 bits
    matcher.match(rows.iloc[100:1000])
    assert matcher._codes["amount"].dtype == np.int16
    matcher.match(rows.iloc[1000:])
    assert matcher._codes["amount"].dtype == np.int32 and matcher._codes["city"].dtype == np.int8
    assert len(matcher._code_array("amount")) == len(matcher)
    assert matcher._code_array("amount").dtype == np.int32  # (a view: not kept, the array grows)
    for row in (0, 99, 100, 999, 1000, len(rows) - 1):
        assert matcher.record(f"N{row:05d}")["amount"] == amounts[row]
        assert float(matcher._normalised_many("amount", np.array([first + row]))[0]) == float(amounts[row])
    assert matcher._normalised_many("city", np.array([first + 5]))[0] == order(5)["city"].lower()
    copy = rows.iloc[[30_000]].assign(record_id="M1")  # a re-registration of a record coded in 32 bits
    assert matcher.match(copy)["duplicate_of"].tolist() == ["N30000"]


def test_records_gives_each_ids_raw_values_as_record_does(trained) -> None:
    model, records = trained
    indexed = records.iloc[: len(records) // 2]
    matcher = model.matcher(indexed)
    first, last = indexed["record_id"].iloc[5], indexed["record_id"].iloc[-1]
    asked = [first, "not indexed", last, first]
    values = matcher.records(asked)
    assert set(values) == set(model.config.fields)
    for row, record_id in enumerate(asked):
        expected = matcher.record(record_id) or dict.fromkeys(model.config.fields, "")
        assert {field: values[field][row] for field in values} == expected
    assert values["customer_name"][0] == records["customer_name"].iloc[5] != ""
    assert all(len(column) == 0 for column in matcher.records([]).values())


def test_a_matcher_reads_raw_values_and_parsed_values_back_and_its_temporary_file_goes_with_it(
    trained,
) -> None:
    import gc
    import os
    import pickle

    model, records = trained
    matcher = model.matcher(records)
    last = len(records) - 1
    assert matcher.record(records["record_id"][last]) == {f: records[f][last] for f in CONFIG.fields}
    plugin = next(plugin for plugin in model.plugins_ if plugin.field == "amount")
    position = len(records) - 1  # the latest entered (the index is in entry order)
    row = records.index[records["record_id"] == matcher._ids[position]][0]
    expected = plugin.parse(plugin.normalise(pd.Series([records["amount"][row]]))[0])
    matcher.match(batch([dict(order(3), record_id="N1")]))  # now the reference's values are parsed again
    assert expected is not None and matcher._parsed_value("amount", position) == expected
    copy = pickle.loads(pickle.dumps(matcher.export_state()))  # as the reference cache stores it
    restored = type(matcher).from_state(model, copy)
    assert restored.record(records["record_id"][0]) == matcher.record(records["record_id"][0])
    descriptors = [matcher._raw._buffer._file.fileno(), restored._raw._buffer._file.fileno()]
    assert len(set(descriptors)) == 2 and all(os.fstat(fd).st_nlink == 0 for fd in descriptors)
    del matcher, restored, copy
    gc.collect()
    for fd in descriptors:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_the_best_candidate_per_record_is_the_highest_score_then_the_latest_as_a_full_sort_gives() -> None:
    from pipeline.linkage import _best_per_query

    def by_sort(query: np.ndarray, found: np.ndarray, scores: np.ndarray) -> np.ndarray:
        order = np.lexsort((-found, -scores, query))
        first = np.ones(len(order), dtype=bool)
        first[1:] = query[order][1:] != query[order][:-1]
        return order[first]

    # Record 7: two candidates tie on the best score (the later, 5, wins); record 9: one candidate.
    query = np.array([7, 7, 7, 8, 8, 9])
    found = np.array([2, 5, 3, 1, 4, 0])
    scores = np.array([0.9, 0.9, 0.3, 0.2, 0.6, 0.1])
    assert _best_per_query(query, found, scores).tolist() == [1, 4, 5]
    rng = np.random.default_rng(0)
    for _ in range(50):
        query = np.sort(rng.integers(0, 30, 200))
        found = np.concatenate([rng.permutation(500)[:count] for count in np.bincount(query)])
        scores = rng.choice([0.1, 0.5, 0.9], len(query))  # many ties
        assert np.array_equal(_best_per_query(query, found, scores), by_sort(query, found, scores))
    # Not grouped by record, or a NaN score: the full sort itself.
    query, found, scores = np.array([8, 7, 8]), np.array([1, 2, 3]), np.array([0.5, 0.4, np.nan])
    assert np.array_equal(_best_per_query(query, found, scores), by_sort(query, found, scores))


def test_candidate_keys_sum_and_sort_as_lexsort_does_and_first_seen_numbers_missing_values_too() -> None:
    from pipeline.linkage import _first_seen, _lexsort_ranked, _shared_keys

    rng = np.random.default_rng(1)
    pairs = np.unique(rng.integers(0, 40, (300, 3)), axis=0)  # distinct (query, other, rule)
    # As the blocks give them: rule after rule, each (query, other) once per rule, in any order within.
    by_rule = pairs[np.lexsort((rng.random(len(pairs)), pairs[:, 2]))]
    weight = 1.0 / rng.integers(1, 9, len(by_rule))
    expected: dict[tuple[int, int], list[float]] = {}
    for (q, o, r), w in zip(by_rule.tolist(), weight.tolist(), strict=True):
        rule_and_sum = expected.setdefault((q, o), [r, 0.0])
        rule_and_sum[1] += w  # Python's float addition, in rule order
    query, other, rule, shared = _shared_keys(*by_rule.T, weight, 40)
    found = zip(query.tolist(), other.tolist(), rule.tolist(), shared.tolist(), strict=True)
    got = {(q, o): [r, w] for q, o, r, w in found}
    assert got == expected and len(query) == len(expected)
    query, other = np.unique(pairs[:, :2], axis=0)[rng.permutation(len(np.unique(pairs[:, :2], axis=0)))].T
    second = rng.choice([-0.5, -0.25, 0.0, 1.0, 2.0], len(query))  # many ties, told apart by `third`
    third = np.where(rng.random(len(query)) < 0.5, -other, other)
    expected = np.lexsort((third, second, query))
    assert np.array_equal(_lexsort_ranked(query, second, third, 40), expected)
    query, second, third = np.array([2, 2, 1]), np.array([0.5, 0.5, 0.1]), np.array([-3, -3, 0])  # a tie
    assert _lexsort_ranked(query, second, third, 4).tolist() == [2, 0, 1]
    inverse, first = _first_seen(["b", "a", "b", ""])
    assert (inverse.tolist(), first.tolist()) == ([0, 1, 0, 2], [0, 1, 3])
    inverse, first = _first_seen(np.array(["b", None, "b", None], dtype=object))
    assert (inverse.tolist(), first.tolist()) == ([0, 1, 0, 1], [0, 1])


def test_matching_pauses_the_cyclic_collector_and_leaves_it_as_it_was(trained, monkeypatch) -> None:
    import gc

    from pipeline.linkage import Matcher

    model, records = trained
    matcher = model.matcher(records)
    during = []
    real = Matcher._match
    monkeypatch.setattr(
        Matcher, "_match", lambda self, chunk: during.append(gc.isenabled()) or real(self, chunk)
    )
    assert gc.isenabled()
    links = matcher.match(batch([dict(order(3), record_id="N1")]))
    assert links["duplicate_of"].tolist()[0] != ""  # matched as usual: a repeat of a reference record
    assert during == [False] and gc.isenabled()
    gc.disable()
    try:
        matcher.match(batch([dict(order(4), record_id="N2")]))
        assert not gc.isenabled()  # a caller that had it paused keeps it paused
    finally:
        gc.enable()
    monkeypatch.setattr(Matcher, "_match", lambda self, chunk: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        matcher.match(batch([dict(order(5), record_id="N3")]))
    assert gc.isenabled()


def test_block_sizes_past_one_byte_weigh_candidates_exactly_and_roll_back() -> None:
    from pipeline.linkage import _BlockIndex

    index, start, sizes = _BlockIndex(), 0, {}
    # "busy" passes the one-byte size (255) within a chunk and across chunks; "x<i>" are blocks of one.
    parts = (["busy"] * 200 + [f"x{i}" for i in range(50)], ["busy"] * 100 + ["", "once"], ["busy"] * 300)
    for part in parts:
        query, other, weight = index.add(part, start, window=3, collect=True)
        expected = []
        for key in part:
            if key:
                before = sizes.get(key, 0)
                expected += [1.0 / before] * min(before, 3) if before else []
                sizes[key] = before + 1
        assert sorted(weight.tolist()) == sorted(expected)
        assert index.sizes(np.arange(len(index.blocks))).sum() == sum(sizes.values())
        start += len(part)
    assert index.blocks.column("count").dtype == np.uint8 and index.big.column("count").tolist() == [600]
    before = {**index.blocks.in_key_order(), "big": index.big.keys.copy()}
    index.add(["busy"] * 10 + ["new"], start, window=3, collect=False)
    assert index.big.column("count").tolist() == [610] and len(index.blocks) == len(before["keys"]) + 1
    index.rollback(start)
    after = {**index.blocks.in_key_order(), "big": index.big.keys.copy()}
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert index.big.column("count").tolist() == [600] and len(index.prev) == start
    # A rollback that takes a block back below one byte's reach drops it from the side table.
    small = _BlockIndex()
    small.add(["k"] * 250, 0, window=3, collect=False)
    small.add(["k"] * 10, 250, window=3, collect=False)
    assert small.big.column("count").tolist() == [260]
    small.rollback(250)
    assert len(small.big) == 0 and small.sizes(np.array([0])).tolist() == [250]


@pytest.mark.parametrize("window", [1, 3, 30])
def test_block_windows_and_leavers_are_a_list_per_blocks_latest_records(monkeypatch, window) -> None:
    """`_BlockIndex.add` gives each record the `window` latest records of its block before it, nearest
    first and step by step (every record's nearest, then every second nearest, ...), weighed by 1 / the
    block's size, and names the records its part pushed out of their block's window: those of a list
    kept per block. The chain column is in its file, read four windows of 1,024 records deep; a few busy
    blocks, many of one or two records whose previous record is windows back, keys left empty."""
    from pipeline.duplicates.storage import ColumnFile
    from pipeline.linkage import _BlockIndex

    monkeypatch.setattr(ColumnFile, "MEMORY_BYTES", 0)
    monkeypatch.setattr(ColumnFile, "WINDOW_BYTES", 4096)
    rng = np.random.default_rng(5)
    keys = np.where(rng.random(5000) < 0.3, rng.choice(["a", "b", "c"], 5000), rng.integers(0, 1500, 5000))
    keys = np.where(rng.random(5000) < 0.05, "", keys.astype(str))
    index, blocks, start = _BlockIndex(), {}, 0
    index.track_leavers = True
    for size in (700, 1, 1299, 3000):
        part = keys[start : start + size].tolist()
        query, other, weight = index.add(part, start, window=window, collect=True)
        expected, before = [], {key: records[-window:] for key, records in blocks.items()}
        for position, key in enumerate(part, start):
            if key:
                records = blocks.setdefault(key, [])
                expected += [(k, position, o, 1 / len(records)) for k, o in enumerate(records[::-1][:window])]
                records.append(position)
        steps = [k for k, *_ in sorted(expected, key=lambda item: item[1:3])]
        got = sorted(zip(query.tolist(), other.tolist(), weight.tolist(), strict=True))
        assert got == sorted(item[1:] for item in expected)
        order = np.lexsort((other, query))  # each entry's step, in the order `add` gave them
        assert np.all(np.diff(np.array(steps)[np.argsort(order)]) >= 0)
        kept = {position for records in blocks.values() for position in records[-window:]}
        new = {start + i for i, key in enumerate(part) if key}
        pushed = {position for records in before.values() for position in records} | new
        assert sorted(index.leavers.tolist()) == sorted(pushed - kept)
        start += size
    assert index.prev._map is not None and len(index.prev) == 5000


def test_links_and_reasons_read_back_the_same_from_the_index_files(trained, monkeypatch) -> None:
    """A matcher whose ids, value texts and entry times are all in its temporary files (spilled at every
    byte) gives the links, clusters and reasons of one that holds them in memory; each reason is the one
    its pair's values give, read one at a time (the links' values are read for a whole chunk at once)."""
    import math

    from pipeline.duplicates.storage import FloatFile
    from pipeline.linkage import _TextList

    model, records = trained
    first = order(50) | {"record_id": "A", "amount": "4321.00", "entered_at": "2025-01-01T09:00:00"}
    rows = [
        order(6)
        | {"record_id": "N1", "entered_at": "2024-07-20T10:00:00", "customer_name": "Autobedrjf Mulder"},
        order(40) | {"record_id": "N2", "amount": "9999.00", "order_date": "2024-12-01"},
        first,
        first | {"record_id": "B", "customer_name": first["customer_name"] + "x", "city": ""},
        order(3) | {"record_id": "N3", "entered_at": "2024-04-23T10:00:00"},
    ]
    chunks = [batch(rows[:3]), batch(rows[3:])]
    in_memory = model.matcher(records)
    expected = [in_memory.match(chunk) for chunk in chunks]
    monkeypatch.setattr(_TextList, "SPILL_BYTES", 1)
    monkeypatch.setattr(FloatFile, "SPILL_ITEMS", 1)
    spilled = model.matcher(records)
    got = [spilled.match(chunk) for chunk in chunks]
    assert spilled._ids._buffer.spilled == len(spilled._ids._buffer) > 0 and not spilled._ids._buffer.tail
    assert spilled._times.spilled == len(spilled._times) == len(records) + len(rows)
    assert all(spilled._texts[field]._buffer.spilled > 0 for field in spilled._fields)
    for mine, theirs in zip(got, expected, strict=True):
        pd.testing.assert_frame_equal(mine, theirs)
    links = pd.concat(got)
    assert links["duplicate_of"].tolist() == ["R0006", "", "", "A", "R0003"]
    assert links["cluster_id"].tolist() == ["R0006", "N2", "A", "A", "R0003"]
    for matcher in (in_memory, spilled):
        for record_id, other_id in [("N1", "R0006"), ("B", "A"), ("N3", "R0003")]:
            position, other = matcher._positions([record_id, other_id]).tolist()
            days = matcher._times[position] - matcher._times[other]
            one_by_one = model.reason(
                {
                    field: matcher._normalised_many(field, np.array([position]))[0]
                    for field in matcher._fields
                },
                {field: matcher._normalised_many(field, np.array([other]))[0] for field in matcher._fields},
                matcher._ids[other],
                None if math.isnan(days) else days,
            )
            assert (
                matcher.reason(position, other)
                == one_by_one
                == links.set_index(pd.Index([row["record_id"] for row in rows])).loc[record_id, "reason"]
                != ""
            )


def _parts_and_window(trained) -> tuple[DuplicateModel, list[pd.DataFrame]]:
    """The model with a window of 2 (records leave the index often) and every text distance deferred, and
    a batch in 5-row parts with re-registrations across part borders."""
    model, _ = trained
    narrow = copy.copy(model)
    narrow.window = 2
    rows = []
    for n in range(30):
        rows.append(
            order(n) | {"record_id": f"B{n:03d}", "entered_at": f"2025-01-{1 + n // 10:02d}T09:00:00"}
        )
        if n % 4 == 1:  # a re-registration of an order a few rows back, often in the part before
            again = order(n - 1) | {
                "record_id": f"S{n:03d}",
                "entered_at": f"2025-01-{1 + n // 10:02d}T15:00",
            }
            rows.append(again | {"customer_name": again["customer_name"] + "x"})
    frame = batch(rows)
    return narrow, [frame.iloc[i : i + 5] for i in range(0, len(frame), 5)]


def test_parts_scored_by_the_pair_helper_link_as_match_does(trained) -> None:
    """`MatchAhead` with a `PairHelper` process (parts indexed two ahead of the one it scores, records
    leaving the windows between): each part's links, scores, clusters and reasons are those of `match`
    on one part after the other, and the index holds the same records afterwards."""
    from pipeline.linkage import MatchAhead, PairHelper

    model, records = trained
    narrow, parts = _parts_and_window(trained)
    one = narrow.matcher(records, evict=True)
    expected = [one.match(part) for part in parts]
    assert sum((links["duplicate_of"] != "").sum() for links in expected) >= 5
    if not PairHelper.available():
        pytest.skip("the pair helper is forked (Linux)")
    two = narrow.matcher(records, evict=True)
    with PairHelper(narrow) as helper:
        ahead = MatchAhead(two, helper)
        got = []
        for part in parts:
            linked = ahead.put(part)
            assert len(linked) == (part is not parts[0] and part is not parts[1])  # two parts behind
            got += linked
        got += ahead.finish()
        ahead.close()
    assert len(got) == len(parts)
    for mine, theirs in zip(got, expected, strict=True):
        pd.testing.assert_frame_equal(mine, theirs)
    assert two.resident == one.resident < len(two)  # evicted alike: the same records, by window counts
    assert np.array_equal(two._live.view(), one._live.view())


def test_parts_linked_without_a_helper_link_as_match_does(trained) -> None:
    from pipeline.linkage import MatchAhead

    model, records = trained
    narrow, parts = _parts_and_window(trained)
    one, two = narrow.matcher(records, evict=True), narrow.matcher(records, evict=True)
    ahead = MatchAhead(two)
    for part in parts:
        [linked] = ahead.put(part)
        pd.testing.assert_frame_equal(linked, one.match(part))
    assert ahead.finish() == []


@pytest.mark.parametrize("failure", ["raises", "killed"])
def test_a_failing_pair_helper_raises_a_clear_error_rather_than_hanging(
    trained, monkeypatch, failure
) -> None:
    """A helper whose scoring raises sends the error back; one killed mid-batch is noticed by its exit.
    Either way the next part due raises `PairHelperError` (an alarm fails the test if it hangs)."""
    import os
    import signal

    from pipeline.linkage import MatchAhead, PairHelper, PairHelperError, PairScorer

    if not PairHelper.available():
        pytest.skip("the pair helper is forked (Linux)")
    model, records = trained
    narrow, parts = _parts_and_window(trained)

    def broken(self, inputs):
        raise ValueError("comparator on fire")

    if failure == "raises":  # failure injection: the forked helper inherits the broken scorer
        monkeypatch.setattr(PairScorer, "scores", broken)
    helper = PairHelper(narrow)
    if failure == "killed":
        os.kill(helper.pid, signal.SIGKILL)
    ahead = MatchAhead(narrow.matcher(records, evict=True), helper)

    def hung(*_):
        raise AssertionError("the pair helper's failure was not noticed")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(PairHelperError) as raised:
            for part in parts:
                ahead.put(part)
            ahead.finish()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        helper.close()
    message = str(raised.value)
    if failure == "raises":
        assert message == "the duplicate pair helper failed: ValueError: comparator on fire"
    else:
        assert f"(pid {helper.pid}) exited with code -9" in message
    assert not helper._process.is_alive()


def test_a_pair_helper_whose_parent_is_killed_exits(trained) -> None:
    """A job killed outright (SIGKILL: no clean-up) leaves no pair helper behind: an idle helper notices
    its parent is gone within `PAIR_HELPER_POLL_SECONDS` and exits."""
    import multiprocessing
    import os
    import signal
    import time

    from pipeline.linkage import PAIR_HELPER_POLL_SECONDS, PairHelper

    if not PairHelper.available():
        pytest.skip("the pair helper is forked (Linux)")
    model, _ = trained
    context = multiprocessing.get_context("fork")
    pids = context.SimpleQueue()

    def job() -> None:  # the killed job: starts its helper, then waits to be killed
        pids.put(PairHelper(model).pid)
        time.sleep(60)

    parent = context.Process(target=job)
    parent.start()
    helper = pids.get()
    os.kill(parent.pid, signal.SIGKILL)
    parent.join()

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")

    deadline = time.monotonic() + 10 * PAIR_HELPER_POLL_SECONDS + 5
    while running(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(helper)


def test_clusters_follow_chains_within_and_across_calls_and_truncate() -> None:
    from pipeline.linkage import _Clusters

    clusters = _Clusters()
    # Records 10 and 11 join 3; 12 joins 11 (linked just before it): all three in 3's cluster.
    assert clusters.join(np.array([10, 11, 12]), np.array([3, 3, 11])).tolist() == [3, 3, 3]
    # Later: 20 joins 12 (a member), 21 joins 7 (no cluster yet).
    assert clusters.join(np.array([20, 21]), np.array([12, 7])).tolist() == [3, 7]
    clusters.truncate(20)
    assert clusters.join(np.array([20]), np.array([5])).tolist() == [5]
    clusters.drop(np.array([11, 12]))
    assert clusters.members.tolist() == [10, 20] and clusters.roots.tolist() == [3, 5]
    assert clusters.join(np.array([30]), np.array([12])).tolist() == [12]  # 12 dropped: its own root


def test_the_value_counts_live_in_files_count_every_value_widen_and_roll_back(trained, monkeypatch) -> None:
    """`Matcher._seen`: a `ColumnFile` per field (here in a file from 64 bytes on), holding for each value
    code the records that hold it; widened past 255 (a city of 300 orders), taken back by a check that
    does not remember, and pickled with the index."""
    import pickle

    from pipeline.duplicates.storage import ColumnFile

    monkeypatch.setattr(ColumnFile, "MEMORY_BYTES", 64)
    model, records = trained
    matcher = model.matcher(records)

    def counted() -> dict[str, list[int]]:
        return {field: matcher._seen[field].view().tolist() for field in matcher._fields}

    def recounted() -> dict[str, list[int]]:  # each value's records, from the codes indexed
        return {
            field: np.bincount(
                codes[codes >= 0].astype(np.int64), minlength=len(matcher._texts[field])
            ).tolist()
            for field, codes in ((field, matcher._code_array(field)) for field in matcher._fields)
        }

    matcher.match(batch([dict(order(n), record_id=f"N{n}") for n in range(100, 1300)]))
    assert counted() == recounted()
    assert matcher._seen["city"].dtype == np.uint16 and max(counted()["city"]) > 255
    assert matcher._seen["amount"]._map is not None  # 1,200 new amounts: in the file
    before = counted()
    matcher.match(batch([dict(order(n), record_id=f"M{n}") for n in range(2000, 2300)]), remember=False)
    assert counted() == before == recounted()
    restored = type(matcher).from_state(model, pickle.loads(pickle.dumps(matcher.export_state())))
    assert restored._seen == matcher._seen

"""The error model end to end on generated data, its metrics, thresholds, reasons and persistence."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import detectors as d
from pipeline import schema as s
from pipeline import suggest as sg
from pipeline.config import Config, load_config
from pipeline.corrections import cell_labels, load_log, replay_backwards
from pipeline.detectors import split_running_number
from pipeline.errors import (
    FORMAT_VERSION,
    ErrorModel,
    cell_metrics,
    distinct_rows,
    floor_counts,
    pooled_field_ids,
    rule_floors,
)
from pipeline.exceptions import ModelLoadError
from pipeline.generate import generate
from pipeline.ingest import read_table


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    paths = generate(tmp_path_factory.mktemp("demo"), customers=80, history=1500, batch=300, seed=3)
    config = load_config(paths.config)
    stored = read_table(paths.records)
    log = load_log(paths.corrections)
    entered, _ = replay_backwards(stored, log, id_column=config.id_column)
    labels = cell_labels(log, stored[config.id_column])
    cut = int(len(stored) * 0.8)
    model = ErrorModel(config, folds=3).fit(entered.iloc[:cut], labels, stored.iloc[:cut])
    calibration = model.calibrate(entered.iloc[cut:], labels)
    return {
        "config": config,
        "model": model,
        "calibration": calibration,
        "stored": stored,
        "batch": read_table(paths.batch),
        "truth": read_table(paths.batch_truth),
        "paths": paths,
    }


def test_calibrate_returns_metrics_and_sets_thresholds(demo: dict) -> None:
    metrics = demo["calibration"]
    assert 0 < metrics["threshold"] < 1
    assert metrics["detection_f1"] > 0.6
    assert demo["model"].threshold_ == metrics["threshold"]


def test_detects_and_corrects_the_held_out_batch(demo: dict) -> None:
    model, batch = demo["model"], demo["batch"]
    scores = model.cell_scores(batch)
    assert list(scores.columns) == demo["config"].check_fields
    assert scores.index.equals(batch.index)
    assert ((scores >= 0) & (scores <= 1)).all().all()
    flags = model.detect(batch)
    assert list(flags.columns[:6]) == ["row", "field", "value", "score", "suggestion", "reason"]
    assert (flags["reason"].str.len() > 0).all()
    metrics = cell_metrics(flags, demo["truth"], ids=batch["record_id"])
    assert metrics["detection_f1"] > 0.6
    assert metrics["correction_f1"] > 0.5


def _lenient(model: ErrorModel) -> ErrorModel:
    """The model with a low flag threshold: these tests are about suggestions, not about the threshold."""
    lenient = copy.copy(model)
    lenient.threshold_ = 0.2
    return lenient


def _history_row(demo: dict) -> dict:
    stored = demo["stored"]
    counts = stored["customer_code"].value_counts()
    return stored[stored["customer_code"] == counts.index[0]].iloc[-1].to_dict()


def test_suggests_decimal_slip_digit_swap_and_missing_code(demo: dict) -> None:
    row = _history_row(demo)
    amount = float(row["amount"])
    postcode = row["postcode"]
    swapped = (
        postcode[1] + postcode[0] + postcode[2:]
        if postcode[0] != postcode[1]
        else postcode[:2] + postcode[3] + postcode[2] + postcode[4:]
    )
    chunk = pd.DataFrame(
        [
            {**row, "amount": f"{amount * 100:.2f}"},
            {**row, "postcode": swapped},
            {**row, "customer_code": ""},
        ],
        dtype=object,
    )
    flags = _lenient(demo["model"]).detect(chunk).set_index(["row", "field"])
    assert flags.loc[(0, "amount"), "suggestion"] == row["amount"]
    assert "usual amount" in flags.loc[(0, "amount"), "reason"]
    assert flags.loc[(1, "postcode"), "suggestion"] == postcode
    assert flags.loc[(2, "customer_code"), "suggestion"] == row["customer_code"]
    assert flags.loc[(2, "customer_code"), "reason"].startswith("customer code missing;")


def test_missing_code_filled_from_matched_record(demo: dict) -> None:
    row = {**_history_row(demo), "customer_code": "", "customer_name": "Geheel Nieuwe Klant B.V."}
    row.update(street="Nergensweg 1", postcode="9999 ZZ", email="info@nieuweklant.nl", phone="099-0000000")
    chunk = pd.DataFrame([row], dtype=object)
    matched = pd.DataFrame([{name: "" for name in demo["config"].fields}], dtype=object)
    matched.loc[0, "customer_code"] = "C-99999"
    flags = _lenient(demo["model"]).detect(chunk, matched).set_index("field")
    assert flags.loc["customer_code", "suggestion"] == "C-99999"
    assert "duplicates" in flags.loc["customer_code", "reason"]


def test_value_equal_to_matched_record_is_not_flagged(demo: dict) -> None:
    row = _history_row(demo)
    chunk = pd.DataFrame([{**row, "order_date": "2020-01-01"}], dtype=object)
    model = _lenient(demo["model"])
    model.threshold_ = 0.1
    assert "order_date" in set(model.detect(chunk)["field"])
    matched = pd.DataFrame([{name: chunk.loc[0, name] for name in demo["config"].fields}], dtype=object)
    assert "order_date" not in set(model.detect(chunk, matched)["field"])


def test_re_registration_number_is_not_judged_at_its_own_place(demo: dict) -> None:
    """A re-registration is entered after its original: its number belongs to the original's place in the
    sequence, so the number due at its own place is no candidate for it, and its original's number is."""
    model = demo["model"]
    row = _history_row(demo)
    original = demo["stored"].iloc[-300].to_dict()["order_number"]
    prefix, number, width = split_running_number(original)
    slipped = f"{prefix}{number + 50:0{width}d}"
    due = f"{prefix}{number + 300:0{width}d}"  # the number expected at the row's own place
    expected = {"order_number": np.array([number + 300.0])}
    extras = {"expected": expected, "year": np.array([2024.0]), "times": None}
    record = {**row, "order_number": slipped}

    def candidates(matched: str) -> dict:
        cell = ErrorModel._cell("order_number", record, 0, extras, matched)
        return sg.generate_candidates(cell, model.profile_, model.patterns_, model.choices_)

    assert "sequence" in candidates("")[due]
    assert due not in candidates(original)
    assert "matched" in candidates(original)[original]


def test_save_load_round_trip(demo: dict, tmp_path: Path) -> None:
    model, batch = demo["model"], demo["batch"].head(50)
    model.save(tmp_path / "m")
    loaded = ErrorModel.load(tmp_path / "m")
    pd.testing.assert_frame_equal(loaded.cell_scores(batch), model.cell_scores(batch))
    assert loaded.threshold_ == model.threshold_


def test_load_failures_are_one_line_model_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        ErrorModel.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no ErrorModel"):
        ErrorModel.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "error_model.json").write_text(f'{{"class": "ErrorModel", "format": {FORMAT_VERSION}}}')
    (broken / "error_model.joblib").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError) as info:
        ErrorModel.load(broken)
    assert "\n" not in str(info.value)


def test_a_log_without_edits_gives_an_unlabelled_model(demo: dict, tmp_path: Path) -> None:
    config, stored = demo["config"], demo["stored"]
    empty = pd.DataFrame(columns=[s.LOG_RECORD_ID, s.LOG_FIELD, s.LOG_OLD_VALUE, s.LOG_NEW_VALUE])
    model = ErrorModel(config, folds=3).fit(stored, empty, stored)
    assert model.labelled_ is False
    assert model.unsupervised_fields_ == config.check_fields
    row = _history_row(demo)
    iban = next((n for n, fp in model.profile_.fields.items() if "IBAN" in fp.schemes), None)
    rows = [row, {**row, "customer_name": "Iemand Anders B.V."}]
    if iban is not None:
        rows.append({**row, iban: row[iban][:-1] + ("0" if row[iban][-1] != "0" else "1")})
    chunk = pd.DataFrame(rows, dtype=object)
    scores, flags = model.assess(chunk)
    assert (scores.loc[0] == 0).all()  # a record the history agrees with is not flagged
    assert "customer_name" in set(flags.loc[flags["row"] == 1, "field"])  # its customer code says otherwise
    if iban is not None:
        assert scores.loc[2, iban] == pytest.approx(0.9)
    metrics = model.calibrate(stored.tail(50), empty)
    assert metrics["detection_f1"] == 0 and metrics["threshold"] == 0.5
    model.save(tmp_path / "m")
    loaded = ErrorModel.load(tmp_path / "m")
    assert loaded.labelled_ is False
    pd.testing.assert_frame_equal(loaded.cell_scores(chunk), scores)


def test_fit_chooses_thresholds_out_of_fold_and_calibrate_overrides(demo: dict) -> None:
    model = demo["model"]
    assert 0 < model.threshold_ < 1 and 0 < model.suggest_threshold_ < 1
    config, stored = demo["config"], demo["stored"]
    log = load_log(demo["paths"].corrections)
    entered, _ = replay_backwards(stored, log, id_column=config.id_column)
    labels = cell_labels(log, stored[config.id_column])
    fitted = ErrorModel(config, folds=3).fit(entered.iloc[:1200], labels, stored.iloc[:1200])
    chosen = (fitted.threshold_, fitted.suggest_threshold_)
    assert chosen != (0.5, 0.5)
    flags = fitted.detect(demo["batch"])
    metrics = cell_metrics(flags, demo["truth"], ids=demo["batch"]["record_id"])
    assert metrics["detection_f1"] > 0.6 and metrics["correction_f1"] > 0.5  # usable without calibrate
    fixed = ErrorModel(config, folds=3, threshold=0.3, suggest_threshold=0.7)
    fixed.fit(entered.iloc[:1200], labels, stored.iloc[:1200])
    assert (fixed.threshold_, fixed.suggest_threshold_) == (0.3, 0.7)


def test_field_ids_are_pooled_below_min_field_errors() -> None:
    labels = pd.DataFrame({s.LOG_FIELD: ["a"] * 20 + ["b"] * 19 + ["c"]})
    assert pooled_field_ids(["a", "b", "c", "d"], labels, 20) == {"a": 1, "b": 0, "c": 0, "d": 0}
    assert pooled_field_ids(["a", "b", "c", "d"], labels, 1) == {"a": 1, "b": 2, "c": 3, "d": 0}


def test_few_labels_carry_over_to_fields_without_corrections() -> None:
    """Ten records, typos corrected in one field only: a typo in another field is flagged all the same,
    and a city the record's customer contradicts is flagged with the customer's city as suggestion."""
    config = Config.model_validate(
        {
            "name": "t",
            "fields": {
                "customer": {"type": "code"},
                "name": {"type": "text"},
                "city": {"type": "category"},
                "street": {"type": "text"},
            },
        }
    )
    people = [("K1", "bakker", "utrecht", "kerkstraat"), ("K2", "jansen", "delft", "dorpsweg")]
    people += [("K3", "de vries", "gouda", "markt"), ("K4", "visser", "breda", "laan")]
    stored = pd.DataFrame(
        [dict(zip(["customer", "name", "city", "street"], people[i % 4], strict=True)) for i in range(40)]
    )
    stored.insert(0, "record_id", [f"R{i}" for i in range(40)])
    entered = stored.copy()
    typos = {
        "R1": "jxnsen",
        "R6": "vixser",
        "R9": "jansxn",
        "R12": "baxker",
        "R17": "janxen",
        "R22": "dx vries",
    }
    for record_id, value in typos.items():
        entered.loc[entered["record_id"] == record_id, "name"] = value
    labels = pd.DataFrame(
        {
            s.LOG_RECORD_ID: list(typos),
            s.LOG_FIELD: "name",
            s.LOG_OLD_VALUE: list(typos.values()),
            s.LOG_NEW_VALUE: [stored.set_index("record_id").loc[r, "name"] for r in typos],
        }
    )
    model = ErrorModel(config, folds=4).fit(entered, labels, stored)
    assert model.unsupervised_fields_ == ["customer", "city", "street"]
    batch = stored.head(4).copy()
    batch.loc[0, "street"] = "kerkstrxat"
    batch.loc[1, "city"] = "utrecht"  # K2 lives in delft
    flags = model.detect(batch).set_index(["row", "field"])
    assert (0, "street") in flags.index
    assert flags.loc[(1, "city"), "suggestion"] == "delft"
    assert set(flags.index) <= {(0, "street"), (1, "city")}


def test_cell_metrics_follow_barans_definitions() -> None:
    truth = pd.DataFrame(
        {
            "record_id": ["1", "2", "3", "4"],
            "field": ["a", "a", "b", "b"],
            "old_value": ["x"] * 4,
            "new_value": ["A", "B", "C", ""],
        }
    )
    flags = pd.DataFrame(
        {
            "record_id": ["1", "2", "3", "4", "5"],
            "field": ["a", "a", "b", "b", "a"],
            "suggestion": ["A", "wrong", "", "", "Z"],
            "suggest_empty": [False, False, False, True, False],
        }
    )
    m = cell_metrics(flags, truth)
    assert m["detection_precision"] == pytest.approx(4 / 5)
    assert m["detection_recall"] == pytest.approx(1.0)
    assert m["correction_precision"] == pytest.approx(2 / 4)  # A and the empty one right; 4 made
    assert m["correction_recall"] == pytest.approx(2 / 4)
    assert m["correction_f1"] == pytest.approx(0.5)


def test_assess_equals_cell_scores_and_detect(demo: dict) -> None:
    model, batch = _lenient(demo["model"]), demo["batch"].head(120)
    row = _history_row(demo)
    matched = pd.DataFrame({name: [""] * len(batch) for name in demo["config"].fields}, index=batch.index)
    matched.iloc[0] = {name: row[name] for name in demo["config"].fields}
    scores, flags = model.assess(batch, matched)
    pd.testing.assert_frame_equal(scores, model.cell_scores(batch))
    pd.testing.assert_frame_equal(flags, model.detect(batch, matched))
    assert len(flags) > 0
    plain_scores, plain_flags = model.assess(batch)
    pd.testing.assert_frame_equal(plain_scores, scores)
    pd.testing.assert_frame_equal(plain_flags, model.detect(batch))


def test_assess_on_an_empty_chunk(demo: dict) -> None:
    scores, flags = demo["model"].assess(demo["batch"].head(0))
    assert scores.shape == (0, len(demo["config"].check_fields))
    assert flags.empty


def _with_random_ids(config: Config, frame: pd.DataFrame, seed: int) -> tuple[Config, pd.DataFrame]:
    """The config and records with an added `code` field of random 8-digit ids (EAN-8/BSN-shaped)."""
    raw = config.model_dump()
    raw["fields"] = {**raw["fields"], "code": {"type": "code"}}
    rng = np.random.default_rng(seed)
    out = frame.copy()
    out["code"] = [f"{v:08d}" for v in rng.integers(10_000_000, 100_000_000, len(frame))]
    return Config.model_validate(raw), out


def test_a_merge_only_log_trains_and_flags_almost_nothing(demo: dict) -> None:
    """A log of merges only: fit and calibrate run, and an error-free batch gets (almost) no error flags,
    none on a field of random 8-digit ids (which must not adopt the EAN or BSN check)."""
    config, stored = _with_random_ids(demo["config"], demo["stored"], 0)
    log = load_log(demo["paths"].corrections)
    merges = log[log[s.LOG_ACTION] == s.ACTION_MERGE]
    labels = cell_labels(merges, stored[config.id_column])
    assert labels.empty
    model = ErrorModel(config, folds=3).fit(stored.iloc[:1200], labels, stored.iloc[:1200])
    assert model.labelled_ is False and model.profile_.fields["code"].schemes == []
    metrics = model.calibrate(stored.iloc[1200:], labels)  # no edits: nothing to choose, nothing fails
    assert metrics["threshold"] == 0.5 and metrics["true_errors"] == 0
    _, batch = _with_random_ids(demo["config"], _corrected(demo["batch"], demo["truth"]), 1)
    flags = model.detect(batch)
    assert len(flags) <= 0.01 * len(batch)
    assert "code" not in set(flags["field"])


def _corrected(batch: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The batch with every wrong cell set to its true value: an error-free batch."""
    out = batch.set_index("record_id")
    edits = truth[truth[s.LOG_ACTION] == s.ACTION_EDIT]
    cells = zip(edits[s.LOG_RECORD_ID], edits[s.LOG_FIELD], edits[s.LOG_NEW_VALUE], strict=True)
    for record_id, name, value in cells:
        out.loc[record_id, name] = value
    return out.reset_index()


def test_an_error_free_batch_gets_few_flags(demo: dict) -> None:
    batch = _corrected(demo["batch"], demo["truth"])
    assert len(demo["model"].detect(batch)) <= 0.02 * len(batch)


def test_confirmed_cells_are_sure_negatives() -> None:
    """A value a clerk confirmed counts as a sure negative: an identifier check it fails is dropped, and a
    labelled model scores the confirmed cell lower than without the confirmation."""
    from stdnum import ean

    config = Config.model_validate(
        {
            "name": "t",
            "fields": {"customer": {"type": "code"}, "name": {"type": "text"}, "gtin": {"type": "code"}},
        }
    )
    people = [("K1", "bakker"), ("K2", "jansen"), ("K3", "de vries"), ("K4", "visser")]
    bodies = [f"{8710000000000 + 7919 * i:012d}"[:12] for i in range(60)]
    stored = pd.DataFrame(
        {
            "record_id": [f"R{i}" for i in range(60)],
            "customer": [people[i % 4][0] for i in range(60)],
            "name": [people[i % 4][1] for i in range(60)],
            "gtin": [b + ean.calc_check_digit(b) for b in bodies],
        }
    )
    stored.loc[59, "gtin"] = stored.loc[59, "gtin"][:-1] + str((int(stored.loc[59, "gtin"][-1]) + 1) % 10)
    empty = pd.DataFrame(columns=[s.LOG_RECORD_ID, s.LOG_FIELD, s.LOG_OLD_VALUE, s.LOG_NEW_VALUE])
    assert ErrorModel(config, folds=3).fit(stored, empty, stored).schemes_["gtin"] == ["EAN"]
    sure = pd.DataFrame({s.LOG_RECORD_ID: ["R59"], s.LOG_FIELD: ["gtin"], "value": [stored.loc[59, "gtin"]]})
    confirmed = ErrorModel(config, folds=3).fit(stored, empty, stored, confirmed=sure)
    assert confirmed.schemes_["gtin"] == [] and confirmed.confirmed_cells_ == 1
    assert confirmed.cell_scores(stored.tail(1))["gtin"].iloc[0] == 0

    entered = stored.copy()
    typos = {
        "R1": "jxnsen",
        "R5": "jaxsen",
        "R9": "jansxn",
        "R13": "janxen",
        "R17": "jxnsen",
        "R21": "jansex",
    }
    for record_id, value in typos.items():
        entered.loc[entered["record_id"] == record_id, "name"] = value
    entered.loc[entered["record_id"] == "R25", "name"] = stored.loc[25, "name"] = "jxnsen"  # really so
    labels = pd.DataFrame(
        {
            s.LOG_RECORD_ID: list(typos),
            s.LOG_FIELD: "name",
            s.LOG_OLD_VALUE: list(typos.values()),
            s.LOG_NEW_VALUE: "jansen",
        }
    )
    clerk = pd.DataFrame({s.LOG_RECORD_ID: ["R25"], s.LOG_FIELD: ["name"], "value": ["jxnsen"]})
    row = entered[entered["record_id"] == "R25"]
    plain = ErrorModel(config, folds=3, threshold=0.5).fit(entered, labels, stored)
    taught = ErrorModel(config, folds=3, threshold=0.5).fit(entered, labels, stored, confirmed=clerk)
    assert taught.confirmed_cells_ == 1
    assert taught.cell_scores(row)["name"].iloc[0] < plain.cell_scores(row)["name"].iloc[0]
    # The confirmed cell itself is known right while it holds the confirmed value: that false alarm does not
    # come back. The same value on another record, or another value on that record, is judged as before.
    assert taught.cell_scores(row)["name"].iloc[0] == 0
    assert taught.detect(row).empty
    assert taught.cell_scores(row.assign(record_id="R99"))["name"].iloc[0] > 0
    assert taught.cell_scores(row.assign(name="jansxn"))["name"].iloc[0] > 0


def _new_customer(stored: pd.DataFrame) -> pd.DataFrame:
    """Four orders of a customer the training history never saw, with all of its own contact details."""
    new = stored.iloc[[0] * 4].copy()
    new["record_id"] = [f"NEW{i}" for i in range(4)]
    new["customer_name"] = "Zwanenburg Tegelhandel"
    new["customer_code"] = "C-99999"
    new["street"] = "Zwanenstraat 9"
    new["postcode"] = "1011 ZZ"
    new["city"] = "Amsterdam"
    new["email"] = "info@zwanenburgtegelhandel.nl"
    new["phone"] = "020-9999999"
    return new


def test_with_reference_knows_a_customer_added_after_training(demo: dict) -> None:
    model, stored = demo["model"], demo["stored"]
    new = _new_customer(stored)
    reference = pd.concat([stored, new], ignore_index=True)
    batch = new.iloc[[0]].assign(record_id="B1", customer_code="")

    def suggested(m: ErrorModel) -> list[str]:
        flags = m.detect(batch)
        return flags.loc[flags["field"] == "customer_code", "suggestion"].tolist()

    refreshed = model.with_reference(reference)
    assert suggested(refreshed) == ["C-99999"]
    assert "C-99999" not in suggested(model)
    # A copy: the trained model, its classifier and thresholds are left as they were.
    assert "C-99999" not in model.profile_.fields["customer_code"].counts
    assert refreshed.classifier_ is model.classifier_
    assert refreshed.threshold_ == model.threshold_


def test_with_reference_keeps_what_training_knew(demo: dict) -> None:
    model, stored = demo["model"], demo["stored"]
    name = next(iter(model.profile_.by_target["customer_code"])).source
    dep = next(dep for dep in model.profile_.by_target["customer_code"] if dep.source == name)
    known, code = next(iter(dep.implied.items()))
    # The reference says otherwise about a known customer: training's lookup stays (the classifier was
    # fitted on it), and the counts of known values too.
    reference = stored.iloc[:3].assign(**{name: known, "customer_code": "C-00000"})
    refreshed = model.with_reference(reference)
    new_dep = next(dep for dep in refreshed.profile_.by_target["customer_code"] if dep.source == name)
    assert new_dep.implied[known] == code
    fp, new_fp = model.profile_.fields["customer_code"], refreshed.profile_.fields["customer_code"]
    assert all(new_fp.counts[value] == n for value, n in fp.counts.items())
    assert new_fp.counts["C-00000"] == 3


def test_training_samples_unlabelled_rows_with_weights(demo: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.errors as errors_module

    config, stored = demo["config"], demo["stored"]
    log = load_log(demo["paths"].corrections)
    entered, _ = replay_backwards(stored, log, id_column=config.id_column)
    labels = cell_labels(log, stored[config.id_column])
    monkeypatch.setattr(errors_module, "MAX_TRAINING_ROWS", 400)
    sampled = ErrorModel(config, folds=3).fit(entered, labels, stored)
    metrics = cell_metrics(sampled.detect(demo["batch"]), demo["truth"], ids=demo["batch"]["record_id"])
    assert sampled.classifier_.edges is not None  # weighted: inputs cut at unweighted quantiles
    assert metrics["detection_f1"] > 0.6


def test_training_rows_keeps_every_labelled_row() -> None:
    from pipeline.errors import training_rows

    ids = pd.Series([f"r{i}" for i in range(100)])
    keep, weight = training_rows(ids, {"r1", "r2"}, 12, np.random.default_rng(0))
    assert keep[[1, 2]].all() and weight[[1, 2]].tolist() == [1.0, 1.0]
    assert keep.sum() == 12
    assert np.isclose(weight[~np.isin(np.arange(100), [1, 2])][0], 98 / 10)
    keep, weight = training_rows(ids, {"r1"}, 1000, np.random.default_rng(0))
    assert keep.all() and (weight == 1).all()


def test_spread_sample_takes_one_record_in_each_stretch_of_the_history() -> None:
    from pipeline.errors import spread_sample

    picked = spread_sample(1000, 100, np.random.default_rng(0))
    assert len(picked) == 100 and (np.diff(picked) > 0).all()
    assert (picked // 10 == np.arange(100)).all()  # one in each tenth-of-a-percent of the entry order
    assert not np.array_equal(picked, spread_sample(1000, 100, np.random.default_rng(1)))
    assert spread_sample(50, 100, np.random.default_rng(0)).tolist() == list(range(50))


def test_fit_cells_keeps_every_error_and_confirmed_cell_and_weights_the_sample() -> None:
    from pipeline.errors import fit_cells

    rng = np.random.default_rng(0)
    y = np.zeros(1000, dtype=int)
    y[:10] = 1
    sure = np.zeros(1000, dtype=bool)
    sure[10:15] = True
    weight = np.ones(1000)
    weight[15:20] = 0.0  # cells entered alike in their duplicate: never fitted on
    weight[500:] = 3.0  # cells of sampled rows already stand for three
    mask, w = fit_cells(y, sure, weight, 200, 4, rng)
    assert mask[:15].all() and not mask[15:20].any()
    assert mask.sum() == 200
    assert (w[:15] == 1).all()
    rate = 185 / 980
    assert np.allclose(np.unique(w[mask & (np.arange(1000) >= 20)]), [1 / rate, 3 / rate])
    assert weight[500] == 3.0  # the input weights are left alone
    # Room for at least `per_error` clean cells per error, whatever `max_cells` says.
    mask, _ = fit_cells(y, sure, weight, 0, 4, rng)
    assert mask.sum() == 15 + 40
    # Room for every cell: all of them with weight, their weights as given.
    mask, w = fit_cells(y, sure, weight, 5000, 4, rng)
    assert mask.sum() == 995 and np.array_equal(w, weight)


def test_a_large_history_is_profiled_and_fitted_from_samples_and_every_cell_is_scored(
    demo: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above `PROFILE_ROWS` profiled records the profiles are those of `PROFILE_ROWS` records spread over the
    history, and above `SCALE_ROWS` the classifiers see every labelled error cell and a weighted sample of
    the others; the thresholds are still chosen on every training cell's score, and the model still finds
    the demo's errors."""
    import pipeline.errors as errors_module

    config, stored = demo["config"], demo["stored"]
    log = load_log(demo["paths"].corrections)
    entered, _ = replay_backwards(stored, log, id_column=config.id_column)
    labels = cell_labels(log, stored[config.id_column])
    seen = []
    original = ErrorModel._fit_classifier

    def spy(self, X, y, weight=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append((len(y), int(y.sum()), weight))
        return original(self, X, y, weight, **kwargs)

    monkeypatch.setattr(ErrorModel, "_fit_classifier", spy)
    whole = ErrorModel(config, folds=3).fit(entered, labels, stored)
    full = list(seen)
    seen.clear()
    monkeypatch.setattr(errors_module, "SCALE_ROWS", 0)
    monkeypatch.setattr(errors_module, "PROFILE_ROWS", len(stored) * 3 // 4)
    monkeypatch.setattr(errors_module, "FIT_CELLS", 2_000)
    ranker_fit = errors_module.sg.CandidateRanker.fit
    rankers = []
    monkeypatch.setattr(
        errors_module.sg.CandidateRanker,
        "fit",
        lambda self, X, y: rankers.append(len(X)) or ranker_fit(self, X, y),
    )
    sampled = ErrorModel(config, folds=5).fit(entered, labels, stored)
    assert len(rankers) == 1 + 3  # the final ranker, and one per group of folds for the suggestion threshold
    assert sampled.profile_.rows == len(stored) * 3 // 4 < whole.profile_.rows
    assert len(seen) == len(full) == 4  # the final classifier and one per out-of-fold group
    (n_full, errors_full, _), (n_sampled, errors_sampled, weight) = full[0], seen[0]
    assert errors_sampled == errors_full > 0 and n_sampled < n_full / 2
    assert weight is not None and weight.max() > 2
    assert sampled.training_errors_ == whole.training_errors_
    metrics = cell_metrics(sampled.detect(demo["batch"]), demo["truth"], ids=demo["batch"]["record_id"])
    assert metrics["detection_f1"] > 0.6


def test_cut_at_edges_keeps_order_and_missing_values() -> None:
    from pipeline.errors import cut_at_edges, quantile_edges

    X = np.c_[np.r_[np.arange(1000.0), np.nan], np.r_[np.ones(1000), 2.0]]
    edges = quantile_edges(X, max_bins=16)
    assert edges[1] is None and len(edges[0]) == 15
    cut = cut_at_edges(X, edges)
    assert np.isnan(cut[-1, 0]) and cut[:, 1].tolist() == X[:, 1].tolist()
    assert np.all(np.diff(cut[:-1, 0]) >= 0) and len(np.unique(cut[:-1, 0])) == 16


def test_a_classifier_fitted_on_cells_of_its_own_equals_one_fitted_on_a_copy(demo: dict) -> None:
    """`_fit_classifier(own=True)` fills the empty columns and cuts the values in the caller's matrix itself
    (no second copy of the cells); the classifier is the same, and without `own` the matrix is untouched."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3_000, 5))
    X[:, 1] = np.nan  # empty throughout: set to 0
    X[::7, 2] = np.nan
    X[:, -1] = rng.integers(0, 3, size=len(X))  # the field id
    y = (X[:, 0] + rng.normal(scale=0.5, size=len(X)) > 0.8).astype(int)
    weight = rng.uniform(1.0, 5.0, size=len(X))
    model = ErrorModel(demo["config"], max_iter=20)
    before = X.copy()
    copied, empty_copied = model._fit_classifier(X, y, weight)
    assert np.array_equal(X, before, equal_nan=True)
    own, empty_own = model._fit_classifier(X, y, weight, own=True)
    assert not np.array_equal(X, before, equal_nan=True)  # cut in place
    assert empty_own.tolist() == empty_copied.tolist() == [False, True, False, False, False]
    probe, _ = sg.fill_empty_columns(before, empty_own)
    assert np.array_equal(own.predict_proba(probe), copied.predict_proba(probe))


def test_stored_rows_already_in_the_entered_order_are_aligned_without_keying_them() -> None:
    """`_align` of a stored history in the entered order is the same frame as keying and reindexing it
    gives for the same rows shuffled; a record absent from the stored history keeps its entered values."""
    from pipeline.errors import _align

    entered = pd.DataFrame({"record_id": ["a", "b", "c"], "city": ["X", "Y", "Z"]}).set_axis([5, 6, 7])
    entered = entered.reset_index(drop=True)
    stored = pd.DataFrame({"record_id": ["a", "b", "c"], "city": ["Xs", None, "Zs"]}, dtype=object)
    ids = entered["record_id"]
    same = _align(stored, ids, "record_id", entered)
    keyed = _align(stored.iloc[[2, 0, 1]], ids, "record_id", entered)
    pd.testing.assert_frame_equal(same, keyed)
    assert same["city"].tolist() == ["Xs", "", "Zs"] and same.index.equals(entered.index)
    partial = _align(stored.iloc[[0, 2]], ids, "record_id", entered)
    assert partial["city"].tolist() == ["Xs", "Y", "Zs"]


def test_a_chunk_assessed_in_parts_gives_the_result_of_one_piece(demo: dict, monkeypatch) -> None:
    """`assess` takes a chunk `ASSESS_ROWS` rows at a time (memory); scores and flags, their order, reasons
    and suggestions, with and without matched records, are those of the chunk in one piece."""
    import pipeline.errors

    model, batch = demo["model"], demo["batch"]
    matched = batch.iloc[::-1].set_axis(batch.index)  # any other record's values, as a duplicate would give
    whole = [model.assess(batch), model.assess(batch, matched)]
    monkeypatch.setattr(pipeline.errors, "ASSESS_ROWS", 7)
    for (scores, flags), matched_with in zip(whole, (None, matched), strict=True):
        parts = model.assess(batch, matched_with)
        pd.testing.assert_frame_equal(parts[0], scores)
        pd.testing.assert_frame_equal(parts[1], flags)
        assert len(flags) > 7


def test_distinct_rows_scores_each_distinct_row_once_and_survives_hash_collisions(monkeypatch):
    """Bit-equal rows (NaN included) share one position; rows that only share a hash are kept apart."""
    X = np.array([[1.0, np.nan], [2.0, 0.0], [1.0, np.nan], [2.0, -0.0], [2.0, 0.0]])
    first, inverse = distinct_rows(X)
    assert first.tolist() == [0, 1, 3]
    assert inverse.tolist() == [0, 1, 0, 2, 1]
    assert np.array_equal(X[first][inverse], X, equal_nan=True)
    monkeypatch.setattr(pd.util, "hash_array", lambda values: np.zeros(len(values), dtype=np.uint64))
    first, inverse = distinct_rows(X)
    assert first.tolist() == inverse.tolist() == [0, 1, 2, 3, 4]


def test_cells_entered_alike_in_their_duplicate_do_not_teach_the_classifier(
    demo: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merged record's cell equal to its original's is never judged at scoring (`_adjust_for_matched`
    scores it 0), so in training it weighs nothing; its other cells, and every labelled error, still count."""
    from pipeline.errors import _entered_alike

    config, stored = demo["config"], demo["stored"].iloc[:600].reset_index(drop=True)
    log = load_log(demo["paths"].corrections)
    entered, _ = replay_backwards(stored, log, id_column=config.id_column)
    labels = cell_labels(log, stored[config.id_column])
    fields = config.check_fields
    matched = pd.DataFrame(s.MISSING, index=entered.index, columns=list(config.fields))
    twins = np.arange(0, 600, 3)  # every third record "duplicates" a record holding its amount and number
    matched.loc[twins, ["amount", "order_number"]] = entered.loc[twins, ["amount", "order_number"]].to_numpy()
    matched.loc[twins, "city"] = "Elsewhere"
    alike = _entered_alike(entered, matched, fields)
    assert alike[twins][:, [fields.index("amount"), fields.index("order_number")]].all()
    assert alike.sum() == 2 * len(twins) and not alike[:, fields.index("city")].any()

    seen = []
    original = ErrorModel._fit_classifier

    def spy(self, X, y, weight=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append((y, weight))
        return original(self, X, y, weight, **kwargs)

    monkeypatch.setattr(ErrorModel, "_fit_classifier", spy)
    ErrorModel(config, folds=3).fit(entered, labels, stored, matched=matched)
    y, weight = seen[0]  # the final classifier: every fold's cells, field after field
    assert weight is not None and (weight == 0).sum() >= 2 * len(twins) * 0.9
    assert (weight[y == 1] > 0).all()
    plain = []
    monkeypatch.setattr(
        ErrorModel,
        "_fit_classifier",
        lambda self, X, y, w=None, **kw: plain.append(w) or original(self, X, y, w, **kw),
    )
    ErrorModel(config, folds=3).fit(entered, labels, stored)
    assert plain[0] is None or (plain[0] > 0).all()


def test_fold_lookups_taken_back_from_disk_for_the_thresholds_equal_the_kept_ones(
    demo: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above `KEEP_LOOKUPS_ROWS` each fold's profile is set aside on disk after its features and taken back
    when its flagged cells need candidates: every candidate frame, both thresholds and the flags stay the
    same, and the temporary files are gone after the fit."""
    import pipeline.errors as errors_module
    import pipeline.memory as memory_module

    config, stored = demo["config"], demo["stored"]
    log = load_log(demo["paths"].corrections)
    entered, _ = replay_backwards(stored, log, id_column=config.id_column)
    labels = cell_labels(log, stored[config.id_column])
    frames: list[pd.DataFrame] = []
    candidate_frame = errors_module.sg.candidate_frame

    def recorded(*args, **kwargs) -> pd.DataFrame:
        frames.append(candidate_frame(*args, **kwargs))
        return frames[-1]

    monkeypatch.setattr(errors_module.sg, "candidate_frame", recorded)
    taken: list[Path] = []
    take = memory_module.Spill.take
    monkeypatch.setattr(
        memory_module.Spill, "take", lambda self, path: taken.append(path) or take(self, path)
    )
    fits = []
    for keep in (errors_module.KEEP_LOOKUPS_ROWS, 0):
        monkeypatch.setattr(errors_module, "KEEP_LOOKUPS_ROWS", keep)
        frames.clear()
        model = ErrorModel(config, folds=3).fit(entered.iloc[:1200], labels, stored.iloc[:1200])
        fits.append((model, list(frames)))
        assert len(taken) == (0 if keep else 3)  # kept: none written; set aside: one per fold
    assert not any(path.parent.exists() for path in taken)
    (kept, kept_frames), (rebuilt, rebuilt_frames) = fits
    assert len(kept_frames) == len(rebuilt_frames) > 3  # the folds' own and the flagged cells' frames
    for a, b in zip(kept_frames, rebuilt_frames, strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert (kept.threshold_, kept.suggest_threshold_) == (rebuilt.threshold_, rebuilt.suggest_threshold_)
    pd.testing.assert_frame_equal(kept.detect(demo["batch"]), rebuilt.detect(demo["batch"]))


def test_fitted_edit_history_is_the_whole_training_historys(demo: dict) -> None:
    """The fit counts the whole history's edits from the folds' coded table: the counts
    `EditHistory.learn` finds on the training records and their labels of the checked fields."""
    config, stored = demo["config"], demo["stored"]
    log = load_log(demo["paths"].corrections)
    entered, _ = replay_backwards(stored, log, id_column=config.id_column)
    labels = cell_labels(log, stored[config.id_column])
    model = ErrorModel(config, folds=3).fit(entered.iloc[:800], labels, stored.iloc[:800])
    ids = set(entered[config.id_column].iloc[:800])
    own = labels[labels["field"].isin(config.check_fields) & labels["record_id"].isin(ids)]
    assert len(own)  # a labelled fit
    plain = d.EditHistory.learn(entered.iloc[:800].reset_index(drop=True), own, config)
    for name in ("value_errors", "value_seen", "shape_errors", "shape_seen", "field_rate"):
        assert getattr(model.edits_, name) == getattr(plain, name), name


def test_quantile_edges_are_the_percentiles_of_columns_with_many_values() -> None:
    """A column gets edges when it has more than `max_bins` distinct non-missing values (signed zeros are
    one value), and they are the distinct `averaged_inverted_cdf` percentiles of those values."""
    from pipeline.errors import quantile_edges

    rng = np.random.default_rng(0)
    n = 4000
    X = np.c_[
        rng.normal(size=n),
        rng.integers(0, 10, n).astype(float),
        np.r_[rng.normal(size=n - 1000), np.full(1000, np.nan)],
        np.full(n, np.nan),
        np.r_[np.zeros(n // 2), -np.zeros(n // 2)],
        rng.integers(0, 300, n).astype(float),
    ]
    X[rng.integers(0, n, 300), 0] = np.nan
    for max_bins, skip in ((255, ()), (5, (0,)), (300, ())):
        edges = quantile_edges(X, max_bins=max_bins, skip=skip)
        for j, got in enumerate(edges):
            column = X[~np.isnan(X[:, j]), j]
            if j in skip or len(np.unique(column)) <= max_bins:
                assert got is None, (max_bins, j)
                continue
            percentiles = np.linspace(0, 100, num=max_bins + 1)[1:-1]
            want = np.unique(np.percentile(column, percentiles, method="averaged_inverted_cdf"))
            np.testing.assert_array_equal(got, want)
    assert [e is None for e in quantile_edges(X, max_bins=255)] == [False, True, False, True, True, False]


def test_rule_floors_need_enough_firing_cells_mostly_corrected() -> None:
    year = d.FEATURES.index("year_mismatch")
    X = np.full((8, len(d.FEATURES) + 1), np.nan)
    X[:, -1] = [0, 0, 0, 0, 1, 1, 1, 1]
    X[:, year] = [1, 1, 1, 0, 1, 1, 1, 1]
    y = np.array([1, 1, 0, 1, 1, 0, 0, 0])
    # Field 0: 2 of 3 firing cells corrected; field 1: 1 of 4, below RULE_MIN_PRECISION.
    assert rule_floors([floor_counts(X, y, np.ones(8), {"a": 0, "b": 1})]) == {
        (0, "year_mismatch"): pytest.approx(2 / 3)
    }
    # A confirmed clean cell weighs more; a cell of weight 0 (entered alike in its duplicate) does not count,
    # leaving two firing cells: too few.
    assert rule_floors([floor_counts(X, y, np.array([1, 1, 5, 1, 1, 1, 1, 1.0]), {"a": 0, "b": 1})]) == {}
    assert rule_floors([floor_counts(X, y, np.array([1, 1, 0, 1, 1, 1, 1, 1.0]), {"a": 0, "b": 1})]) == {}
    # Counts of disjoint folds add up: the floor of folds A and B is the floor of their cells together.
    ids = {"a": 0, "b": 1}
    apart = [floor_counts(X[:2], y[:2], np.ones(2), ids), floor_counts(X[2:], y[2:], np.ones(6), ids)]
    assert rule_floors(apart) == rule_floors([floor_counts(X, y, np.ones(8), ids)])
    # Out of fold: a fold holding two of the three firing cells leaves one to the others, too few.
    assert rule_floors(apart[1:]) == {}
    X[2, year] = 0  # two firing cells are too few to judge a rule by, however right
    assert rule_floors([floor_counts(X, y, np.ones(8), {"a": 0, "b": 1})]) == {}


def test_a_cell_a_rule_fires_on_scores_at_least_the_rules_floor(demo: dict) -> None:
    model = copy.deepcopy(demo["model"])
    row = _history_row(demo)
    year = str(int(row["order_date"][:4]))
    slipped = {**row, "order_number": row["order_number"].replace(year, year[:2] + year[3] + year[2], 1)}
    chunk = pd.DataFrame([row, slipped], dtype=object)
    before = model.cell_scores(chunk)["order_number"].tolist()
    model.rule_floors_ = {(model.field_ids_["order_number"], "year_mismatch"): 0.97}
    after = model.cell_scores(chunk)["order_number"].tolist()
    assert after[0] == before[0]  # the rule does not fire on the right number
    assert after[1] == max(before[1], 0.97)
    assert after[1] >= 0.97

"""Tests of the demo data generator: files, formats, consistency of the logs, rates and determinism."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import generate as g

SIZES = {"customers": 40, "history": 400, "batch": 100}
LOG_HEADER = ["record_id", "action", "field", "old_value", "new_value", "merged_into", "corrected_at"]
RECORD_HEADER = [
    "record_id",
    "entered_at",
    "customer_code",
    "customer_name",
    "street",
    "postcode",
    "city",
    "email",
    "phone",
    "order_number",
    "order_date",
    "amount",
    "vat_rate",
    "notes",
]


def read(path: Path) -> pd.DataFrame:
    """A CSV as text, empty cells as empty strings."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def apply_edits(records: pd.DataFrame, log: pd.DataFrame, *, column: str) -> pd.DataFrame:
    """`records` with each edit's `column` value (old_value or new_value) written into its cell."""
    records = records.set_index("record_id").copy()
    for edit in log[log["action"] == "edit"].itertuples():
        records.at[edit.record_id, edit.field] = getattr(edit, column)
    return records.reset_index()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> g.DemoPaths:
    return g.generate(tmp_path_factory.mktemp("demo"), **SIZES)


@pytest.fixture(scope="module")
def history(demo: g.DemoPaths) -> pd.DataFrame:
    return read(demo.records)


@pytest.fixture(scope="module")
def batch(demo: g.DemoPaths) -> pd.DataFrame:
    return read(demo.batch)


@pytest.fixture(scope="module")
def corrections(demo: g.DemoPaths) -> pd.DataFrame:
    return read(demo.corrections)


@pytest.fixture(scope="module")
def batch_truth(demo: g.DemoPaths) -> pd.DataFrame:
    return read(demo.batch_truth)


@pytest.fixture(scope="module")
def history_truth(demo: g.DemoPaths) -> pd.DataFrame:
    return read(demo.history_truth)


def test_writes_every_file_with_its_header(demo: g.DemoPaths) -> None:
    for path in (demo.records, demo.batch):
        assert path.read_text(encoding="utf-8").splitlines()[0].split(",") == RECORD_HEADER
    for path in (demo.corrections, demo.batch_truth, demo.history_truth):
        assert path.read_text(encoding="utf-8").splitlines()[0].split(",") == LOG_HEADER
    assert b"\r\n" not in demo.records.read_bytes()


def test_config_describes_the_record_columns(demo: g.DemoPaths, history: pd.DataFrame) -> None:
    config = yaml.safe_load(demo.config.read_text(encoding="utf-8"))
    assert config["name"] == "orders"
    assert config["id_column"] == "record_id"
    assert config["time_column"] == "entered_at"
    assert config["minutes_per_correction"] == 4
    assert config["fields"]["amount"] == {"type": "number"}
    assert list(history.columns) == ["record_id", "entered_at", *config["fields"], "notes"]


def test_row_counts_follow_the_arguments(history: pd.DataFrame, batch: pd.DataFrame) -> None:
    assert len(history) == SIZES["history"]
    assert len(batch) == SIZES["batch"]


def test_record_ids_are_unique_and_the_batch_continues_the_history(
    history: pd.DataFrame, batch: pd.DataFrame
) -> None:
    ids = pd.concat([history["record_id"], batch["record_id"]])
    assert ids.is_unique
    assert ids.str.fullmatch(r"R\d{7}").all()
    assert batch["record_id"].min() > history["record_id"].max()


def test_history_is_sorted_and_the_batch_comes_after_it(history: pd.DataFrame, batch: pd.DataFrame) -> None:
    entered = pd.to_datetime(history["entered_at"], format="ISO8601")
    assert entered.is_monotonic_increasing
    assert pd.to_datetime(batch["entered_at"], format="ISO8601").min() > entered.max()
    assert history["entered_at"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00").all()
    hours = entered.dt.hour + entered.dt.minute / 60
    assert ((hours >= 8) & (hours < 17.5)).all()
    assert (entered.dt.dayofweek < 5).all()


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path, demo: g.DemoPaths) -> None:
    again = g.generate(tmp_path / "again", **SIZES)
    other = g.generate(tmp_path / "other", **SIZES, seed=8)
    for name in ("config", "records", "corrections", "batch", "batch_truth", "history_truth"):
        assert getattr(again, name).read_bytes() == getattr(demo, name).read_bytes(), name
    for name in ("records", "corrections", "batch", "batch_truth"):
        assert getattr(other, name).read_bytes() != getattr(demo, name).read_bytes(), name


def test_history_does_not_depend_on_the_batch_size(tmp_path: Path, demo: g.DemoPaths) -> None:
    smaller = g.generate(tmp_path / "smaller", **{**SIZES, "batch": 10})
    assert smaller.records.read_bytes() == demo.records.read_bytes()
    assert smaller.corrections.read_bytes() == demo.corrections.read_bytes()


def test_edits_replay_backwards_onto_the_history(history: pd.DataFrame, corrections: pd.DataFrame) -> None:
    edits = corrections[corrections["action"] == "edit"]
    assert len(edits) > 0
    assert (edits["old_value"] != edits["new_value"]).all()
    stored = history.set_index("record_id")
    for edit in edits.itertuples():
        assert stored.at[edit.record_id, edit.field] == edit.new_value
    entered = apply_edits(history, corrections, column="old_value").set_index("record_id")
    for edit in edits.itertuples():
        assert entered.at[edit.record_id, edit.field] == edit.old_value


def test_log_rows_are_well_formed(corrections: pd.DataFrame, batch_truth: pd.DataFrame) -> None:
    for log in (corrections, batch_truth):
        assert set(log["action"]) <= {"edit", "merge", "confirm"}
        edits, merges = log[log["action"] == "edit"], log[log["action"] == "merge"]
        assert set(edits["field"]) <= set(g.FIELDS)
        assert (edits["merged_into"] == "").all()
        assert (merges["field"] == "").all() & (merges["merged_into"] != "").all()
        assert not log.duplicated(["record_id", "action", "field"]).any()
    assert (batch_truth["corrected_at"] == "").all()
    assert (corrections["action"] == "confirm").any()


def test_corrections_happen_within_14_days_of_entry(history: pd.DataFrame, corrections: pd.DataFrame) -> None:
    entered = pd.to_datetime(history.set_index("record_id")["entered_at"], format="ISO8601")
    corrected = pd.to_datetime(corrections["corrected_at"], format="ISO8601")
    delay = corrected.to_numpy() - entered[corrections["record_id"]].to_numpy()
    assert (delay >= pd.Timedelta(0)).all()
    assert (delay <= pd.Timedelta(days=14)).all()
    assert corrected.is_monotonic_increasing


def test_merges_point_to_earlier_existing_records(
    history: pd.DataFrame, batch: pd.DataFrame, corrections: pd.DataFrame, batch_truth: pd.DataFrame
) -> None:
    entered = pd.to_datetime(
        pd.concat([history, batch]).set_index("record_id")["entered_at"], format="ISO8601"
    )
    for log, known in ((corrections, set(history["record_id"])), (batch_truth, set(entered.index))):
        merges = log[log["action"] == "merge"]
        assert len(merges) > 0
        assert set(merges["merged_into"]) <= known
        assert (entered[merges["merged_into"]].to_numpy() < entered[merges["record_id"]].to_numpy()).all()
        # Originals are kept, never merged away themselves.
        assert not set(merges["merged_into"]) & set(merges["record_id"])


def test_batch_has_duplicates_of_the_history_and_of_itself(
    history: pd.DataFrame, batch_truth: pd.DataFrame
) -> None:
    originals = batch_truth.loc[batch_truth["action"] == "merge", "merged_into"]
    assert originals.isin(history["record_id"]).any()
    assert (~originals.isin(history["record_id"])).any()


def test_duplicates_repeat_the_order_of_their_original(
    batch: pd.DataFrame, batch_truth: pd.DataFrame
) -> None:
    true_batch = apply_edits(batch, batch_truth, column="new_value").set_index("record_id")
    merges = batch_truth[
        (batch_truth["action"] == "merge") & batch_truth["merged_into"].isin(true_batch.index)
    ]
    assert len(merges) > 0
    for merge in merges.itertuples():
        duplicate, original = true_batch.loc[merge.record_id], true_batch.loc[merge.merged_into]
        for name in ("customer_code", "customer_name", "amount", "order_date", "vat_rate"):
            assert duplicate[name] == original[name]


def test_batch_truth_covers_errors_at_plausible_rates(batch: pd.DataFrame, batch_truth: pd.DataFrame) -> None:
    edits = batch_truth[batch_truth["action"] == "edit"]
    with_edit = edits["record_id"].nunique() / len(batch)
    merged = (batch_truth["action"] == "merge").sum() / len(batch)
    assert 0.03 <= with_edit <= 0.25
    assert 0.01 <= merged <= 0.10
    entered = batch.set_index("record_id")
    for edit in edits.itertuples():
        assert entered.at[edit.record_id, edit.field] == edit.old_value != edit.new_value


def test_missing_customer_code_is_the_most_common_error(history_truth: pd.DataFrame) -> None:
    fields = history_truth.loc[history_truth["action"] == "edit", "field"].value_counts()
    assert fields.index[0] == "customer_code"
    blanks = history_truth[(history_truth["field"] == "customer_code")]
    assert (blanks["old_value"] == "").all()


def test_true_values_have_the_expected_formats(
    history: pd.DataFrame, batch: pd.DataFrame, history_truth: pd.DataFrame, batch_truth: pd.DataFrame
) -> None:
    true = pd.concat(
        [
            apply_edits(history, history_truth, column="new_value"),
            apply_edits(batch, batch_truth, column="new_value"),
        ]
    )
    assert true["customer_code"].str.fullmatch(r"C-[1-9]\d{4}").all()
    assert true["postcode"].str.fullmatch(r"\d{4} [A-Z]{2}").all()
    assert true["order_number"].str.fullmatch(r"SO-20\d\d-\d{6}").all()
    assert true["order_date"].str.fullmatch(r"\d{4}-\d\d-\d\d").all()
    assert true["amount"].str.fullmatch(r"\d+\.\d\d").all()
    assert (true["amount"].astype(float) > 0).all()
    assert set(true["vat_rate"]) <= {"21", "9", "0"}
    assert true["phone"].str.fullmatch(r"0\d{1,3}-\d{6,8}").all()
    assert (true["phone"].str.replace("-", "").str.len() == 10).all()
    assert true["email"].str.fullmatch(r"[a-z0-9.]+@[a-z0-9.]+\.(nl|com)").all()
    # The order's number carries the year of its date; only re-registrations share a number.
    assert (true["order_number"].str[3:7] == true["order_date"].str[:4]).all()
    assert true["order_number"].duplicated().mean() < 0.05


def test_postcodes_agree_with_cities_in_true_values(
    history: pd.DataFrame, history_truth: pd.DataFrame
) -> None:
    true = apply_edits(history, history_truth, column="new_value")
    ranges = {name: (low, high) for name, low, high, _, _ in g.CITIES}
    digits = true["postcode"].str[:4].astype(int)
    low = true["city"].map(lambda city: ranges[city][0])
    high = true["city"].map(lambda city: ranges[city][1])
    assert ((digits >= low) & (digits <= high)).all()


def test_customers_keep_their_details(history: pd.DataFrame, history_truth: pd.DataFrame) -> None:
    true = apply_edits(history, history_truth, column="new_value")
    details = true.groupby("customer_code")[["customer_name", "street", "postcode", "city", "email", "phone"]]
    assert (details.nunique() == 1).all().all()
    orders_per_customer = true["customer_code"].value_counts()
    assert orders_per_customer.iloc[0] >= 5 * orders_per_customer.median()


def test_staff_found_about_85_percent_of_the_history_errors(
    corrections: pd.DataFrame, history_truth: pd.DataFrame
) -> None:
    key = ["record_id", "action", "field", "old_value", "new_value", "merged_into"]
    truth = history_truth[key]
    logged = truth.merge(corrections[key], how="left", on=key, indicator=True)["_merge"] == "both"
    assert 0.70 <= logged.mean() <= 0.95
    assert set(map(tuple, corrections.loc[corrections["action"] != "confirm", key].to_numpy())) <= set(
        map(tuple, truth.to_numpy())
    )


def test_missed_errors_stay_in_the_history(
    history: pd.DataFrame, history_truth: pd.DataFrame, corrections: pd.DataFrame
) -> None:
    key = ["record_id", "field", "old_value"]
    edits = history_truth[history_truth["action"] == "edit"]
    missed = edits.merge(corrections[key], how="left", on=key, indicator=True)
    missed = missed[missed["_merge"] == "left_only"]
    assert len(missed) > 0
    stored = history.set_index("record_id")
    for edit in missed.itertuples():
        assert stored.at[edit.record_id, edit.field] == edit.old_value


def test_notes_are_a_mostly_empty_pass_through_column(tmp_path: Path) -> None:
    notes = read(g.generate(tmp_path, customers=100, history=3000, batch=0).records)["notes"]
    assert 0.5 < (notes == "").mean() < 0.99
    assert notes.str.contains(",").any()
    assert notes.str.contains('"').any()


def test_empty_batch_is_allowed(tmp_path: Path) -> None:
    paths = g.generate(tmp_path, customers=5, history=20, batch=0)
    assert read(paths.batch).empty
    assert read(paths.batch_truth).empty


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"customers": 0}, "customers must be at least 1"),
        ({"history": 0}, "history must be at least 1"),
        ({"batch": -1}, "batch must be at least 0"),
        ({"customers": 100_000}, "customers must be at most 90000"),
        ({"history": 10.5}, "history must be an integer"),
        ({"seed": -3}, "seed must be a non-negative integer"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        g.generate(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()

"""Each detector family on tiny literal frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import detectors as d
from pipeline.config import Config


def _config(**fields: str) -> Config:
    return Config.model_validate(
        {"name": "t", "time_column": "entered_at", "fields": {k: {"type": v} for k, v in fields.items()}}
    )


def _history(n: int = 40) -> pd.DataFrame:
    """Four customers, each always with the same postcode and city, amounts around their own level."""
    customers = [
        ("C-10001", "1012 AB", "Amsterdam", 100.0),
        ("C-10002", "3511 CD", "Utrecht", 1000.0),
        ("C-10003", "2511 EF", "Den Haag", 50.0),
        ("C-10004", "3011 GH", "Rotterdam", 300.0),
    ]
    rows = []
    for i in range(n):
        code, postcode, city, level = customers[i % 4]
        day = 1 + i // 4
        rows.append(
            {
                "record_id": f"R{i:03d}",
                "entered_at": f"2024-01-{day:02d}T10:{i % 60:02d}:00",
                "customer_code": code,
                "postcode": postcode,
                "city": city,
                "amount": f"{level * (1 + 0.05 * (i % 3)):.2f}",
                "order_date": f"2024-01-{day:02d}",
                "order_number": f"SO-2024-{i + 1:06d}",
                "email": f"info@{city.lower().replace(' ', '')}.nl",
            }
        )
    return pd.DataFrame(rows, dtype=object)


CONFIG = _config(
    customer_code="code",
    postcode="code",
    city="category",
    amount="number",
    order_date="date",
    order_number="code",
    email="text",
)


@pytest.fixture(scope="module")
def profile() -> d.Profile:
    return d.build_profile(_history(), CONFIG)


def _features(profile: d.Profile, rows: list[dict]) -> dict[str, pd.DataFrame]:
    chunk = pd.DataFrame(rows, dtype=object)
    return d.cell_features(chunk, profile, CONFIG, list(CONFIG.fields))


def test_parsers() -> None:
    assert d.shape_of("1234 AB") == "9999 AA"
    assert d.coarse_shape("9999 AA") == "9 A"
    assert d.leading_number("1.250,00") == 1250.0
    assert d.leading_number("1,250.00") == 1250.0
    assert d.split_running_number("SO-2024-004711") == ("SO-2024-", 4711, 6)
    assert d.embedded_year("SO-2024-004711") == 2024


def test_checksums() -> None:
    assert d.iban_valid("NL91 ABNA 0417 1643 00") is True
    assert d.iban_valid("NL91ABNA0417164301") is False
    assert d.iban_valid("hello") is None
    assert d.gtin_valid("4006381333931") is True
    assert d.gtin_valid("4006381333932") is False
    assert d.bsn_valid("111222333") is True
    assert d.bsn_valid("111222334") is False
    assert d.email_valid("a.b@example.nl") is True
    assert d.email_valid("a.b@@example.nl") is False
    assert d.email_valid("no at sign") is None
    assert d.isbn_valid("978-0-306-40615-7") is True and d.isbn_valid("0306406153") is False
    assert d.luhn_valid("4111 1111 1111 1111") is True and d.luhn_valid("4111 1111 1111 1112") is False


def test_a_checksum_is_adopted_only_when_the_stored_values_bear_it_out() -> None:
    from stdnum import ean

    rng = np.random.default_rng(0)
    random_ids = pd.Series([f"{v:08d}" for v in rng.integers(10_000_000, 100_000_000, 300)])
    bodies = [f"{v:012d}" for v in rng.integers(10**11, 10**12, 300)]
    eans = pd.Series([b + ean.calc_check_digit(b) for b in bodies])
    # Random 8-digit ids (a date of birth, a member number) have the shape of an EAN-8 and a BSN, but
    # about 10% pass either check.
    assert d.adopted_schemes(random_ids.value_counts()) == []
    assert d.profile_field(random_ids, "code", "code", None).schemes == []
    assert d.adopted_schemes(eans.value_counts()) == ["EAN"]
    # 98% must pass: 3 invalid EANs in 100 are too many, 1 is not.
    assert d.adopted_schemes(pd.concat([eans[:97], pd.Series(["4006381333932"] * 3)]).value_counts()) == []
    assert d.adopted_schemes(pd.concat([eans[:99], pd.Series(["4006381333932"])]).value_counts()) == ["EAN"]
    # Too few values are no evidence, and a date field never adopts one.
    assert d.adopted_schemes(eans[:10].value_counts()) == []
    dates = pd.Series([f"2024{m:02d}{day:02d}" for m in range(1, 13) for day in range(1, 28)])
    assert d.profile_field(dates, "when", "date", None).schemes == []


def test_one_number_parser_for_every_model(profile: d.Profile) -> None:
    from pipeline.fields.number import NumberField, parse_number, plain_number

    assert parse_number("€ 1.234,50") == plain_number("€ 1.234,50") == 1234.5
    assert NumberField("amount").normalise(pd.Series(["€ 1.234,50"])).tolist() == ["1234.5"]
    assert parse_number("12.0 oz.") == 12.0 and math.isnan(plain_number("12 oz"))
    assert parse_number("0,0725") == 0.0725
    row = _history(1).iloc[0].to_dict()
    f = _features(profile, [{**row, "amount": "€ 1.234,50"}, {**row, "amount": "12 oz"}])["amount"]
    assert f["number_unparsed"].tolist() == [0.0, 1.0]
    assert f["number_log"].iloc[0] == pytest.approx(math.log10(1234.5))


def test_profile_learns_dependencies_groups_and_formats(profile: d.Profile) -> None:
    pairs = {(dep.source, dep.target) for dep in profile.dependencies}
    assert ("postcode", "city") in pairs
    assert ("customer_code", "postcode") in pairs
    assert profile.groups["amount"].group in ("customer_code", "postcode", "city", "email")
    assert profile.fields["order_date"].date_format == "%Y-%m-%d"
    assert profile.fields["email"].schemes == ["e-mail"]
    assert profile.fields["order_number"].sequence
    assert profile.fields["order_number"].embeds_year
    assert profile.fields["amount"].decimals == 2


def test_frequency_and_shape(profile: d.Profile) -> None:
    row = _history(1).iloc[0].to_dict()
    odd = {**row, "postcode": "1012ab"}
    f = _features(profile, [row, odd])["postcode"]
    assert f["value_log_count"].iloc[0] == pytest.approx(math.log1p(10))
    assert f["value_unseen"].tolist() == [0.0, 1.0]
    assert f["shape_share"].tolist() == [1.0, 0.0]


def test_dependency_disagreement(profile: d.Profile) -> None:
    row = _history(1).iloc[0].to_dict()  # C-10001, 1012 AB, Amsterdam
    wrong_city = {**row, "city": "Utrecht"}
    f = _features(profile, [row, wrong_city])["city"]
    assert f["dep_disagree"].iloc[0] == 0
    assert f["dep_disagree"].iloc[1] >= 2  # postcode and customer code both imply Amsterdam
    assert f["dep_agree"].iloc[0] >= 2


def test_number_against_its_group(profile: d.Profile) -> None:
    row = _history(1).iloc[0].to_dict()  # amount about 100 for this customer
    slip = {**row, "amount": "1000.00"}
    f = _features(profile, [row, slip])["amount"]
    assert abs(f["group_log_ratio"].iloc[0]) < 0.1
    assert f["group_log_ratio"].iloc[1] == pytest.approx(1.0, abs=0.1)
    assert f["group_pow10_gap"].iloc[1] < 0.1


def test_dates_against_entry_time(profile: d.Profile) -> None:
    row = _history(1).iloc[0].to_dict()  # ordered on the day of entry
    late = {**row, "order_date": "2024-03-01"}
    swapped = {**row, "order_date": "01/01/2024"}
    f = _features(profile, [row, late, swapped])["order_date"]
    assert f["date_outside"].iloc[0] < 0.01
    assert f["date_outside"].iloc[1] > 1
    assert f["date_unparsed"].tolist() == [0.0, 0.0, 1.0]
    assert f["date_other_format"].iloc[2] == 1.0


def test_a_dates_frequency_says_nothing(profile: d.Profile) -> None:
    # The day after the history's end is unseen in it, the history's first day is not: a date is judged by
    # its format and its distance to the entry time, its frequency features are neutral.
    row = _history(1).iloc[0].to_dict()
    next_day = {**row, "entered_at": "2024-01-11T10:00:00", "order_date": "2024-01-11"}
    f = _features(profile, [row, next_day])["order_date"]
    for key in ("value_log_count", "value_share", "value_unseen"):
        assert f[key].isna().all(), key
    assert (f["date_outside"] < 0.01).all()
    # Other fields keep them.
    assert _features(profile, [row])["city"]["value_unseen"].tolist() == [0.0]


def test_an_amounts_or_running_numbers_frequency_says_nothing(profile: d.Profile) -> None:
    # Amounts that are mostly unique and running numbers are new in nearly every record, right or wrong: how
    # often the value occurred, or was corrected, is neutral for them as for dates (`values_recur`).
    history = _history()
    assert d.values_recur(profile.fields["amount"])  # these customers repeat three amounts each
    history["amount"] = [f"{float(a) + i / 100:.2f}" for i, a in enumerate(history["amount"])]
    profile = d.build_profile(history, CONFIG)
    row = history.iloc[0].to_dict()
    new = {**row, "amount": "123.45", "order_number": "SO-2024-000999"}
    per_field = _features(profile, [row, new])
    assert not d.values_recur(profile.fields["amount"]) and not d.values_recur(profile.fields["order_number"])
    for name in ("amount", "order_number"):
        for key in d.VALUE_FREQUENCY:
            assert per_field[name][key].isna().all(), (name, key)
    assert d.values_recur(profile.fields["postcode"])
    assert per_field["postcode"]["value_unseen"].tolist() == [0.0, 0.0]


def test_missing_where_normally_filled(profile: d.Profile) -> None:
    row = _history(1).iloc[0].to_dict()
    f = _features(profile, [row, {**row, "customer_code": ""}])["customer_code"]
    assert f["missing_where_filled"].tolist() == [0.0, 1.0]
    assert np.isnan(f["value_log_count"].iloc[1])


def test_checksum_feature(profile: d.Profile) -> None:
    row = _history(1).iloc[0].to_dict()
    f = _features(profile, [row, {**row, "email": "info@@amsterdam.nl"}])["email"]
    assert f["checksum_invalid"].tolist() == [0.0, 1.0]


def test_running_number_sequence_and_year(profile: d.Profile) -> None:
    rows = _history(12).to_dict("records")
    rows[6]["order_number"] = "SO-2024-000070"  # digits slipped: 000007 -> 000070
    rows[3]["order_number"] = "SO-2042-000004"  # year digits swapped
    f = _features(profile, rows)["order_number"]
    assert f["sequence_gap"].iloc[6] == pytest.approx(math.log1p(63), abs=0.02)
    # Row 5 follows 1, 2, 3, 5 (row 3 left the prefix): within one number of the 6 it has; row 7 follows
    # the slip too, and is still within one number of its own.
    assert f["sequence_gap"].iloc[5] < math.log1p(1)
    assert f["sequence_gap"].iloc[7] <= math.log1p(1)
    assert f["sequence_rows"].tolist()[:8] == [0, 1, 2, 0, 3, 4, 5, 6]
    assert np.isnan(f["sequence_gap"].iloc[:3]).all()  # fewer than three earlier rows: no expectation
    assert f["year_mismatch"].iloc[3] == 1.0
    assert f["year_mismatch"].iloc[4] == 0.0


def test_year_mismatch_blames_the_date_when_the_number_agrees_with_the_entry_year(profile: d.Profile) -> None:
    rows = _history(12).to_dict("records")
    rows[5]["order_date"] = "2025-01-02"  # the date's year slipped; the number's 2024 is the entry year
    rows[6]["order_number"] = "SO-2025-000007"  # the number's year slipped; date and entry say 2024
    rows[7]["entered_at"] = ""  # no entry time: the date alone decides
    rows[7]["order_date"] = "2025-01-02"
    f = _features(profile, rows)["order_number"]
    assert f["year_mismatch"].iloc[[4, 5, 6, 7]].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_running_numbers_carried_over_chunks_give_the_expectations_of_one_piece() -> None:
    # Every third number, with noise, a slip and a second prefix: cut anywhere, the same expectations.
    rng = np.random.default_rng(0)
    numbers = np.arange(1, 301) * 3 + rng.integers(0, 3, 300)
    values = pd.Series([f"SO-{2023 + (i % 7 == 0)}-{n:06d}" for i, n in enumerate(numbers)], dtype=object)
    values[10], values[11] = "SO-2023-009999", ""
    start = d.RunningNumbers(("order_number",))
    whole, rows = start.expect("order_number", values)
    assert np.nanmax(np.abs(whole - numbers)[12:]) <= 5  # a step of 3 is followed, the slip ignored
    assert np.isnan(whole[11]) and rows[11] == 0
    for cut in (1, 2, 7, 299):
        state, parts = start, []
        for first in range(0, len(values), cut):
            part = values.iloc[first : first + cut]
            parts.append(state.expect("order_number", part)[0])
            state = state.then(d.RunningNumbers.of(pd.DataFrame({"order_number": part}), state.names))
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        back = d.RunningNumbers.from_dict(state.to_dict())
        np.testing.assert_array_equal(
            back.tails["order_number"]["SO-2023-"], state.tails["order_number"]["SO-2023-"]
        )


def test_running_numbers_of_a_table_are_the_tails_its_expectations_leave() -> None:
    # `RunningNumbers.of` skips the table's own expectations: the state after it is the one `_expect` leaves,
    # prefix by prefix (short and long runs, missing and unparsed values, unordered times).
    rng = np.random.default_rng(1)
    prefixes = np.array(["SO-2023-", "SO-2024-", "X"], dtype=object)[rng.integers(0, 3, 500)]
    numbers = rng.integers(0, 99_999, 500)
    values = pd.Series([f"{p}{n:05d}" for p, n in zip(prefixes, numbers, strict=True)], dtype=object)
    values[[3, 40]] = ["", "no number"]
    times = pd.Series(pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 90, 500), unit="D"))
    frame = pd.DataFrame({"no": values, "at": times})
    state = d.RunningNumbers.of(frame, ["no"], "at")
    _, _, expected = d.RunningNumbers(("no",))._expect("no", values, times)
    assert state.tails["no"].keys() == expected.tails["no"].keys() == {"SO-2023-", "SO-2024-", "X"}
    for prefix, rows in expected.tails["no"].items():
        assert rows.shape == (2, d.SEQUENCE_WINDOW)
        np.testing.assert_array_equal(state.tails["no"][prefix], rows)


def test_running_numbers_do_not_lean_on_rows_entered_long_before() -> None:
    # A batch that follows its reference after a gap: the reference's last numbers are no neighbours.
    days = pd.date_range("2024-01-01", periods=8, freq="D")
    old = pd.DataFrame({"no": [f"SO-{n:04d}" for n in range(1, 9)], "at": days.strftime("%Y-%m-%d")})
    state = d.RunningNumbers(("no",)).advance(old, "at")
    soon = pd.Series(pd.to_datetime(["2024-01-09"]))
    assert state.expect("no", ["SO-0100"], soon, horizon=30.0)[0].tolist() == [9.0]
    late = pd.Series(pd.to_datetime(["2024-06-01"]))
    expected, rows = state.expect("no", ["SO-0100"], late, horizon=30.0)
    assert np.isnan(expected[0]) and rows[0] == 0


def test_edit_history() -> None:
    entered = pd.DataFrame(
        {"record_id": ["1", "2", "3", "4"], "city": ["N/A", "N/A", "Utrecht", "N/A"]}, dtype=object
    )
    labels = pd.DataFrame(
        {
            "record_id": ["1", "2"],
            "field": ["city", "city"],
            "old_value": ["N/A", "N/A"],
            "new_value": ["", ""],
        }
    )
    config = _config(city="category")
    edits = d.EditHistory.learn(entered, labels, config)
    assert edits.value_errors["city"] == {"N/A": 2}
    assert edits.value_seen["city"]["N/A"] == 3
    profile = d.build_profile(entered, config)
    f = d.cell_features(entered, profile, config, ["city"], edits)["city"]
    assert f["edit_value_rate"].iloc[0] > f["edit_value_rate"].iloc[2]


def test_edit_table_counts_as_edit_history_learns() -> None:
    """`EditTable.history(rows)` holds the counts `EditHistory.learn` finds on those rows and their labels:
    values and shapes seen only outside `rows` are left out, a label of a record outside them does not
    count, and a missing value is a value."""
    entered = pd.DataFrame(
        {
            "record_id": ["1", "2", "3", "4", "5", "6"],
            "city": ["N/A", "N/A", "Utrecht", "", "Ütrecht", "N/A"],
            "postcode": ["1234 AB", "1234AB", "1234 AB", "9999 ZZ", "", "1234 AB"],
        },
        dtype=object,
    )
    labels = pd.DataFrame(
        {
            "record_id": ["1", "2", "6", "2", "4"],
            "field": ["city", "city", "city", "postcode", "city"],
            "old_value": ["N/A", "N/A", "N/A", "1234AB", ""],
            "new_value": ["", "", "", "1234 AB", "Utrecht"],
        }
    )
    config = _config(city="category", postcode="code")
    table = d.EditTable.of(entered, labels, config)
    for rows in (np.arange(6), np.array([5, 0, 2, 3]), np.array([1, 4])):
        inside = entered["record_id"].iloc[rows]
        plain = d.EditHistory.learn(entered.iloc[rows], labels[labels["record_id"].isin(inside)], config)
        coded = table.history(rows)
        for name in ("value_errors", "value_seen", "shape_errors", "shape_seen"):
            assert getattr(coded, name) == getattr(plain, name), name
        assert coded.field_rate == plain.field_rate
    assert table.history(np.array([5, 0, 2, 3])).value_errors["city"] == {"N/A": 2, "": 1}
    assert "Ütrecht" not in table.history(np.array([5, 0, 2, 3])).value_seen["city"]


def test_fast_dependencies_match_their_definition() -> None:
    frame = pd.DataFrame(
        {
            "brewery": ["b1"] * 10 + ["b2"] * 2 + ["b3"] * 3 + ["", "b4"],
            "city": ["bend"] * 9 + ["bend OR"] + ["gary"] * 2 + ["troy", "troy", ""] + ["x", "reno"],
        }
    )
    dep = d._dependency(frame, "brewery", "city")
    assert dep is not None
    assert dep.implied == {"b1": "bend", "b2": "gary", "b3": "troy", "b4": "reno"}
    assert dep.support == {"b1": 9, "b2": 2, "b3": 2, "b4": 1}
    assert dep.total == {"b1": 10, "b2": 2, "b3": 3, "b4": 1}
    assert dep.strength == pytest.approx(13 / 15)  # over the source values that repeat
    assert d._dependency(frame.assign(city="bend"), "brewery", "city") is None  # a constant says nothing
    tie = pd.DataFrame(
        {"a": list("kkjjjmmm"), "b": ["slip", "usual", "usual", "usual", "usual", "o", "o", "o"]}
    )
    assert d._dependency(tie, "a", "b").implied["k"] == "usual"  # a tie goes to the more frequent value


def test_whole_numbers_can_determine_other_fields() -> None:
    ids = pd.Series(["408", "177", "408", "12"])
    assert d.can_determine(ids, "number")
    assert not d.can_determine(pd.Series(["12.50", "3.10"]), "number")
    assert not d.can_determine(pd.Series(["2024-01-01"]), "date")
    frame = pd.DataFrame(
        {"brewery_id": ["1", "1", "2", "2", "3", "3"] * 2, "city": ["a", "a", "b", "b", "c", "c"] * 2}
    )
    assert ("brewery_id", "city") in d.find_dependencies(frame, {"brewery_id": "number", "city": "text"})


def test_numbers_are_written_the_way_the_field_writes_them(profile: d.Profile) -> None:
    assert d.leading_number("16.0 oz.") == 16.0
    assert d.leading_number("0.07200000000000001%") == pytest.approx(0.072)
    assert math.isnan(d.leading_number("C-10233")) and math.isnan(d.leading_number("SO-2024-1"))
    amount = profile.fields["amount"]
    assert amount.fixed_decimals and amount.decimals == 2
    assert d.write_number(1250.5, amount) == "1250.50"
    plain = d.profile_field(pd.Series(["12", "16", "19.2", "0.05"]), "x", "category", None)
    assert not plain.fixed_decimals
    assert [d.write_number(v, plain) for v in (16.0, 19.2, 0.07200000000000001)] == ["16", "19.2", "0.072"]


def test_unsupervised_score_from_checksums_and_dependencies(profile: d.Profile) -> None:
    row = _history(1).iloc[0].to_dict()
    f = _features(profile, [row, {**row, "city": "Utrecht"}])["city"]
    score = d.unsupervised_score(f[list(d.FEATURES)].to_numpy())
    assert score[0] == 0
    assert score[1] > 0.9  # postcode and customer code, ten records each, imply Amsterdam


def test_unsupervised_score_ignores_weak_evidence() -> None:
    """Two records alike are not near-certain evidence: without labels, nothing is flagged on them."""
    frame = pd.DataFrame(
        {
            "record_id": [f"R{i}" for i in range(8)],
            "postcode": ["1012AB", "1012AB", "3511CD", "3511CD", "2511EF", "2511EF", "3011GH", "3011GH"],
            "city": ["A", "A", "U", "U", "D", "D", "R", "R"],
        },
        dtype=object,
    )
    config = _config(postcode="code", city="category")
    weak = d.build_profile(frame, config)
    assert ("postcode", "city") in {(dep.source, dep.target) for dep in weak.dependencies}
    chunk = pd.DataFrame({"record_id": ["X"], "postcode": ["1012AB"], "city": ["U"]}, dtype=object)
    f = d.cell_features(chunk, weak, config, ["city"])["city"]
    assert f["dep_disagree"].iloc[0] == 1 and f["dep_certain_disagree"].iloc[0] == 0
    assert d.unsupervised_score(f[list(d.FEATURES)].to_numpy())[0] == 0
    checksum = np.zeros((1, len(d.FEATURES)))
    checksum[0, d.FEATURES.index("checksum_invalid")] = 1
    assert d.unsupervised_score(checksum)[0] == pytest.approx(d.CHECKSUM_SCORE)


def test_a_one_record_chunk_gets_the_features_it_gets_inside_a_large_chunk(profile: d.Profile) -> None:
    # Small chunks take dictionary look-ups and skip the rolling median; large ones use pandas indexes.
    rows = _history(200).assign(
        customer_code=lambda f: np.where(np.arange(200) % 7 == 0, "C-99999", f.customer_code)
    )
    rows.loc[3, "city"] = None  # a missing cell, as pandas hands it over
    rows["city"] = rows["city"].astype("string")  # Arrow-backed strings, as ingest reads them
    whole = d.cell_features(rows, profile, CONFIG, list(CONFIG.fields))
    for i in (0, 3, 7):
        one = d.cell_features(rows.iloc[[i]], profile, CONFIG, list(CONFIG.fields))
        for name, frame in one.items():
            expected = whole[name].iloc[[i]].drop(columns=["sequence_gap", "sequence_rows"])
            pd.testing.assert_frame_equal(frame.drop(columns=["sequence_gap", "sequence_rows"]), expected)
            assert frame["sequence_gap"].isna().all()  # no earlier rows given: no expectation


def test_text_column_gives_plain_strings_with_empty_for_missing() -> None:
    frame = pd.DataFrame({"a": pd.array(["x", None, "z"], dtype="string"), "b": ["1", np.nan, None]})
    assert d.text_column(frame, "a").tolist() == ["x", "", "z"]
    assert d.text_column(frame, "b").tolist() == ["1", "", ""]
    assert d.chunk_texts(frame, ["a", "b"]).to_numpy().tolist() == [["x", "1"], ["", ""], ["z", ""]]


def test_extend_profile_adds_what_the_reference_knows_and_keeps_the_rest(profile: d.Profile) -> None:
    reference = pd.DataFrame(
        {
            "customer_code": ["C-20000"] * 3 + ["C-10001"],
            "postcode": ["9999 ZZ"] * 3 + ["0000 AA"],
            "city": ["Groningen"] * 4,
            "amount": ["10.00", "11.00", "12.00", "1.00"],
        },
        dtype=object,
    )
    extended = d.extend_profile(profile, reference)
    assert extended.fields["customer_code"].counts["C-20000"] == 3
    assert (
        extended.fields["customer_code"].counts["C-10001"]
        == profile.fields["customer_code"].counts["C-10001"]
    )
    by_pair = {(dep.source, dep.target): dep for dep in extended.dependencies}
    assert by_pair["customer_code", "postcode"].implied["C-20000"] == "9999 ZZ"
    assert by_pair["customer_code", "postcode"].implied["C-10001"] == "1012 AB"  # training's lookup stays
    assert extended.groups["amount"].medians["C-20000"] == pytest.approx(np.log10(11.0))
    assert "C-20000" not in profile.fields["customer_code"].counts  # the original is left as it was


def test_profile_table_aligns_dependencies_as_index_does() -> None:
    """`ProfileTable.profile` aligns each dependency's look-up arrays from value codes; they and its
    dictionaries equal what `Dependency.index` makes from the dictionaries, on a subset of the rows with
    missing values, a value that implies `''`, and ties."""
    config = _config(customer_code="code", city="category", postcode="code")
    frame = pd.DataFrame(
        {
            "record_id": [f"R{i}" for i in range(12)],
            "entered_at": [f"2024-01-{1 + i:02d}T10:00:00" for i in range(12)],
            "customer_code": ["A", "A", "A", "B", "B", "", "C", "C", "D", "A", "B", "C"],
            "city": ["x", "x", "y", "z", "z", "x", "", "", "w", "x", "z", "q"],
            "postcode": ["1", "1", "1", "2", "2", "3", "4", "4", "", "1", "2", "4"],
        }
    )
    table = d.ProfileTable.of(frame, config)
    pairs = [("customer_code", "city"), ("city", "postcode"), ("postcode", "city")]
    for rows in (None, np.array([11, 0, 1, 2, 3, 4, 6, 7, 9])):
        profile = table.profile(rows, pairs=pairs)
        assert profile.dependencies
        for dep in profile.dependencies:
            plain = d._dependency(frame.iloc[rows] if rows is not None else frame, dep.source, dep.target)
            assert list(dep.implied.items()) == list(plain.implied.items())
            assert list(dep.support.items()) == list(plain.support.items())
            assert list(dep.total.items()) == list(plain.total.items())
            plain.index(profile.fields[dep.source].vocab, profile.fields[dep.target].vocab)
            for name in ("implied_code", "weight", "certain"):
                assert getattr(dep, name).dtype == getattr(plain, name).dtype
                np.testing.assert_array_equal(getattr(dep, name), getattr(plain, name))


def test_profile_table_number_groups_equal_those_of_the_texts() -> None:
    """`ProfileTable` groups a number field on value codes; the group, its share explained and its
    medians (in the texts' order) equal `_number_group` on the texts, for the whole table and a subset."""
    config = _config(customer_code="code", city="category", postcode="code", amount="number")
    frame = _history(60).drop(columns=["record_id"])
    frame.loc[5, "amount"] = "n/a"  # not a number: left out
    frame.loc[7, "customer_code"] = ""  # no group key
    table = d.ProfileTable.of(frame, config)
    for rows in (None, np.arange(59, 3, -1)):
        got = table._number_group(rows, "amount")
        expected = d._number_group(table._texts(rows), "amount", table.kinds)
        assert expected is not None and got is not None
        assert (got.group, got.explained) == (expected.group, expected.explained)
        assert list(got.medians.items()) == list(expected.medians.items())
        assert list(got.rows.items()) == list(expected.rows.items())


def test_number_group_is_the_field_explaining_most_variance_of_the_log() -> None:
    """The group, its share explained (1 - residual variance / total variance of log10 of the amounts,
    residuals taken from each key's median) and its medians and row counts, recomputed here by hand; keys
    held by fewer than `MIN_GROUP_ROWS` rows, and missing keys, are left out of the medians."""
    amounts = [10, 12, 11, 100, 120, 110, 1000, 1, 5, 7]
    customer = ["a", "a", "a", "b", "b", "b", "c", "", "d", "d"]
    region = ["x", "y", "x", "y", "x", "y", "x", "y", "x", "y"]
    frame = pd.DataFrame({"amount": [str(v) for v in amounts], "customer": customer, "region": region})
    fields = {"amount": "number", "customer": "category", "region": "category"}
    for group in (
        d._number_group(frame, "amount", fields),
        d.ProfileTable.of(frame, _config(**fields))._number_group(None, "amount"),
    ):
        assert group is not None and group.group == "customer"
        logs = np.log10(np.array(amounts, dtype=float))
        medians = {"a": np.median(logs[:3]), "b": np.median(logs[3:6])}
        covered = np.array([k in medians for k in customer])
        residual = np.mean(
            [(v - medians[k]) ** 2 for v, k in zip(logs, customer, strict=True) if k in medians]
        )
        assert covered.mean() >= 0.3
        assert group.explained == pytest.approx(1 - residual / logs.var())
        assert group.medians == pytest.approx(medians)
        assert group.rows == {"a": 3, "b": 3}


def test_sequence_expectation_in_parts_equals_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole history's running-number expectations are computed `EXPECT_ROWS` rows at a time (memory);
    with parts cut inside every prefix's run, out of table order, across a gap beyond the horizon, with
    unparsed and missing values and missing times, the numbers are those of one piece."""
    rng = np.random.default_rng(5)
    n = 400
    prefix = rng.choice(["SO-2023-", "SO-2024-", "INV/"], size=n)
    number = np.arange(n) * 3 + rng.integers(0, 2, size=n)
    number[rng.choice(n, 15, replace=False)] += 5_000  # slips
    values = pd.Series([f"{p}{k:06d}" for p, k in zip(prefix, number, strict=True)], dtype=object)
    values.iloc[rng.choice(n, 10, replace=False)] = ""
    values.iloc[rng.choice(n, 10, replace=False)] = "no number"
    days = np.arange(n, dtype=float)
    days[200:] += 400.0  # a gap longer than the horizon
    times = pd.Series(pd.Timestamp("2024-01-01") + pd.to_timedelta(days, unit="D"))
    times.iloc[rng.choice(n, 8, replace=False)] = pd.NaT
    shuffled = rng.permutation(n)
    values, times = values.iloc[shuffled].reset_index(drop=True), times.iloc[shuffled].reset_index(drop=True)
    whole = d.sequence_expectation(values, times, 30.0)
    assert np.isfinite(whole[0]).sum() > n / 2
    for rows in (7, 64, 1):
        monkeypatch.setattr(d, "EXPECT_ROWS", rows)
        parts = d.sequence_expectation(values, times, 30.0)
        pd.testing.assert_series_equal(parts[0], whole[0])
        pd.testing.assert_series_equal(parts[1], whole[1])
    assert all(len(x) == 0 for x in d.sequence_expectation(values.iloc[:0], times.iloc[:0]))

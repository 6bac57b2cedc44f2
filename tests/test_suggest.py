"""Candidate generation and ranking for suggested corrections."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import detectors as d
from pipeline import suggest as sg
from pipeline.config import Config

CONFIG = Config.model_validate(
    {
        "name": "t",
        "fields": {
            "customer_code": {"type": "code"},
            "customer_name": {"type": "text"},
            "postcode": {"type": "code"},
            "amount": {"type": "number"},
            "order_date": {"type": "date"},
        },
    }
)


def _history() -> pd.DataFrame:
    rows = []
    for i in range(30):
        k = i % 3
        rows.append(
            {
                "customer_code": ["C-10233", "C-20456", "C-30789"][k],
                "customer_name": ["Bakker B.V.", "Jansen & Zn", "De Vries"][k],
                "postcode": ["1234 AB", "3511 CD", "2511 EF"][k],
                "amount": [f"{125 + i:.2f}", f"{1500 + i:.2f}", f"{40 + i:.2f}"][k],
                "order_date": f"2024-03-{1 + i % 28:02d}",
            }
        )
    return pd.DataFrame(rows, dtype=object)


PROFILE = d.build_profile(_history(), CONFIG)
ROW = {"customer_code": "C-10233", "customer_name": "Bakker B.V.", "postcode": "1234 AB", "amount": "130.00"}


def _candidates(field: str, value: str, **extra: object) -> dict[str, dict[str, float]]:
    row = {**ROW, field: value}
    cell = sg.CellContext(field=field, value=value, row=row, **extra)
    return sg.generate_candidates(cell, PROFILE, sg.EditPatterns(), sg.nearest_choices(PROFILE))


def test_decimal_slip_candidates() -> None:
    found = _candidates("amount", "1300.00")
    assert "decimal" in found["130.00"]
    assert "decimal" in found["13000.00"]


def test_digit_swap_candidates() -> None:
    found = _candidates("postcode", "2134 AB")
    assert "digit_swap" in found["1234 AB"]
    assert "dependency" in found["1234 AB"]  # the customer's postcode as well


def test_dependency_fill_of_missing_code() -> None:
    found = _candidates("customer_code", "")
    assert found == {"C-10233": {"dependency": 2.0}}  # implied by name and by postcode


def test_matched_record_fills_missing_code() -> None:
    row = {"customer_code": "", "customer_name": "Nieuwe Klant", "postcode": "9999 ZZ"}
    cell = sg.CellContext(field="customer_code", value="", row=row, matched="C-77777")
    found = sg.generate_candidates(cell, PROFILE, sg.EditPatterns(), {})
    assert found == {"C-77777": {"matched": 1.0}}


def test_format_and_typo_candidates() -> None:
    assert "format" in _candidates("postcode", "1234ab")["1234 AB"]
    assert "nearest" in _candidates("customer_name", "Bakkr B.V.")["Bakker B.V."]


def test_date_candidates() -> None:
    found = _candidates("order_date", "2024-07-03")
    assert "date_swap" in found["2024-03-07"]
    assert "date_year" in found["2023-07-03"]
    assert "date_format" in _candidates("order_date", "07/03/2024")["2024-03-07"]


def test_log_mapping_and_empty_candidates() -> None:
    labels = pd.DataFrame(
        {
            "record_id": ["1", "2"],
            "field": ["customer_name", "customer_name"],
            "old_value": ["BAKKER", "N/A"],
            "new_value": ["Bakker B.V.", ""],
        }
    )
    entered = pd.DataFrame({"record_id": ["1", "2"], "customer_name": ["BAKKER", "N/A"]})
    edits = d.EditHistory.learn(entered, labels, CONFIG)
    patterns = sg.EditPatterns.learn(labels, profile=PROFILE, edits=edits)
    cell = sg.CellContext(field="customer_name", value="BAKKER", row=ROW)
    assert sg.generate_candidates(cell, PROFILE, patterns, {})["Bakker B.V."]["log_mapping"] == 1.0
    cell = sg.CellContext(field="customer_name", value="N/A", row=ROW)
    assert "empty" in sg.generate_candidates(cell, PROFILE, patterns, {})[""]


def _patterns(edits: list[tuple[str, str, str, str]], entered: dict[str, list[str]]) -> sg.EditPatterns:
    """Patterns learned from (record, field, old, new) edits of an entered history."""
    labels = pd.DataFrame(edits, columns=["record_id", "field", "old_value", "new_value"])
    frame = pd.DataFrame(entered, dtype=object)
    frame["record_id"] = [str(i) for i in range(len(frame))]
    return sg.EditPatterns.learn(labels, profile=PROFILE, edits=d.EditHistory.learn(frame, labels, CONFIG))


def test_a_mapping_of_a_value_staff_usually_keep_needs_two_edits() -> None:
    names = ["Bakker"] * 10 + ["De Vries"] * 10
    # One edit of a value kept nine times is no rule for the next record with that value ...
    once = _patterns([("0", "customer_name", "Bakker", "Bakker B.V.")], {"customer_name": names})
    assert once.top("customer_name", "Bakker") == []
    # ... the same edit made twice is ...
    twice = _patterns(
        [("0", "customer_name", "Bakker", "Bakker B.V."), ("1", "customer_name", "Bakker", "Bakker B.V.")],
        {"customer_name": names},
    )
    assert twice.top("customer_name", "Bakker") == [("Bakker B.V.", 2)]
    # ... and so is one edit of a value staff corrected every time they saw it (a typo).
    typo = _patterns(
        [("10", "customer_name", "De Vires", "De Vries")], {"customer_name": ["Bakker"] * 10 + ["De Vires"]}
    )
    assert typo.top("customer_name", "De Vires") == [("De Vries", 1)]


def test_no_mapping_in_a_field_whose_values_do_not_recur() -> None:
    # A date (values move with time) or an amount (mostly unique): not even a twice-seen mapping of a value
    # that was corrected each time it was entered applies to the next record holding it.
    edits = [(str(i), "order_date", "2024-07-06", "2024-07-05") for i in range(2)]
    edits += [(str(i), "amount", "130.00", "13.00") for i in range(2)]
    patterns = _patterns(edits, {"order_date": ["2024-07-06"] * 2, "amount": ["130.00"] * 2})
    assert patterns.top("order_date", "2024-07-06") == []
    assert patterns.top("amount", "130.00") == []
    assert not d.values_recur(PROFILE.fields["order_date"])
    assert not d.values_recur(PROFILE.fields["amount"])
    assert d.values_recur(PROFILE.fields["customer_name"])


def test_ranker_prefers_what_the_log_taught() -> None:
    cells = [
        sg.CellContext(field="amount", value=v, row={**ROW, "amount": v}) for v in ("1300.00", "13.00")
    ] * 20
    answers = ["130.00", "130.00"] * 20
    frame = sg.candidate_frame(cells, PROFILE, sg.EditPatterns(), {"amount": 0}, {})
    labels = (frame["candidate"].to_numpy() == np.array(answers, dtype=object)[frame["cell"]]).astype(int)
    ranker = sg.CandidateRanker(max_iter=50).fit(frame, labels)
    best = sg.best_candidates(frame, ranker.predict_proba(frame), len(cells))
    assert best["candidate"].tolist()[:2] == ["130.00", "130.00"]
    assert best["probability"].min() > 0.9


def test_number_candidate_drops_the_unit_the_field_does_not_write() -> None:
    assert "number" in _candidates("amount", "130.00 EUR")["130.00"]
    profile = d.build_profile(pd.DataFrame({"ounces": ["12", "16", "19.2", "12"] * 5}), _ounces_config())
    cell = sg.CellContext(field="ounces", value="19.2 OZ.", row={"ounces": "19.2 OZ."})
    found = sg.generate_candidates(cell, profile, sg.EditPatterns(), sg.nearest_choices(profile))
    assert "number" in found["19.2"]


def _ounces_config() -> Config:
    return Config.model_validate({"name": "t", "fields": {"ounces": {"type": "category"}}})


def test_best_candidates_takes_the_most_probable_per_cell_first_on_ties() -> None:
    from pipeline.suggest import best_candidates

    frame = pd.DataFrame(
        {
            "cell": [1, 1, 1, 0, 3],
            "candidate": ["a", "b", "c", "d", "e"],
            "via": ["x", "y", "z", "w", "v"],
        }
    )
    best = best_candidates(frame, np.array([0.2, 0.7, 0.7, 0.1, 0.9]), 4)
    assert best["candidate"].tolist() == ["d", "b", "", "e"]
    assert best["probability"].tolist() == [0.1, 0.7, 0.0, 0.9]
    assert best["via"].tolist() == ["w", "y", "", "v"]


def test_nearest_many_gives_each_value_what_nearest_gives_it_ties_included() -> None:
    """Many values at once (one distance matrix) against the one-value search, on short words of five
    letters so that many choices tie at the same distance, and with more values than one block holds."""
    import random

    rng = random.Random(1)

    def word() -> str:
        return "".join(rng.choice("abcde") for _ in range(rng.randint(1, 12)))

    for _ in range(20):
        choices = list(dict.fromkeys(word() for _ in range(rng.randint(1, 400))))
        values = [word() for _ in range(sg.NEAREST_BLOCK + 40)] + choices[:5] + [""]
        many = sg.nearest_many(values, choices)
        assert any(len(found) == sg.NEAREST_LIMIT for found in many.values())
        for value in values:
            assert many.get(value, []) == sg._nearest(value, None, choices), value


def test_top_caches_only_values_the_log_maps() -> None:
    patterns = sg.EditPatterns(mapping={"city": {"Amsterdm": {"Amsterdam": 3, "Amstelveen": 1}}})
    for n in range(1000):  # a batch's flagged order numbers: values the log never saw
        assert patterns.top("order_number", f"SO-{n:05d}") == []
    assert patterns.top("city", "Amsterdm") == [("Amsterdam", 3), ("Amstelveen", 1)]
    assert patterns.top("city", "Amsterdm") == [("Amsterdam", 3), ("Amstelveen", 1)]
    assert len(patterns.__dict__["_top"]) == 1

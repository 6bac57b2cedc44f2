"""The record anomaly score: the far tail only, with the unusual fields named; persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.anomalies import AnomalyModel
from pipeline.config import Config
from pipeline.exceptions import ModelLoadError


def _config(**more: str) -> Config:
    """The tests' config: city, postcode and amount, then the `more` fields (name=type)."""
    fields = {"city": "category", "postcode": "code", "amount": "number", **more}
    return Config.model_validate({"name": "t", "fields": {k: {"type": v} for k, v in fields.items()}})


CONFIG = _config()


def _history(n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    cities = np.array(["Amsterdam", "Utrecht", "Rotterdam"])
    k = rng.integers(0, 3, n)
    return pd.DataFrame(
        {
            "city": cities[k],
            "postcode": [f"{1000 + 1000 * int(i)} AB" for i in k],
            "amount": [f"{v:.2f}" for v in np.exp(rng.normal(5, 0.3, n))],
        },
        dtype=object,
    )


@pytest.fixture(scope="module")
def model() -> AnomalyModel:
    return AnomalyModel(CONFIG, quantile=0.99).fit(_history())


def test_only_the_far_tail_is_flagged(model: AnomalyModel) -> None:
    history = _history()
    assert model.score(history)["flagged"].mean() <= 0.02
    odd = pd.DataFrame([{"city": "zzz-123", "postcode": "??", "amount": "99999999.00"}], dtype=object)
    scored = model.score(pd.concat([history.head(5), odd], ignore_index=True))
    assert scored["anomaly_score"].between(0, 1).all()
    assert bool(scored["flagged"].iloc[-1])
    assert scored["anomaly_score"].iloc[-1] == pytest.approx(1.0)
    assert not scored["flagged"].iloc[:5].any()
    assert (scored["reason"].iloc[:5] == "").all()
    assert "amount" in scored["reason"].iloc[-1] or "city" in scored["reason"].iloc[-1]


def test_save_load_round_trip(model: AnomalyModel, tmp_path: Path) -> None:
    model.save(tmp_path)
    loaded = AnomalyModel.load(tmp_path)
    chunk = _history(20)
    pd.testing.assert_frame_equal(loaded.score(chunk), model.score(chunk))


def test_load_failure(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        AnomalyModel.load(tmp_path / "nothing")


def _orders(n: int, start: int, seed: int) -> pd.DataFrame:
    """Orders of a later period look like earlier ones, except for new order numbers and amounts."""
    rng = np.random.default_rng(seed)
    cities = np.array(["Amsterdam", "Utrecht", "Rotterdam", "Delft"])
    k = rng.integers(0, 4, n)
    return pd.DataFrame(
        {
            "city": cities[k],
            "postcode": [f"{1000 + 1000 * int(i)} AB" for i in k],
            "amount": [f"{v:.2f}" for v in np.exp(rng.normal(5, 0.5, n))],
            "order_number": [f"SO-{start + i:06d}" for i in range(n)],
        },
        dtype=object,
    )


def test_a_fresh_batch_is_flagged_at_about_one_minus_the_quantile() -> None:
    config = _config(order_number="code")
    model = AnomalyModel(config, quantile=0.99).fit(_orders(3000, 1, seed=1))
    scored = model.score(_orders(3000, 5000, seed=2))
    # New order numbers and new amounts are normal: only about 1% of a fresh batch is flagged.
    assert scored["flagged"].mean() <= 0.03
    assert scored["anomaly_score"].between(0, 1).all()
    odd = _orders(1, 9000, seed=3).assign(city="Xyzzy-12", amount="9999999.00")
    flagged = model.score(odd)
    assert bool(flagged["flagged"].iloc[0])
    assert flagged["reason"].iloc[0].startswith("unusual record: ")
    assert "city 'Xyzzy-12'" in flagged["reason"].iloc[0] or "amount 9999999.00" in flagged["reason"].iloc[0]


def test_a_record_a_clerk_found_normal_is_not_flagged_again() -> None:
    history = _history()
    odd = pd.DataFrame([{"city": "zzz-123", "postcode": "??", "amount": "99999999.00"}], dtype=object)
    other = pd.DataFrame([{"city": "qqq-9", "postcode": "!!", "amount": "0.01"}], dtype=object)
    plain = AnomalyModel(CONFIG, quantile=0.99).fit(pd.concat([history, odd], ignore_index=True))
    assert bool(plain.score(odd)["flagged"].iloc[0])
    taught = AnomalyModel(CONFIG, quantile=0.99).fit(pd.concat([history, odd], ignore_index=True), normal=odd)
    assert not taught.score(odd)["flagged"].iloc[0]  # the rejected flag does not come back unchanged
    assert taught.cutoff_ >= plain.cutoff_
    # the cutoff rises at most to the history's 99.9% quantile: a different odd record is still flagged
    assert bool(taught.score(other)["flagged"].iloc[0])
    assert taught.score(history)["flagged"].mean() <= plain.score(history)["flagged"].mean()


def test_the_same_rare_values_a_clerk_found_normal_are_not_flagged_on_another_record() -> None:
    config = _config(vat="category")
    history = _history().assign(vat=lambda f: np.where(np.arange(len(f)) % 2 == 0, "21", "9"))
    odd = pd.DataFrame([{"city": "zzz-123", "postcode": "??", "amount": "99999999.00", "vat": "21"}])
    same_rare = odd.assign(vat="9")  # another record, unusual in the same values only
    more_rare = odd.assign(city="qqq-9")  # unusual in a value the clerk has not seen
    known = pd.concat([history, odd], ignore_index=True)
    plain = AnomalyModel(config, quantile=0.99).fit(known)
    taught = AnomalyModel(config, quantile=0.99).fit(known, normal=odd)
    assert plain.score(same_rare)["flagged"].iloc[0] and plain.score(more_rare)["flagged"].iloc[0]
    taught.cutoff_ = plain.cutoff_  # the rare values decide it, not the raised cutoff
    assert not taught.score(same_rare)["flagged"].iloc[0]
    assert "qqq-9" in taught.score(more_rare)["reason"].iloc[0]
    taught.normal_rare_ = {}  # forgotten: the other record is flagged again
    assert taught.score(same_rare)["flagged"].iloc[0]
    # Digests only: the model keeps no value of the reviewed record.
    index = AnomalyModel(config).fit(known, normal=odd).normal_rare_
    assert index and all(
        len(x) == 24 for digest, sets in index.items() for found in sets for x in (digest, *found)
    )


def test_the_flattened_forest_scores_exactly_as_scikit_learn(model: AnomalyModel) -> None:
    from pipeline.anomalies import FlatForest

    rng = np.random.default_rng(1)
    X = np.abs(rng.normal(0, 2, size=(300, len(model.owners_))))
    X[:5] = 0.0
    flat = FlatForest(model.forest_)
    assert np.array_equal(flat.anomaly(X), -model.forest_.score_samples(X))
    assert np.array_equal(flat.anomaly(X[:1]), -model.forest_.score_samples(X[:1]))


def test_records_scored_in_parts_score_as_in_one_piece(model: AnomalyModel, monkeypatch) -> None:
    import pipeline.anomalies

    history = _history()
    whole = model.score(history)
    monkeypatch.setattr(pipeline.anomalies, "SCORE_ROWS", 7)
    pd.testing.assert_frame_equal(model.score(history), whole)


CUSTOMERS = Config.model_validate(
    {
        "name": "t",
        "fields": {
            "customer_code": {"type": "code"},
            "street": {"type": "text"},
            "phone": {"type": "code"},
            "city": {"type": "category"},
        },
    }
)


def _customer_orders() -> pd.DataFrame:
    """Orders of 20 regular customers (30 orders each) and 30 small ones (3 orders each, 15% of orders)."""
    rows = []
    for i in range(50):
        customer = {"customer_code": f"C-{100 + i}", "street": f"Dorpsstraat {i + 1}",
                    "phone": f"06-1000{i:04d}", "city": ["Utrecht", "Breda"][i % 2]}  # fmt: skip
        rows += [customer] * (30 if i < 20 else 3)
    small = {"customer_code": "C-999", "street": "Kerkweg 9", "phone": "06-99990000", "city": "Utrecht"}
    return pd.DataFrame([*rows, small, small, small], dtype=object)


def test_a_small_customer_is_rare_once_not_once_per_field() -> None:
    model = AnomalyModel(CUSTOMERS, quantile=0.99).fit(_customer_orders())
    columns = {owner: j for j, owner in enumerate(model.owners_)}
    small = {"customer_code": "C-999", "street": "Kerkweg 9", "phone": "06-99990000", "city": "Utrecht"}
    moved = {**small, "street": "Kerkweg 11"}
    X = model._encode(pd.DataFrame([small, moved], dtype=object))
    code, street, phone = (columns[(name, "value")] for name in ("customer_code", "street", "phone"))
    # The customer code is as rare as the customer; its street and phone are what its earlier orders hold:
    # given the code, not rare at all.
    assert X[0, code] > 4
    assert X[0, street] == pytest.approx(0.0) and X[0, phone] == pytest.approx(0.0)
    # A street its earlier orders do not hold keeps its own rarity.
    assert X[1, street] > 4


def test_a_new_customer_is_rare_once_too() -> None:
    # In the history a customer seen once has its own street and phone nowhere else; so does a new one.
    orders = _customer_orders()
    single = {"customer_code": "C-777", "street": "Laan 7", "phone": "06-77770000", "city": "Breda"}
    frame = pd.concat([orders, pd.DataFrame([single], dtype=object)], ignore_index=True)
    model = AnomalyModel(CUSTOMERS, quantile=0.99).fit(frame)
    columns = {owner: j for j, owner in enumerate(model.owners_)}
    code, street = columns[("customer_code", "value")], columns[("street", "value")]
    new = {"customer_code": "C-555", "street": "Plein 5", "phone": "06-55550000", "city": "Breda"}
    wrong = {**new, "street": "Dorpsstraat 1"}  # a new code with a regular customer's street
    X = model._encode(pd.DataFrame([new, wrong], dtype=object))
    history = model._encode(frame.tail(1), leave_one_out=True)
    assert X[0, code] > 5 and history[0, code] > 5
    assert X[0, street] < 1 and history[0, street] < 1
    # Only a new value comes with a new customer: a known street under a new code is judged as it is.
    assert X[1, street] > 2


def test_given_dependencies_and_profile_score_alike(model: AnomalyModel) -> None:
    """The error model's dependency search and profile of the same records, handed over, give the same
    model as learning them again (train.py shares them instead of profiling the history twice)."""
    from pipeline import detectors as d

    history = _history()
    kinds = {name: spec.type for name, spec in CONFIG.fields.items()}
    pairs = d.find_dependencies(d.chunk_texts(history, kinds), kinds)
    assert pairs  # city <-> postcode: something to share
    profile = d.build_profile(history, CONFIG, pairs=pairs, schemes={})
    chunk = pd.concat(
        [_history(30), pd.DataFrame([{"city": "Utrecht", "postcode": "1000 AB", "amount": "1"}])]
    )
    for given in (
        AnomalyModel(CONFIG, quantile=0.99).fit(history, pairs=pairs),
        AnomalyModel(CONFIG, quantile=0.99).fit(history, profile=profile),
    ):
        assert given.cutoff_ == model.cutoff_
        pd.testing.assert_frame_equal(given.score(chunk), model.score(chunk))
    with pytest.raises(ValueError, match="profile of 400 rows"):
        AnomalyModel(CONFIG, quantile=0.99).fit(history.head(10), profile=profile)


def test_givens_sharing_value_counts_equal_givens_each_counting_alone() -> None:
    """`_givens` looks each field's values up once for all its dependencies (a field is the source of
    several): the same arrays as each dependency looking them up itself."""
    from pipeline import detectors as d
    from pipeline.anomalies import Given

    model = AnomalyModel(CUSTOMERS, quantile=0.99).fit(_customer_orders())
    texts = d.chunk_texts(_customer_orders(), list(CUSTOMERS.fields))
    shared = [given for givens in model.givens_.values() for given in givens]
    assert len({given.source for given in shared}) < len(shared), "a source serving several dependencies"
    for given in shared:
        dep = next(dep for dep in model.profile_.by_target[given.target] if dep.source == given.source)
        alone = Given.of(dep, model.profile_, texts)
        assert (given.source, given.target, given.novel) == (alone.source, alone.target, alone.novel)
        for name in ("implied", "support", "total"):
            np.testing.assert_array_equal(getattr(given, name), getattr(alone, name))


def test_the_scoring_copy_scores_alike_without_the_dependencies() -> None:
    """`for_scoring` drops the profile's dependencies (read by `fit` only, `givens_` keeps what scoring
    needs of them): the same encodings, scores, flags and reasons, on records that break a dependency too."""
    model = AnomalyModel(CUSTOMERS, quantile=0.99).fit(_customer_orders())
    assert model.givens_ and model.profile_.dependencies, "a model whose scores use dependencies"
    small = {"customer_code": "C-999", "street": "Kerkweg 9", "phone": "06-99990000", "city": "Utrecht"}
    chunk = pd.concat(
        [
            _customer_orders().iloc[::7],
            pd.DataFrame(
                [
                    small,  # its street is rare, but not given its customer code (`givens_`)
                    {**small, "street": "Dorpsstraat 1"},  # a known code with another customer's street
                    {"customer_code": "C-555", "street": "Plein 5", "phone": "06-5555", "city": "Breda"},
                    {"customer_code": "x", "street": "", "phone": "1", "city": "Nowhere"},
                ],
                dtype=object,
            ),
        ],
        ignore_index=True,
    )
    scoring = model.for_scoring()
    assert scoring.profile_.dependencies == [] and scoring.profile_.by_target == {}
    assert model.profile_.dependencies and model.profile_.by_target  # the fitted model is left as it was
    columns = {owner: j for j, owner in enumerate(model.owners_)}
    encoded = model._encode(chunk)
    row = len(chunk) - 4  # `small`
    assert encoded[row, columns[("customer_code", "value")]] > 4
    assert encoded[row, columns[("street", "value")]] == pytest.approx(0.0)
    np.testing.assert_array_equal(scoring._encode(chunk), encoded)
    pd.testing.assert_frame_equal(scoring.score(chunk), model.score(chunk))

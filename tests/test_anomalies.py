"""The record anomaly score: the far tail only, with the unusual fields named; persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.anomalies import AnomalyModel
from pipeline.config import Config
from pipeline.exceptions import ModelLoadError

CONFIG = Config.model_validate(
    {
        "name": "t",
        "fields": {"city": {"type": "category"}, "postcode": {"type": "code"}, "amount": {"type": "number"}},
    }
)


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

from pathlib import Path

import pytest

from pipeline.config import DEFAULT_MINUTES_PER_CORRECTION, config_from_dict, load_config
from pipeline.exceptions import ConfigError

GOOD = """
name: orders
id_column: record_id
time_column: entered_at
fields:
  customer_code: {type: code}
  customer_name: {type: text}
  amount: {type: number, match: false}
  notes_flag: {type: category, check: false}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_loads_types_flags_and_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.name == "orders"
    assert config.time_column == "entered_at"
    assert config.fields["amount"].type == "number"
    assert config.match_fields == ["customer_code", "customer_name", "notes_flag"]
    assert config.check_fields == ["customer_code", "customer_name", "amount"]
    assert config.required_columns() == [
        "record_id",
        "entered_at",
        "customer_code",
        "customer_name",
        "amount",
        "notes_flag",
    ]
    assert config.minutes_per_correction == DEFAULT_MINUTES_PER_CORRECTION


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nfields:\n  a: {type: strng}\n", "key `fields.a.type`"),
        ("name: x\nfields:\n  a: {type: text, colour: red}\n", "key `fields.a.colour`"),
        ("name: x\nfields: [a, b]\n", "key `fields`"),
        ("fields:\n  a: {type: text}\n", "key `name`"),
        ("name: x\nfields: {}\n", "key `fields`"),
        ("name: x\nid_column: a\nfields:\n  a: {type: text}\n", "id or time column"),
        ("name: x\nfields:\n  a: {type: text, match: false}\n", "match: true"),
        ("name: [unclosed\n", "not valid YAML"),
        ("- just a list\n", "YAML mapping"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_round_trips_through_a_dict(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config_from_dict(config.model_dump(mode="json")) == config

"""The run configuration: one typed settings object, built once from a YAML file or a dict.

Bad settings are rejected here, before any data is read, with a message that names the file and the key
and says how to fix it.

>>> cfg = Config.model_validate({"name": "orders", "fields": {"amount": {"type": "number"}}})
>>> cfg.fields["amount"].type
'number'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.exceptions import ConfigError
from pipeline.ingest import parse_delimiter, parse_encoding
from pipeline.schema import FieldTypeName

DEFAULT_MINUTES_PER_CORRECTION = 4.0
DEFAULT_MINUTES_PER_FALSE_ALARM = 1.0


class FieldSpec(BaseModel):
    """How one column is treated: its type, and whether the models may compare and flag it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: FieldTypeName
    match: bool = True  # compared by the duplicate model
    check: bool = True  # may be flagged by the error model


class SplitSpec(BaseModel):
    """Which part of the history is held out. With a time column the split is by time: the latest
    `test` share is the test set, the `validation` share before it chooses the thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    validation: float = Field(0.15, gt=0, lt=0.5)
    test: float = Field(0.2, gt=0, lt=0.5)


class Config(BaseModel):
    """Everything a training or scoring run needs to know about the data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    id_column: str = "record_id"
    time_column: str | None = None
    fields: dict[str, FieldSpec] = Field(min_length=1)
    minutes_per_correction: float = Field(DEFAULT_MINUTES_PER_CORRECTION, ge=0)
    minutes_per_false_alarm: float = Field(DEFAULT_MINUTES_PER_FALSE_ALARM, ge=0)
    cost_per_hour: float | None = Field(None, ge=0)  # euros per staff hour: time saved is also given in euros
    duplicate_min_precision: float | None = Field(None, gt=0, le=1)
    error_min_precision: float | None = Field(None, gt=0, le=1)
    anomaly_quantile: float = Field(0.995, gt=0.5, lt=1)
    split: SplitSpec = SplitSpec()
    seed: int = 0
    # How input files are read (`pipeline.ingest.ReadOptions`); absent = detected from the file.
    delimiter: str | None = None  # CSV separator: "," ";" "\t" or "|"
    encoding: str | None = None  # CSV text encoding: utf-8 or cp1252 (Windows-1252)
    sheet: str | None = Field(None, min_length=1)  # the .xlsx sheet to read; absent = the first

    @field_validator("delimiter")
    @classmethod
    def _known_delimiter(cls, value: str | None) -> str | None:
        return None if value is None else parse_delimiter(value)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        return None if value is None else parse_encoding(value)

    @field_validator("fields", mode="before")
    @classmethod
    def _fields_are_a_mapping(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("`fields` must map each column name to {type: text|code|category|number|date}")
        return value

    @model_validator(mode="after")
    def _columns_do_not_collide(self) -> Config:
        for reserved in (self.id_column, self.time_column):
            if reserved is not None and reserved in self.fields:
                raise ValueError(f"column {reserved!r} is the id or time column; remove it from `fields`")
        if not any(spec.match for spec in self.fields.values()):
            raise ValueError("at least one field must have `match: true` for the duplicate model")
        return self

    @property
    def match_fields(self) -> list[str]:
        return [name for name, spec in self.fields.items() if spec.match]

    @property
    def check_fields(self) -> list[str]:
        return [name for name, spec in self.fields.items() if spec.check]

    def required_columns(self) -> list[str]:
        """Columns every records file must have."""
        columns = [self.id_column, *self.fields]
        if self.time_column:
            columns.insert(1, self.time_column)
        return columns


def load_config(path: str | Path) -> Config:
    """Reads and validates a YAML config; raises `ConfigError` naming the file and the key at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__}: {exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping with `name` and `fields`")
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> Config:
    """Validates a config given as a dict (e.g. the copy stored inside a model)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: key `{key}`: {message}") from None

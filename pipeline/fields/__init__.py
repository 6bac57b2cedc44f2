"""Field-type plugins: one per `type` a config may give a field (`text`, `code`, `category`, `number`,
`date`). Each knows how to normalise, compare, block and describe its values; see `base.FieldType`.

>>> field_type("date")("order_date").describe("2024-03-05", "2024-03-07").text
'2 days apart'
"""

from __future__ import annotations

from pipeline.exceptions import ConfigError
from pipeline.fields.base import BlockingKey, Difference, FieldType
from pipeline.fields.category import CategoryField
from pipeline.fields.code import CodeField
from pipeline.fields.date import DateField
from pipeline.fields.number import NumberField
from pipeline.fields.text import TextField

FIELD_TYPES: dict[str, type[FieldType]] = {
    plugin.type_name: plugin for plugin in (TextField, CodeField, CategoryField, NumberField, DateField)
}


def field_type(name: str) -> type[FieldType]:
    """The plugin class for a field type name; `ConfigError` for an unknown one."""
    try:
        return FIELD_TYPES[name]
    except KeyError:
        known = ", ".join(FIELD_TYPES)
        raise ConfigError(f"unknown field type {name!r}; use one of {known}") from None


__all__ = ["FIELD_TYPES", "BlockingKey", "Difference", "FieldType", "field_type"]

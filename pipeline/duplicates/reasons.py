"""Reasons: the one sentence a clerk reads for a duplicate flag.

Fields are named in the order of how much their comparisons move the classifier's score, agreeing ones
first ("same order number and amount"), then the nearest differences ("customer name differs by one
letter"), then when the record was entered relative to its match.

>>> from pipeline.fields import field_type
>>> plugins = [field_type("code")("order_number"), field_type("number")("amount")]
>>> writer = ReasonWriter(plugins, ["order_number", "amount"])
>>> values = {"order_number": "so1", "amount": "12.5"}
>>> writer.reason(values, dict(values), "R1", 2.0)
'same order number and amount; entered 2 days after R1'
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.fields import FieldType
from pipeline.fields.base import Difference

MAX_SAME_IN_REASON = 3
MAX_DIFFERENT_IN_REASON = 3


def importance_order(
    plugins: Sequence[FieldType], variable_fields: Sequence[str], weights: np.ndarray
) -> list[str]:
    """Fields by how much their comparisons move the score: the absolute weights of each field's dedupe
    variables (`variable_fields[i]` is the field of weight i) and of its term-frequency feature (the last
    `len(plugins)` weights), summed; the heaviest first."""
    weight_by_field: dict[str, float] = {plugin.field: 0.0 for plugin in plugins}
    for field, weight in zip(variable_fields, weights, strict=False):
        weight_by_field[field] += abs(float(weight))
    for plugin, weight in zip(plugins, weights[-len(plugins) :], strict=True):
        weight_by_field[plugin.field] += abs(float(weight))
    return sorted(weight_by_field, key=lambda f: -weight_by_field[f])


class ReasonWriter:
    """Writes reasons from normalised values; `order` = the fields in the order they are named."""

    def __init__(self, plugins: Sequence[FieldType], order: Sequence[str]) -> None:
        self.plugins = {plugin.field: plugin for plugin in plugins}
        self.order = list(order)

    def reason(
        self, record: dict[str, str], match: dict[str, str], match_id: str, days_after: float | None
    ) -> str:
        """e.g. "same order number and amount; customer name differs by one letter; entered 2 days after
        R1" (`days_after` None: "looks like R1")."""
        same: list[str] = []
        different: list[tuple[int, str]] = []
        for field in self.order:
            plugin = self.plugins[field]
            difference: Difference = plugin.describe(record[field], match[field])
            if difference.agreement == "same":
                same.append(plugin.label)
            elif difference.agreement != "missing":
                rank = 0 if difference.agreement == "near" else 1
                different.append((rank, f"{plugin.label} {difference.text}"))
        parts: list[str] = []
        if same:
            parts.append("same " + enumerate_fields(same[:MAX_SAME_IN_REASON]))
        different.sort(key=lambda item: item[0])
        parts.extend(text for _, text in different[:MAX_DIFFERENT_IN_REASON])
        parts.append(when(days_after, match_id))
        return "; ".join(parts)


def enumerate_fields(items: list[str]) -> str:
    """`["a"]` -> "a", `["a", "b", "c"]` -> "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def when(days_after: float | None, match_id: str) -> str:
    if days_after is None:
        return f"looks like {match_id}"
    days = round(abs(days_after))
    if days == 0:
        return f"entered the same day as {match_id}"
    unit = "day" if days == 1 else "days"
    return f"entered {days} {unit} {'after' if days_after >= 0 else 'before'} {match_id}"

"""Three-valued logic and the comparison operators.

A condition is True, False or None (unknown). A rule fires only on True. Unknown
comes from values the engine cannot trust (an unknown unit, a `<`/`>` comparator
that does not settle the comparison); it never silently counts as normal.
A comparison with a fact that has no value at all is False.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

Truth = bool | None


def all_of(values: list[Truth]) -> Truth:
    """Kleene AND: False wins, then unknown."""
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def any_of(values: list[Truth]) -> Truth:
    """Kleene OR: True wins, then unknown."""
    if any(v is True for v in values):
        return True
    return None if any(v is None for v in values) else False


def negate(value: Truth) -> Truth:
    """Kleene NOT."""
    return None if value is None else not value


@dataclass(frozen=True)
class Interval:
    """Where a value can lie: an exact value is [v, v]; `>5` is (5, inf)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def exact(cls, value: float) -> "Interval":
        return cls(value, value)

    @classmethod
    def from_comparator(cls, value: float, comparator: str | None) -> "Interval":
        """Turn a FHIR Quantity.comparator into the set of values it allows."""
        return {
            None: cls(value, value),
            "<": cls(-math.inf, value, True, True),
            "<=": cls(-math.inf, value, True, False),
            ">": cls(value, math.inf, True, True),
            ">=": cls(value, math.inf, False, True),
        }[comparator]

    @property
    def is_exact(self) -> bool:
        return self.low == self.high and not (self.low_open or self.high_open)

    def scaled(self, factor: float) -> "Interval":
        """Multiply by a positive factor (a unit conversion)."""
        return Interval(self.low * factor, self.high * factor, self.low_open, self.high_open)


def _gt(iv: Interval, t: float) -> Truth:
    if iv.low > t or (iv.low == t and iv.low_open):
        return True
    return False if iv.high <= t else None


def _ge(iv: Interval, t: float) -> Truth:
    if iv.low >= t:
        return True
    return False if (iv.high < t or (iv.high == t and iv.high_open)) else None


def _lt(iv: Interval, t: float) -> Truth:
    if iv.high < t or (iv.high == t and iv.high_open):
        return True
    return False if iv.low >= t else None


def _le(iv: Interval, t: float) -> Truth:
    if iv.high <= t:
        return True
    return False if (iv.low > t or (iv.low == t and iv.low_open)) else None


def _eq(iv: Interval, t: float) -> Truth:
    if iv.is_exact:
        return iv.low == t
    return None if _ge(iv, t) is not False and _le(iv, t) is not False else False


NUMERIC_OPERATORS = {
    "gt": _gt,
    "ge": _ge,
    "lt": _lt,
    "le": _le,
    "eq": _eq,
    "ne": lambda iv, t: negate(_eq(iv, t)),
    "between": lambda iv, bounds: all_of([_ge(iv, bounds[0]), _le(iv, bounds[1])]),
}
TEXT_OPERATORS = {"eq", "ne", "in"}
PRESENCE_OPERATORS = {"present", "absent"}
BOOLEAN_OPERATORS = {"is"}
ALL_OPERATORS = sorted(set(NUMERIC_OPERATORS) | TEXT_OPERATORS | PRESENCE_OPERATORS | BOOLEAN_OPERATORS)

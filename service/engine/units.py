"""One canonical unit per analyte, and the factors that bring lab units to it.

Factors are per analyte because mmol/L <-> mg/dL depends on molar mass
(the conversions are those of clinical chemistry: mmol/L x 4.008 = mg/dL calcium, x 3.097 phosphate). Units are matched case-insensitively on the UCUM
code, falling back to the free-text unit when the code is missing. A unit that is
not in the table makes the value unknown, never normal.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Analyte:
    name: str
    canonical: str
    # lower-cased unit spelling -> factor that multiplies a value in that unit into `canonical`
    factors: dict[str, float]
    _spellings: list[str]

    @property
    def spellings(self) -> list[str]:
        """The units understood, as written in the table (for messages)."""
        return self._spellings

    def factor(self, unit: str | None) -> float | None:
        """Return the factor to canonical for a unit as a lab sent it, or None if unknown."""
        if not unit:
            return None
        return self.factors.get(_fold(unit))

    def convert(self, value: float, from_unit: str | None, to_unit: str) -> float | None:
        """Convert between two units of this analyte; None when either is unknown."""
        source, target = self.factor(from_unit), self.factor(to_unit)
        if source is None or target is None:
            return None
        return value * source / target


def _fold(unit: str) -> str:
    return unit.strip().lower().replace(" ", "")


def _analyte(name: str, canonical: str, factors: dict[str, float]) -> Analyte:
    table = {_fold(unit): factor for unit, factor in factors.items()} | {_fold(canonical): 1.0}
    return Analyte(name, canonical, table, [canonical] + [u for u in factors if u != canonical])


_EGFR = {
    "mL/min/{1.73_m2}": 1.0,
    # Free-text spellings labs put in valueQuantity.unit when they send no UCUM code.
    "mL/min/1.73m2": 1.0,
    "mL/min/1.73_m2": 1.0,
    "mL/min/{1.73m2}": 1.0,
    # Some systems report eGFR in plain mL/min; the issue and CLINICAL.md accept it as the same scale.
    "mL/min": 1.0,
}

ANALYTES: dict[str, Analyte] = {
    a.name: a
    for a in (
        _analyte("calcium", "mg/dL", {"mmol/L": 4.008}),
        _analyte("phosphate", "mg/dL", {"mmol/L": 3.097}),
        _analyte("pth", "pg/mL", {"ng/L": 1.0, "pmol/L": 9.43}),
        _analyte("egfr", "mL/min/{1.73_m2}", _EGFR),
        _analyte("albumin", "g/dL", {"g/L": 0.1}),
    )
}


# UCUM spellings that read badly on a card, and how a clinician writes them.
_DISPLAY = {"mL/min/{1.73_m2}": "mL/min/1.73 m²"}


def display_unit(unit: str) -> str:
    """A unit the way a card shows it: mL/min/{1.73_m2} reads as mL/min/1.73 m²."""
    return _DISPLAY.get(unit, unit)


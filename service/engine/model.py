"""The loaded, checked rule set: immutable, so a request never sees a half-loaded one."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Union

from .templates import Template
from .valuesets import CodeIndex, ValueSet


# --- facts -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ObservationFact:
    """The latest usable Observation from a value set within a look-back window."""

    name: str
    title: str
    valueset: str
    analyte: str
    unit: str
    lookback: timedelta
    default_upper_limit: float | None = None
    plausible: tuple[float, float] | None = None  # outside it (in `unit`) a value is a data error: unknown
    kind = "number"
    attributes = ("uln_multiple", "upper_limit")


@dataclass(frozen=True)
class ConditionFact:
    """A present Condition from a value set."""

    name: str
    title: str
    valueset: str
    kind = "condition"
    attributes = ()


@dataclass(frozen=True)
class ProcedureFact:
    """A completed Procedure from a value set, performed within a look-back window."""

    name: str
    title: str
    valueset: str
    lookback: timedelta
    kind = "condition"  # present / absent
    attributes = ()


@dataclass(frozen=True)
class SustainedFact:
    """Whether an Observation fact has stayed below a threshold for a while (e.g. chronic low eGFR).

    Yes: two usable results below `below`, at least `apart` from each other, within `lookback`,
    and none at or above it between them or since. No: the latest usable result is at or above
    it, or there is none. Unknown: the latest is below it but not for long enough (e.g. possible
    acute kidney injury), or the latest cannot be read.
    """

    name: str
    title: str
    of: str
    below: float
    apart: timedelta
    lookback: timedelta
    too_short: str | None = None  # what a result below the threshold for too short a time may mean, for the trace
    kind = "boolean"
    attributes = ()


@dataclass(frozen=True)
class PatientFact:
    """The patient's age in years or administrative sex."""

    name: str
    title: str
    attribute: str  # "age" | "sex"
    attributes = ()

    @property
    def kind(self) -> str:
        return "number" if self.attribute == "age" else "text"


@dataclass(frozen=True)
class ProductFact:
    """The product of two Observation facts from the most recent pair drawn close together."""

    name: str
    title: str
    of: tuple[str, str]
    within: timedelta
    unit: str
    kind = "number"
    attributes = ()


@dataclass(frozen=True)
class DefinitionFact:
    """A named condition (e.g. kidney failure) that rules use like a yes/no fact."""

    name: str
    title: str
    when: "Expr"
    kind = "boolean"
    attributes = ()


Fact = Union[ObservationFact, ConditionFact, ProcedureFact, SustainedFact, PatientFact, ProductFact, DefinitionFact]


# --- conditions --------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    fact: str
    attribute: str | None
    operator: str
    value: Any

    @property
    def target(self) -> str:
        return f"{self.fact}.{self.attribute}" if self.attribute else self.fact


@dataclass(frozen=True)
class AllOf:
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class NotOf:
    item: "Expr"


Expr = Union[Leaf, AllOf, AnyOf, NotOf]


def facts_in(expr: Expr) -> list[str]:
    """List the fact names an expression reads, in order, without repeats."""
    if isinstance(expr, Leaf):
        return [expr.fact]
    items = (expr.item,) if isinstance(expr, NotOf) else expr.items
    seen: list[str] = []
    for item in items:
        seen += [name for name in facts_in(item) if name not in seen]
    return seen


# --- cards ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetailLine:
    text: Template
    when: Expr | None = None
    facts: tuple[str, ...] = ()  # what the line reads or shows: listed under "Values used" when it renders


@dataclass(frozen=True)
class Action:
    type: str
    description: str
    resource: dict | None = None
    resource_id: str | None = None
    when: "Expr | None" = None  # proposed only when this holds (e.g. order only the missing labs)
    facts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suggestion:
    label: str
    actions: tuple[Action, ...]
    recommended: bool = False


@dataclass(frozen=True)
class Link:
    label: str
    url: str
    type: str = "absolute"


@dataclass(frozen=True)
class CardSpec:
    indicator: str
    summary: Template
    detail: tuple[DetailLine, ...]
    source_label: str | None
    source_url: str | None
    links: tuple[Link, ...]
    suggestions: tuple[Suggestion, ...]
    selection: str | None


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    description: str
    sources: tuple[str, ...]
    when: Expr
    card: CardSpec
    suppresses: tuple[str, ...]
    evidence_facts: tuple[str, ...]  # facts that decide the rule (its `when`) or its summary
    file: str

    @property
    def facts_read(self) -> tuple[str, ...]:
        """Every fact the rule or any part of its card may read (population screening's columns)."""
        names = list(self.evidence_facts)
        names += [n for line in self.card.detail for n in line.facts]
        names += [n for s in self.card.suggestions for a in s.actions for n in a.facts]
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Settings:
    topic_system: str
    source_label: str
    disclaimer: str
    documentation_url: str | None  # with {rule_id}; None = served by this service at /rules/{rule_id}


@dataclass(frozen=True, eq=False)  # identity: one loaded set is one value (and hashable for caches)
class RuleSet:
    rules: tuple[Rule, ...]
    facts: dict[str, Fact]
    valuesets: dict[str, ValueSet]
    settings: Settings
    code_index: CodeIndex
    fingerprint: str
    loaded_at: datetime
    directory: str
    suppressors: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rule id -> ids that suppress it

    def rule(self, rule_id: str) -> Rule | None:
        """Return the rule with this id, if loaded."""
        return next((r for r in self.rules if r.id == rule_id), None)

    def observation_valuesets(self) -> list[str]:
        """Value sets that Observation facts read, for prefetch templates."""
        return sorted({f.valueset for f in self.facts.values() if isinstance(f, ObservationFact)})

    def condition_valuesets(self) -> list[str]:
        """Value sets that Condition facts read, for prefetch templates."""
        return sorted({f.valueset for f in self.facts.values() if isinstance(f, ConditionFact)})

    def procedure_valuesets(self) -> list[str]:
        """Value sets that Procedure facts read, for prefetch templates."""
        return sorted({f.valueset for f in self.facts.values() if isinstance(f, ProcedureFact)})

    def needs_patient(self) -> bool:
        """Say whether any fact reads the Patient resource."""
        return any(isinstance(f, PatientFact) for f in self.facts.values())

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
class OrderFact:
    """A draft order in the hook context (order-select, order-sign) whose code is in a value set."""

    name: str
    title: str
    valueset: str
    kind = "condition"  # present / absent, like a Condition
    attributes = ()


@dataclass(frozen=True)
class DefinitionFact:
    """A named condition (e.g. kidney failure) that rules use like a yes/no fact."""

    name: str
    title: str
    when: "Expr"
    kind = "boolean"
    attributes = ()


Fact = Union[ObservationFact, ConditionFact, ProcedureFact, SustainedFact, PatientFact, ProductFact, OrderFact, DefinitionFact]

HOOKS = ("patient-view", "order-select", "order-sign")
ORDER_HOOKS = ("order-select", "order-sign")


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
    order: str | None = None  # the order fact whose matched draft the action is about ({fact.id})
    copy_fields: tuple[str, ...] = ()  # fields copied from that draft into a created resource


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
    # (indicator, condition, facts it reads): the card takes the highest indicator whose condition holds.
    escalate: tuple[tuple[str, Expr, tuple[str, ...]], ...] = ()


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
    hooks: tuple[str, ...] = ("patient-view",)

    def serves(self, hook: str) -> bool:
        """Say whether the rule is evaluated for this hook."""
        return hook in self.hooks
    override_reasons: tuple[str, ...] = ()  # codes offered on the card (settings' list, or the rule's narrower one)
    snooze: dict[str, timedelta] = field(default_factory=dict)  # override reason code -> how long the card stays quiet
    # Hash of the rule's `when` and `card`: a snooze set against one version ends when either is edited.
    snooze_fingerprint: str = ""

    @property
    def facts_read(self) -> tuple[str, ...]:
        """Every fact the rule or any part of its card may read (population screening's columns)."""
        names = list(self.evidence_facts)
        names += [n for line in self.card.detail for n in line.facts]
        names += [n for s in self.card.suggestions for a in s.actions for n in a.facts]
        names += [n for _, _, facts in self.card.escalate for n in facts]
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class OverrideReason:
    """A reason a clinician may give for dismissing a card: a Coding under the settings' system."""

    code: str
    display: str


@dataclass(frozen=True)
class Settings:
    topic_system: str
    source_label: str
    disclaimer: str
    documentation_url: str | None  # with {rule_id}; None = served by this service at /rules/{rule_id}
    override_system: str | None = None
    override_reasons: tuple[OverrideReason, ...] = ()

    def override_codings(self, codes: tuple[str, ...]) -> list[dict]:
        """CDS Hooks Coding objects for these reason codes, in the settings' order."""
        wanted = set(codes)
        return [
            {"system": self.override_system, "code": r.code, "display": r.display}
            for r in self.override_reasons if r.code in wanted
        ]


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

    def rules_for(self, hook: str | None) -> tuple[Rule, ...]:
        """The rules that serve a hook (all rules when hook is None)."""
        return self.rules if hook is None else tuple(r for r in self.rules if r.serves(hook))

    def facts_for(self, hook: str | None) -> list[Fact]:
        """The facts the rules serving a hook may read (every fact when hook is None)."""
        if hook is None:
            return list(self.facts.values())
        names = dict.fromkeys(n for r in self.rules_for(hook) for n in r.facts_read)
        return [self.facts[n] for n in names if n in self.facts]

    def observation_valuesets(self, hook: str | None = None) -> list[str]:
        """Value sets that Observation facts read, for prefetch templates."""
        return sorted({f.valueset for f in self.facts_for(hook) if isinstance(f, ObservationFact)} | self._product_parts(hook))

    def _product_parts(self, hook: str | None) -> set[str]:
        parts = set()
        for fact in self.facts_for(hook):
            if isinstance(fact, ProductFact):
                parts |= {self.facts[n].valueset for n in fact.of if isinstance(self.facts.get(n), ObservationFact)}
            elif isinstance(fact, SustainedFact) and isinstance(self.facts.get(fact.of), ObservationFact):
                parts.add(self.facts[fact.of].valueset)
        return parts

    def condition_valuesets(self, hook: str | None = None) -> list[str]:
        """Value sets that Condition facts read, for prefetch templates."""
        return sorted({f.valueset for f in self.facts_for(hook) if isinstance(f, ConditionFact)})

    def procedure_valuesets(self, hook: str | None = None) -> list[str]:
        """Value sets that Procedure facts read, for prefetch templates."""
        return sorted({f.valueset for f in self.facts_for(hook) if isinstance(f, ProcedureFact)})

    def needs_patient(self, hook: str | None = None) -> bool:
        """Say whether any fact reads the Patient resource."""
        return any(isinstance(f, PatientFact) for f in self.facts_for(hook))

"""Evaluate a rule set over one patient record: facts once, rules in order, a trace for each.

Every fact is computed at most once per evaluation and shared by all rules; the
record has already indexed resources by code, so no rule scans all Observations.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .facts import Evidence, FactComputer, FactValue, bound_prefix
from .logic import NUMERIC_OPERATORS, Interval, Truth, all_of, any_of, negate
from .model import AllOf, Expr, Leaf, NotOf, OrderFact, Rule, RuleSet
from .record import Record
from .templates import WIDTHS, Placeholder, format_number

__all__ = ["Evaluation", "Evaluator", "Evidence", "FactValue", "Finding", "evaluate"]


@dataclass
class Finding:
    """What a rule decided for this patient, and why."""

    rule: Rule
    result: Truth
    trace: dict
    suppressed_by: str | None = None

    @property
    def fired(self) -> bool:
        return self.result is True and self.suppressed_by is None


@dataclass
class Evaluation:
    findings: list[Finding]
    evaluator: "Evaluator"

    @property
    def fired(self) -> list[Finding]:
        return [f for f in self.findings if f.fired]


def evaluate(ruleset: RuleSet, record: Record, now: datetime, hook: str | None = None) -> Evaluation:
    """Run the rules serving `hook` (every rule if None) over the record at time `now`, then apply suppression."""
    evaluator = Evaluator(ruleset, record, now)
    findings = [evaluator.run(rule) for rule in ruleset.rules_for(hook)]
    true_ids = {f.rule.id for f in findings if f.result is True}
    # A rule is suppressed by any suppressor that itself fired; the loader forbids cycles,
    # so resolving in dependency order terminates.
    resolved: dict[str, bool] = {}

    def fires(rule_id: str) -> bool:
        if rule_id not in by_id:  # a rule that does not serve this hook suppresses nothing here
            return False
        if rule_id not in resolved:
            suppressor = next((s for s in ruleset.suppressors.get(rule_id, ()) if fires(s)), None)
            resolved[rule_id] = rule_id in true_ids and suppressor is None
            by_id[rule_id].suppressed_by = suppressor if rule_id in true_ids else None
        return resolved[rule_id]

    by_id = {f.rule.id: f for f in findings}
    for finding in findings:
        fires(finding.rule.id)
    return Evaluation(findings, evaluator)


class Evaluator:
    def __init__(self, ruleset: RuleSet, record: Record, now: datetime) -> None:
        self.ruleset = ruleset
        self.record = record
        self.now = now
        self._facts: dict[str, FactValue] = {}
        self._computer = FactComputer(ruleset, record, now, self.test)

    # --- rules and conditions ------------------------------------------------------------

    def run(self, rule: Rule) -> Finding:
        """Decide one rule."""
        result, trace = self.test(rule.when)
        return Finding(rule, result, trace)

    def test(self, expr: Expr) -> tuple[Truth, dict]:
        """Decide a condition; return the result and a trace a rule author can read."""
        if isinstance(expr, Leaf):
            return self._leaf(expr)
        if isinstance(expr, NotOf):
            inner, trace = self.test(expr.item)
            return negate(inner), {"not": trace, "result": negate(inner)}
        outcomes = [self.test(item) for item in expr.items]
        combine, key = (all_of, "all") if isinstance(expr, AllOf) else (any_of, "any")
        result = combine([r for r, _ in outcomes])
        return result, {key: [t for _, t in outcomes], "result": result}

    def _leaf(self, leaf: Leaf) -> tuple[Truth, dict]:
        fact = self.value_of(leaf.fact, leaf.attribute)
        op = leaf.operator
        if op in ("present", "absent") and fact.state == "unknown" and (not fact.exists or isinstance(self.ruleset.facts.get(leaf.fact), OrderFact)):
            # e.g. a matching Condition that cannot be read, or a draft order whose code cannot: maybe present
            result: Truth = None
        elif op == "present":
            result = fact.state != "absent"
        elif op == "absent":
            result = fact.state == "absent"
        elif fact.state == "absent":
            result = False
        elif fact.state == "unknown" or fact.value is None:
            result = None
        elif op in NUMERIC_OPERATORS and isinstance(fact.interval, Interval):
            result = NUMERIC_OPERATORS[op](fact.interval, leaf.value)
        elif op == "is":
            result = fact.value is leaf.value
        elif op == "in":
            result = str(fact.value).lower() in {str(v).lower() for v in leaf.value}
        else:  # text eq / ne
            same = str(fact.value).lower() == str(leaf.value).lower()
            result = same if op == "eq" else not same
        trace = {"fact": leaf.target, "operator": op, "actual": fact.shown, "result": result}
        if leaf.value is not None:
            trace["value"] = leaf.value
        if fact.state != "found" and fact.notes:
            trace["why"] = fact.notes[-1]
        return result, trace

    # --- facts -------------------------------------------------------------------------------

    def value_of(self, name: str, attribute: str | None = None) -> FactValue:
        """Return a fact (or one of its attributes), computing it once per evaluation."""
        if name not in self._facts:
            self._facts[name] = self._computer.compute(name)
        fact = self._facts[name]
        if not attribute:
            return fact
        if fact.state == "absent":
            return FactValue(f"{name}.{attribute}", fact.title, "absent", notes=fact.notes)
        return fact.attributes.get(attribute) or FactValue(
            f"{name}.{attribute}", fact.title, "unknown", notes=[f"{attribute} not available"]
        )

    def computed(self) -> dict[str, FactValue]:
        """Facts computed so far, for explanations."""
        return dict(self._facts)


    # --- rendering -----------------------------------------------------------------------

    def lookup(self, placeholder: Placeholder) -> object:
        """Resolve a template placeholder to a value."""
        if placeholder.absent_of:
            titles = [self.value_of(n).title for n in placeholder.absent_of if self.value_of(n).state == "absent"]
            return ", ".join(titles[:-1]) + (" and " if len(titles) > 1 else "") + titles[-1] if titles else "none"
        fact = self.value_of(placeholder.fact)
        attribute = placeholder.attribute or "value"
        if fact.state == "absent":
            return "none"
        if attribute == "value":
            if fact.interval is not None and not fact.interval.is_exact and fact.value is not None:
                prefix = bound_prefix(fact.interval)
                text = prefix + format_number(float(fact.value), placeholder.number_format)
                # Never let the width clamp cut a number: fall back to a short scientific form.
                return text if len(text) <= WIDTHS["value"] else f"{prefix}{float(fact.value):.1e}"
            return fact.value
        if attribute == "unit":
            return fact.unit
        if attribute == "date":
            return fact.date
        if attribute == "sent":
            return fact.evidence[0].sent if fact.evidence else None
        sub = fact.attributes.get(attribute)
        return sub.value if sub is not None and sub.state == "found" else None


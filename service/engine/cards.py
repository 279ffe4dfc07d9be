"""Card content for a fired rule: text rendered from templates, plus the values that made it fire.

This is content only (snake_case, no uuids); `service.cds_hooks.cards` turns it into a
CDS Hooks card and enforces the spec's shape.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from .evaluate import Evaluator, FactValue, Finding
from .model import Action, Link, OrderFact, RuleSet, Suggestion
from .templates import escape_markdown, format_number

SUMMARY_LIMIT = 139  # CDS Hooks: "<140-character summary"
_RANK = {"info": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class CardContent:
    rule_id: str
    rule_title: str
    indicator: str
    summary: str
    detail: str
    source_label: str
    source_url: str | None
    links: tuple[Link, ...]
    suggestions: tuple[Suggestion, ...]
    selection: str | None


def render_card(finding: Finding, evaluator: Evaluator, ruleset: RuleSet) -> CardContent:
    """Render the card of a fired rule."""
    rule, card = finding.rule, finding.rule.card
    summary = card.summary.render(evaluator.lookup, markdown=False)
    if len(summary) > SUMMARY_LIMIT:  # the loader proves this cannot happen; keep the spec promise regardless
        summary = summary[: SUMMARY_LIMIT - 1] + "…"
    # "Values used" lists what decided the card and what the lines and actions shown read.
    read = list(rule.evidence_facts)
    indicator = card.indicator
    for level, when, facts in card.escalate:  # the loader keeps only levels above the card's own
        if evaluator.test(when)[0] is True and _RANK[level] > _RANK[indicator]:
            indicator = level
            read += facts
    lines = []
    for line in card.detail:
        if line.when is None or evaluator.test(line.when)[0] is True:
            lines.append(line.text.render(evaluator.lookup, markdown=True))
            read += line.facts
    suggestions = []
    for suggestion in card.suggestions:
        actions = tuple(
            resolved
            for a in suggestion.actions
            if a.when is None or evaluator.test(a.when)[0] is True
            for resolved in _resolve_order(a, evaluator, ruleset)
        )
        if actions:
            suggestions.append(Suggestion(suggestion.label, actions, suggestion.recommended))
            read += [name for a in actions for name in a.facts]
    values = values_used(tuple(dict.fromkeys(read)), evaluator)
    if values:
        lines += ["", "**Values used**", ""] + values
    if ruleset.settings.disclaimer:
        lines += ["", f"_{ruleset.settings.disclaimer}_"]
    return CardContent(
        rule_id=rule.id,
        rule_title=rule.title,
        indicator=indicator,
        summary=summary,
        detail=_markdown(lines),
        source_label=card.source_label or ruleset.settings.source_label,
        source_url=card.source_url,
        links=card.links,
        suggestions=tuple(suggestions),
        selection=card.selection or ("at-most-one" if suggestions else None),
    )


def _resolve_order(action: Action, evaluator: Evaluator, ruleset: RuleSet) -> list[Action]:
    """Fill in what an action takes from the matched draft order(s); none if no order matched.

    delete: one action per matched draft (resourceId = Type/id); update: the draft with the
    rule's fields laid over it, keeping its id; create: the rule's resource plus the fields
    it copies from the first matched draft, when that draft has them.
    """
    if action.order is None:
        return [action]
    spec = ruleset.facts[action.order]
    assert isinstance(spec, OrderFact)
    if evaluator.value_of(action.order).state != "found":
        return []
    drafts = list(evaluator.record.orders(spec.valueset))
    if action.type == "delete":
        return [replace(action, resource_id=d.reference, order=None) for d in drafts]
    draft = drafts[0]
    if action.type == "update":
        resource = copy.deepcopy(draft.resource) | copy.deepcopy(action.resource or {})
        resource["resourceType"], resource["id"] = draft.resource_type, draft.resource_id
        return [replace(action, resource=resource, order=None)]
    resource = copy.deepcopy(action.resource or {})
    copied = tuple(f for f in action.copy_fields if draft.resource.get(f) not in (None, [], {}, ""))
    if draft.resource_type == "MedicationRequest":
        copied = tuple(f for f in copied if f != "bodySite")  # a MedicationRequest has no body site
    for name in copied:
        resource[name] = copy.deepcopy(draft.resource[name])
    return [replace(action, resource=resource, order=None, copy_fields=copied)]


def values_used(names: tuple[str, ...], evaluator: Evaluator) -> list[str]:
    """List, as Markdown bullets, each value a card read: value, unit, date and source resource.

    A result shown once (say, as half of the Ca x P pair) is not listed again; a result
    above its reference range carries its multiple of the upper limit wherever it is shown.
    """
    facts = [fact for name in names if (fact := evaluator.value_of(name)).state != "absent"]
    above = {fact.evidence[0].reference: _above_limit(fact) for fact in facts if fact.evidence and _above_limit(fact)}
    shown: set[str] = set()
    lines: list[str] = []
    for fact in facts:
        if fact.state == "unknown":
            why = fact.notes[-1] if fact.notes else "the value could not be read"
            lines.append(f"- {fact.title}: unknown ({escape_markdown(why)})")
            continue
        if len(fact.evidence) > 1 and isinstance(fact.value, (int, float)):  # a derived product
            lines.append(f"- {fact.title}: {fact.shown}, from")
            lines += [f"  - {_evidence_line(e)}{above.get(e.reference, '')}" for e in fact.evidence]
        elif not fact.evidence or (fact.evidence[0].sent is None and fact.evidence[0].reference.startswith("Patient/")):
            lines.append(f"- {fact.title}: {escape_markdown(fact.shown)}")
        elif fact.evidence[0].reference in shown:
            continue
        else:
            lines += [f"- {_evidence_line(e)}{above.get(e.reference, '')}" for e in fact.evidence]
        shown.update(e.reference for e in fact.evidence)
    return lines


def _above_limit(fact: FactValue) -> str:
    """'; 6.9 x the upper limit (65 pg/mL, from ...)' for a result above its reference range."""
    multiple = fact.attributes.get("uln_multiple")
    if multiple is None or multiple.state != "found" or not isinstance(multiple.value, (int, float)) or multiple.value <= 1:
        return ""
    limit = fact.attributes["upper_limit"]
    return f"; {format_number(multiple.value)} x the upper limit ({format_number(limit.value)} {fact.unit}, {limit.notes[0]})"


def _evidence_line(e) -> str:
    date = e.date.date().isoformat() if e.date else "date not recorded"
    if e.sent is None and e.reference.startswith(("ServiceRequest/", "MedicationRequest/")):
        return f"{e.title}: {escape_markdown(e.display or '')} ({_code(e.code)}), draft order {escape_markdown(e.reference)}"
    if e.sent is None:  # a Condition
        return f"{e.title}: {escape_markdown(e.display or '')} ({_code(e.code)}), recorded {date}, {e.reference}"
    return f"{e.title}: {e.normalised or 'unit not understood'} on {date} (sent as {escape_markdown(e.sent)}; {e.reference})"


def _markdown(lines: list[str]) -> str:
    """Join lines as GitHub-flavoured Markdown: list items stay together, paragraphs get a blank line."""
    out: list[str] = []
    for line in lines:
        if out and line and not (line.lstrip().startswith("- ") and out[-1].lstrip().startswith("- ")) and out[-1] != "":
            out.append("")
        out.append(line)
    return "\n".join(out).strip()


_SYSTEMS = {
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED CT",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
}


def _code(token: str | None) -> str:
    system, _, code = (token or "").rpartition("|")
    return f"{_SYSTEMS.get(system, system)} {code}".strip()



__all__ = ["CardContent", "render_card", "values_used", "Action", "Link", "Suggestion"]

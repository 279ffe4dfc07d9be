"""Turn card content into CDS Hooks 2.0 cards ("Card Attributes"), enforcing the spec's shape.

Every card gets a uuid, a summary under 140 characters, an indicator from the enum,
a source with label, url and topic (code = rule id); suggestions get uuids and the
card a selectionBehavior; the rule's override reasons go out as Coding objects;
optional fields are omitted rather than sent empty.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

from service.engine.cards import CardContent
from service.engine.model import Settings
from service.patient.validation import validation_error

log = logging.getLogger(__name__)

INDICATORS = ("info", "warning", "critical")


def _compact(mapping: dict) -> dict:
    """Drop optional fields that are empty: the spec says omit, never send null."""
    return {k: v for k, v in mapping.items() if v not in (None, "", [], {})}


def to_cds_card(
    content: CardContent,
    *,
    patient_id: str,
    settings: Settings,
    documentation_url: Callable[[str], str],
    new_uuid: Callable[[], str],
    override_reasons: list[dict] | None = None,
    encounter_id: str | None = None,
    log_context: dict | None = None,
) -> dict:
    """Build one spec-true card."""
    assert content.indicator in INDICATORS and len(content.summary) < 140
    suggestions = []
    for s in content.suggestions:
        actions = [a for a in (_action(a, patient_id, encounter_id, content.rule_id, log_context or {}) for a in s.actions) if a]
        if actions:
            suggestions.append(_compact({
                "label": s.label,
                "uuid": new_uuid(),
                "isRecommended": True if s.recommended else None,
                "actions": actions,
            }))
    source = _compact(
        {
            "label": content.source_label,
            "url": content.source_url or documentation_url(content.rule_id),
            "topic": {"system": settings.topic_system, "code": content.rule_id, "display": content.rule_title},
        }
    )
    links = [
        _compact({"label": l.label, "url": documentation_url(content.rule_id) if l.url == "{documentation}" else l.url, "type": l.type})
        for l in content.links
    ]
    return _compact(
        {
            "uuid": new_uuid(),
            "summary": content.summary,
            "indicator": content.indicator,
            "detail": content.detail,
            "source": source,
            "suggestions": suggestions,
            "selectionBehavior": (content.selection or "at-most-one") if suggestions else None,
            "links": links,
            # CDS Hooks 2.0 Card.overrideReasons: Codings the client may offer when the card is dismissed.
            "overrideReasons": override_reasons,
        }
    )


def _action(action, patient_id: str, encounter_id: str | None, rule_id: str, log_context: dict) -> dict | None:
    """One action ("Action" in the spec): create carries resource, update resource with the
    draft's id, delete resourceId. A resource that is not valid FHIR R4 never leaves: fields
    copied from a draft are dropped first, and an action still invalid is left out (logged).
    """
    resource = None
    if action.type in ("create", "update") and action.resource is not None:
        resource = copy.deepcopy(action.resource)
        # Orders proposed for this patient; rule files cannot know the id.
        if resource.get("resourceType") == "ServiceRequest" and action.type == "create":
            resource.setdefault("subject", {"reference": f"Patient/{patient_id}"})
            if encounter_id:
                resource.setdefault("encounter", {"reference": f"Encounter/{encounter_id}"})
        problem = validation_error(resource)
        if problem and getattr(action, "copy_fields", ()):
            for name in action.copy_fields:
                resource.pop(name, None)
            log.warning("fields copied from a draft order made the proposal invalid; sent without them",
                        extra={"event": "draft_fields_dropped", "rule": rule_id, "fields": list(action.copy_fields), "problem": problem, **log_context})
            problem = validation_error(resource)
        if problem:
            log.warning("suggested action left out: its resource is not valid FHIR R4",
                        extra={"event": "invalid_action_resource", "rule": rule_id, "type": action.type, "problem": problem, **log_context})
            return None
    return _compact({"type": action.type, "description": action.description, "resource": resource, "resourceId": action.resource_id})

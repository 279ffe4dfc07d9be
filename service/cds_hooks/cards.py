"""Turn card content into CDS Hooks 2.0 cards ("Card Attributes"), enforcing the spec's shape.

Every card gets a uuid, a summary under 140 characters, an indicator from the enum,
a source with label, url and topic (code = rule id); suggestions get uuids and the
card a selectionBehavior; the rule's override reasons go out as Coding objects;
optional fields are omitted rather than sent empty.
"""
from __future__ import annotations

import copy
from typing import Callable

from service.engine.cards import CardContent
from service.engine.model import Settings

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
) -> dict:
    """Build one spec-true card."""
    assert content.indicator in INDICATORS and len(content.summary) < 140
    suggestions = [
        _compact(
            {
                "label": s.label,
                "uuid": new_uuid(),
                "isRecommended": True if s.recommended else None,
                "actions": [_action(a, patient_id) for a in s.actions],
            }
        )
        for s in content.suggestions
    ]
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


def _action(action, patient_id: str) -> dict:
    resource = None
    if action.resource is not None:
        resource = copy.deepcopy(action.resource)
        # Orders proposed for this patient; rule files cannot know the id.
        if resource.get("resourceType") == "ServiceRequest" and "subject" not in resource:
            resource["subject"] = {"reference": f"Patient/{patient_id}"}
    return _compact({"type": action.type, "description": action.description, "resource": resource, "resourceId": action.resource_id})

"""The shape of rule files, enforced with cerberus; meaning is checked in `loader.py`."""
from __future__ import annotations

from .units import ANALYTES

ID = r"^[a-z0-9][a-z0-9-]*$"
FACT_NAME = r"^[a-z][a-z0-9_]*$"
URL = r"^https?://\S+$"

_string = {"type": "string", "empty": False}
HOOKS = ("patient-view", "order-select", "order-sign")
# Fields a created ServiceRequest may take over from the draft it replaces (same meaning in both).
COPYABLE_ORDER_FIELDS = ("reasonCode", "reasonReference", "bodySite", "note")
_strings = {"type": "list", "schema": _string}

SETTINGS = {
    "topic_system": {**_string, "required": True, "regex": r"^(https?|urn):\S+$"},
    "source_label": {**_string, "required": True},
    "disclaimer": {"type": "string"},
    "documentation_url": {**_string, "regex": URL},
    "override_reasons": {
        "type": "dict",
        "schema": {
            "system": {**_string, "required": True, "regex": r"^(https?|urn):\S+$"},
            "reasons": {
                "type": "list",
                "required": True,
                "minlength": 1,
                "schema": {
                    "type": "dict",
                    "schema": {"code": {**_string, "required": True, "regex": ID}, "display": {**_string, "required": True}},
                },
            },
        },
    },
}

VALUESET = {
    "id": {**_string, "required": True, "regex": ID},
    "title": {**_string, "required": True},
    "description": {"type": "string"},
    "codes": {
        "type": "list",
        "required": True,
        "minlength": 1,
        "schema": {
            "type": "dict",
            "schema": {
                "system": {**_string, "required": True, "regex": r"^(https?|urn):\S+$"},
                "code": {**_string, "required": True},
                "display": {"type": "string"},
            },
        },
    },
}

FACT = {
    "title": {**_string, "required": True},
    "observation": _string,
    "analyte": {"type": "string", "allowed": sorted(ANALYTES)},
    "unit": _string,
    "lookback": _string,
    "default_upper_limit": {"type": "number", "min": 0},
    "plausible": {"type": "list", "minlength": 2, "maxlength": 2, "schema": {"type": "number"}},
    "procedure": _string,
    "sustained": _string,
    "below": {"type": "number"},
    "apart": _string,
    "too_short": _string,
    "condition": _string,
    "patient": {"type": "string", "allowed": ["age", "sex"]},
    "product": {"type": "list", "minlength": 2, "maxlength": 2, "schema": _string},
    "within": _string,
    "definition": {"type": "dict"},
    "order": _string,
}
FACT_KINDS = ("observation", "condition", "procedure", "sustained", "patient", "product", "order", "definition")
FACT_KEYS_BY_KIND = {
    "observation": {"analyte", "unit", "lookback", "default_upper_limit", "plausible"},
    "condition": set(),
    "procedure": {"lookback"},
    "sustained": {"below", "apart", "lookback", "too_short"},
    "patient": set(),
    "product": {"within", "unit"},
    "order": set(),
    "definition": set(),
}
FACT_REQUIRED_BY_KIND = {
    # Every lab fact declares its plausible range: a value outside it is a data error, not a finding.
    "observation": {"analyte", "unit", "lookback", "plausible"},
    "procedure": {"lookback"},
    "sustained": {"below", "apart", "lookback"},
    "product": {"within", "unit"},
}

FACTS_FILE = {"facts": {"type": "dict", "required": True, "keysrules": {"type": "string", "regex": FACT_NAME}, "valuesrules": {"type": "dict", "schema": FACT}}}

_action = {
    "type": "dict",
    "schema": {
        "type": {"type": "string", "required": True, "allowed": ["create", "update", "delete"]},
        "description": {**_string, "required": True},
        "resource": {"type": "dict"},
        "resource_id": _string,
        "when": {"type": "dict"},
        # create: copy these fields of the matched draft order into the new resource, when it has them
        "copy_from_order": {
            "type": "dict",
            "schema": {
                "fact": {**_string, "required": True},
                "fields": {"type": "list", "required": True, "minlength": 1, "schema": {"type": "string", "allowed": list(COPYABLE_ORDER_FIELDS)}},
            },
        },
    },
}
CARD = {
    "indicator": {"type": "string", "required": True, "allowed": ["info", "warning", "critical"]},
    "summary": {**_string, "required": True},
    "detail": {"type": "list", "required": True, "minlength": 1, "schema": {"type": ["string", "dict"]}},
    "source": {"type": "dict", "schema": {"label": _string, "url": {**_string, "regex": URL}}},
    "links": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "label": {**_string, "required": True},
                # "{documentation}" stands for this rule's documentation page
                "url": {**_string, "required": True, "regex": r"^(https?://\S+|\{documentation\})$"},
                "type": {"type": "string", "allowed": ["absolute", "smart"]},
            },
        },
    },
    "selection": {"type": "string", "allowed": ["at-most-one", "any"]},
    "escalate": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "indicator": {"type": "string", "required": True, "allowed": ["warning", "critical"]},
                "when": {"type": "dict", "required": True},
            },
        },
    },
    "suggestions": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "label": {**_string, "required": True},
                "recommended": {"type": "boolean"},
                "actions": {"type": "list", "required": True, "minlength": 1, "schema": _action},
            },
        },
    },
}

RULE = {
    "id": {**_string, "required": True, "regex": ID},
    "title": {**_string, "required": True, "maxlength": 100},
    "description": {**_string, "required": True},
    "sources": _strings,
    "facts": FACTS_FILE["facts"] | {"required": False},
    "when": {"type": "dict", "required": True},
    "suppresses": _strings,
    "hooks": {"type": "list", "minlength": 1, "schema": {"type": "string", "allowed": list(HOOKS)}},
    "card": {"type": "dict", "required": True, "schema": CARD},
    "tests": {},  # no longer read: the loader says where expectations live now
    "override_reasons": {"type": "list", "minlength": 1, "schema": {**_string, "regex": ID}},
    "snooze": {"type": "dict", "keysrules": {"type": "string", "regex": ID}, "valuesrules": {"type": "string", "empty": False}},
}
DETAIL_LINE = {"text": {**_string, "required": True}, "when": {"type": "dict", "required": True}}

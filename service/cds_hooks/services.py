"""The registry of CDS services this server offers, keyed by service id (= URL segment).

A service knows its hook and words for discovery; its prefetch templates are derived
from what the loaded rules read, so there is no second list to keep in step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from service.engine.model import RuleSet


@dataclass(frozen=True)
class CdsService:
    id: str
    hook: str
    title: str
    description: str
    usage_requirements: str | None = None


SERVICES = {
    s.id: s
    for s in (
        CdsService(
            id="calcinosis-risk",
            hook="patient-view",
            title="Calciphylaxis risk and calcinosis workup",
            description=(
                "Flags calciphylaxis and metastatic calcification risk from serum calcium, phosphate, "
                "intact PTH and eGFR with kidney-failure and connective-tissue disease conditions, "
                "and suggests the workup (deep incisional biopsy, soft-tissue radiograph, missing labs)."
            ),
            usage_requirements="Needs read access to the patient's Patient, Observation (laboratory), Condition and Procedure resources.",
        ),
        CdsService(
            id="calcinosis-order-select",
            hook="order-select",
            title="Calciphylaxis checks on the orders just selected",
            description=(
                "When a skin punch biopsy, a calcium-based phosphate binder, active vitamin D or a systemic "
                "corticosteroid is selected for a patient with suspected calciphylaxis (or kidney failure with a "
                "high calcium x phosphate product), says why another choice may serve better and offers to "
                "replace or remove the draft order."
            ),
            usage_requirements="Needs read access to the patient's Patient, Observation (laboratory) and Condition resources; reads context.draftOrders and context.selections.",
        ),
        CdsService(
            id="calcinosis-order-sign",
            hook="order-sign",
            title="Calciphylaxis checks before orders are signed",
            description=(
                "Before signing: flags a skin punch biopsy, a calcium-based phosphate binder, active vitamin D or a "
                "systemic corticosteroid among the draft orders of a patient with suspected calciphylaxis (or kidney "
                "failure with a high calcium x phosphate product), and offers to replace or remove the draft order."
            ),
            usage_requirements="Needs read access to the patient's Patient, Observation (laboratory) and Condition resources; reads context.draftOrders.",
        ),
    )
}

PATIENT_TOKEN = "{{context.patientId}}"


@lru_cache(maxsize=16)
def prefetch_templates(ruleset: RuleSet, max_count: int = 100, hook: str = "patient-view") -> dict[str, str]:
    """Derive a hook's prefetch templates from the value sets read by the rules that serve it.

    CDS Hooks 2.0 restricts prefetch queries to token equality, date prefixes, `_count`
    and `_sort`; a value set with ICD-10-CM prefix entries cannot be written as tokens,
    so Conditions are then requested by clinical status alone.
    """
    templates: dict[str, str] = {}
    if ruleset.needs_patient(hook):
        templates["patient"] = f"Patient/{PATIENT_TOKEN}"
    observation_tokens = _tokens(ruleset, ruleset.observation_valuesets(hook))
    if observation_tokens is not None:
        templates["observations"] = (
            f"Observation?patient={PATIENT_TOKEN}&code={','.join(observation_tokens)}&_sort=-date&_count={max_count}"
        )
    condition_sets = ruleset.condition_valuesets(hook)
    if condition_sets:
        tokens = _tokens(ruleset, condition_sets)
        code = f"&code={','.join(tokens)}" if tokens else ""
        templates["conditions"] = f"Condition?patient={PATIENT_TOKEN}&clinical-status=active,recurrence,relapse{code}"
    procedure_sets = ruleset.procedure_valuesets(hook)
    if procedure_sets:
        tokens = _tokens(ruleset, procedure_sets)
        code = f"&code={','.join(tokens)}" if tokens else ""
        # Newest first: the facts look back a bounded time, so the first page holds what they read.
        templates["procedures"] = f"Procedure?patient={PATIENT_TOKEN}&status=completed{code}&_sort=-date&_count={max_count}"
    return templates


def _tokens(ruleset: RuleSet, valueset_ids: list[str]) -> list[str] | None:
    if not valueset_ids:
        return None
    tokens: set[str] = set()
    for vs_id in valueset_ids:
        found = ruleset.valuesets[vs_id].search_tokens()
        if found is None:
            return []
        tokens.update(found)
    return sorted(tokens)

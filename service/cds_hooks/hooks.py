"""Answer one hook call: request -> patient data -> rule engine -> cards."""
from __future__ import annotations

from dataclasses import dataclass

from service import metrics
from service.engine.cards import render_card
from service.engine.evaluate import evaluate
from service.patient.record import PatientRecord, patient_aliases

from .cards import to_cds_card
from .prefetch import resolve
from .request import parse_hook_request
from .services import CdsService, prefetch_templates


@dataclass
class Outcome:
    hook_instance: str
    cards: list[dict]
    rule_ids: list[str]
    skipped_resources: int
    other_patient_resources: int
    unattributed_resources: int  # subject references that name no patient we can tell: dropped, counted
    incomplete: list[str]
    sources: dict[str, str]
    other_patient_orders: int = 0


def answer(service: CdsService, body: object, ext) -> Outcome:
    """Evaluate the loaded rules for the patient in a hook request."""
    hook_request = parse_hook_request(body, service.hook)
    ext.check_fhir_server(hook_request.fhir_server)
    ruleset = ext.rules.current  # one rule set for the whole call, even if a reload lands meanwhile
    log_context = {"hookInstance": hook_request.hook_instance, "service": service.id}
    templates = prefetch_templates(ruleset, ext.config["PREFETCH_COUNT"], service.hook)
    resolved = resolve(hook_request, templates, ext.fetch_settings, log_context)
    record = PatientRecord(
        ruleset.code_index, hook_request.patient_id, log_context=log_context,
        aliases=patient_aliases(hook_request.prefetch.values(), hook_request.patient_id), base_url=hook_request.fhir_server,
    )
    for resources in resolved.resources.values():
        record.add_all(resources)
    orders = hook_request.draft_orders
    if orders is not None:
        record.add_orders(orders.in_scope)
    evaluation = evaluate(ruleset, record, ext.now(), service.hook)
    cards = [
        to_cds_card(
            render_card(finding, evaluation.evaluator, ruleset),
            patient_id=hook_request.patient_id,
            encounter_id=hook_request.encounter_id,
            settings=ruleset.settings,
            documentation_url=ext.documentation_url,
            new_uuid=ext.new_uuid,
            log_context=log_context,
        )
        for finding in evaluation.fired
    ]
    rule_ids = [f.rule.id for f in evaluation.fired]
    if record.skipped:
        metrics.INVALID_RESOURCES.inc(record.skipped)
    ext.cards_issued(hook_request.hook_instance, service.id, cards, rule_ids)
    return Outcome(
        hook_request.hook_instance, cards, rule_ids, record.skipped, record.other_patient, record.unattributed, resolved.incomplete, resolved.sources,
        orders.other_patient if orders is not None else 0,
    )

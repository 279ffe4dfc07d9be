"""Answer one hook call: request -> patient data -> rule engine -> cards, less any snoozed ones."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from service import metrics
from service.engine.cards import render_card
from service.engine.evaluate import evaluate
from service.patient.record import PatientRecord, patient_aliases

from .cards import to_cds_card
from .prefetch import resolve
from .request import parse_hook_request
from .services import CdsService, prefetch_templates

log = logging.getLogger(__name__)


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
    withheld: list[str] | None = None  # rules whose card a snooze kept back
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
        full_validation=ext.config["VALIDATION"] == "full",
    )
    for resources in resolved.resources.values():
        record.add_all(resources)
    orders = hook_request.draft_orders
    if orders is not None:
        record.add_orders(orders.in_scope)
    evaluation = evaluate(ruleset, record, ext.now(), service.hook)
    rendered = [(finding.rule, render_card(finding, evaluation.evaluator, ruleset)) for finding in evaluation.fired]
    patient = ext.patient_key(hook_request.patient_id, hook_request.fhir_server)
    withheld = withhold_snoozed(ext, service.id, hook_request.hook_instance, patient, rendered) if rendered else set()
    kept = [(rule, content) for rule, content in rendered if rule.id not in withheld]
    cards = [
        to_cds_card(
            content,
            patient_id=hook_request.patient_id,
            encounter_id=hook_request.encounter_id,
            settings=ruleset.settings,
            documentation_url=ext.documentation_url,
            new_uuid=ext.new_uuid,
            override_reasons=ruleset.settings.override_codings(rule.override_reasons),
            log_context=log_context,
        )
        for rule, content in kept
    ]
    rule_ids = [rule.id for rule, _ in kept]
    if record.skipped:
        metrics.INVALID_RESOURCES.inc(record.skipped)
    ext.cards_issued(hook_request.hook_instance, service.id, cards, rule_ids, patient, [rule.snooze_fingerprint for rule, _ in kept])
    return Outcome(
        hook_request.hook_instance, cards, rule_ids, record.skipped, record.other_patient, record.unattributed,
        resolved.incomplete, resolved.sources, sorted(withheld),
        orders.other_patient if orders is not None else 0,
    )


def withhold_snoozed(ext, service_id: str, hook_instance: str, patient: str, rendered: list) -> set[str]:
    """Return the ids of rules whose card a snooze keeps back; lift snoozes that no longer hold.

    A snooze ends when it expires, when the rule's `when` or card changed since the
    overridden card, or when the rule now raises a card with a higher indicator.
    """
    snoozes = ext.store.snoozes_for(service_id, patient, [rule.id for rule, _ in rendered])
    if not snoozes:
        return set()
    now = ext.now()
    withheld, applied = set(), []
    for rule, content in rendered:
        snooze = snoozes.get(rule.id)
        if snooze is None:
            continue
        cause = snooze.ends_because(now, rule.snooze_fingerprint, content.indicator)
        fields = {"hookInstance": hook_instance, "service": service_id, "rule": rule.id, "reason": snooze.reason, "until": snooze.until.isoformat()}
        if cause is not None:
            ext.store.lift_snooze(snooze)
            log.info("snooze lifted", extra={"event": "snooze_lifted", **fields, "cause": cause})
            continue
        withheld.add(rule.id)
        applied.append(snooze)
        metrics.WITHHELD_BY_SNOOZE.labels(rule.id).inc()
        log.info("snooze applied", extra={"event": "snooze_applied", **fields})
    ext.store.record_withheld(service_id, hook_instance, applied, now)
    return withheld

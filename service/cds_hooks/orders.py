"""Read the draft orders of an order-select / order-sign request (CDS Hooks 2.0 hooks library).

Context fields: `draftOrders`, a FHIR Bundle of the orders being written, and, for
order-select, `selections`, the "Type/id" of the orders just selected. Cards concern
only the orders in scope: the selected ones (order-select) or all of them (order-sign).

What is checked strictly, because actions and selections name orders by id: the Bundle's
shape, each order's id (present, unique), the JSON types of the fields read (subject,
code, medication). What is read leniently: everything else. A draft order about another
patient is ignored and counted; an order whose code cannot be found (no code, or a
Medication reference that is not in the request) matches no value set and makes the
facts that look for orders unknown, not absent.
"""
from __future__ import annotations

from dataclasses import dataclass

from service.engine.record import OrderEntry
from service.errors import BadRequest

ORDER_TYPES = ("ServiceRequest", "MedicationRequest")
MAX_DRAFT_ORDERS = 200  # entries in draftOrders; an order-entry screen holds a handful


@dataclass(frozen=True)
class DraftOrders:
    in_scope: tuple[OrderEntry, ...]
    orders: int  # ServiceRequest and MedicationRequest entries about this patient
    other_patient: int  # ... about another patient: ignored
    other_types: int  # NutritionOrder, VisionPrescription, ...: not read
    selections: tuple[str, ...] = ()


def _bad(message: str, field: str, code: str = "invalid_request") -> BadRequest:
    return BadRequest(message, code=code, field=field)


def parse_draft_orders(context: dict, hook: str, patient_id: str) -> DraftOrders:
    """Check `draftOrders` (and `selections` for order-select); raise BadRequest naming the field."""
    where = "context.draftOrders"
    bundle = context.get("draftOrders")
    if bundle is None:
        raise _bad(f"{where} is missing: {hook} needs the draft orders as a FHIR Bundle", where)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise _bad(f"{where} must be a FHIR Bundle (an object with resourceType Bundle)", where)
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise _bad(f"{where}.entry must be a list", f"{where}.entry")
    if len(entries) > MAX_DRAFT_ORDERS:
        raise _bad(f"{where} holds {len(entries)} entries; at most {MAX_DRAFT_ORDERS} are read", f"{where}.entry", "too_many_draft_orders")
    encounter = context.get("encounterId")
    if encounter is not None and (not isinstance(encounter, str) or not encounter.strip()):
        raise _bad("context.encounterId must be a non-empty string when given", "context.encounterId")

    resources: list[tuple[int, dict]] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise _bad(f"{where}.entry[{i}] must hold a FHIR resource", f"{where}.entry[{i}].resource")
        resources.append((i, resource))
    medications = {
        f"Medication/{r['id']}": r for _, r in resources
        if r["resourceType"] == "Medication" and isinstance(r.get("id"), str)
    }
    medications |= {
        e["fullUrl"]: e["resource"] for e in entries
        if isinstance(e.get("fullUrl"), str) and e["resource"].get("resourceType") == "Medication"
    }

    known: set[str] = set()  # every Type/id in the bundle, for selections
    orders: list[OrderEntry] = []
    other_patient = other_types = 0
    for i, resource in resources:
        kind, at = resource["resourceType"], f"{where}.entry[{i}].resource"
        rid = resource.get("id")
        if kind not in ORDER_TYPES:
            if isinstance(rid, str):
                known.add(f"{kind}/{rid}")
            other_types += kind != "Medication"
            continue
        if not isinstance(rid, str) or not rid.strip():
            raise _bad(f"{at}.id is missing: a draft {kind} needs an id so that selections and suggestions can name it", f"{at}.id")
        reference = f"{kind}/{rid}"
        if reference in known:
            raise _bad(f"{at}.id: {reference} appears twice in {where}", f"{at}.id")
        known.add(reference)
        if _subject_id(resource, at) not in (None, patient_id):
            other_patient += 1
            continue
        codings, text, problem = (_service_code if kind == "ServiceRequest" else _medication_code)(resource, at, medications)
        orders.append(OrderEntry(kind, rid, codings, text, resource, problem))

    selections: tuple[str, ...] = ()
    if hook == "order-select":
        selections = _selections(context, known)
        scope = [o for o in orders if o.reference in selections]
    else:
        scope = orders
    return DraftOrders(tuple(scope), len(orders), other_patient, other_types, selections)


def _selections(context: dict, known: set[str]) -> tuple[str, ...]:
    value = context.get("selections")
    if value is None:
        raise _bad("context.selections is missing: order-select names the orders just selected", "context.selections")
    if not isinstance(value, list) or not value:
        raise _bad("context.selections must be a non-empty list of \"Type/id\" strings", "context.selections")
    for i, item in enumerate(value):
        field = f"context.selections[{i}]"
        if not isinstance(item, str) or not item.strip():
            raise _bad(f"{field} must be a \"Type/id\" string", field)
        if item not in known:
            raise _bad(f"{field} names {item}, which is not in context.draftOrders", field, "unknown_selection")
    return tuple(value)


def _subject_id(resource: dict, at: str) -> str | None:
    """The patient id an order is about, or None when it does not say."""
    subject = resource.get("subject")
    if subject is None:
        return None
    reference = subject.get("reference") if isinstance(subject, dict) else None
    if not isinstance(subject, dict) or not isinstance(reference, (str, type(None))):
        raise _bad(f"{at}.subject must be a Reference", f"{at}.subject")
    if not reference or "Patient/" not in reference:
        return None
    return reference.rsplit("Patient/", 1)[1].split("/")[0]


def _concept(value: object, at: str) -> tuple[tuple[tuple[str, str, str | None], ...], str | None]:
    """The codings and text of a CodeableConcept; raise BadRequest if its JSON types are wrong."""
    if not isinstance(value, dict):
        raise _bad(f"{at} must be a CodeableConcept", at)
    codings = value.get("coding", [])
    text = value.get("text")
    if not isinstance(codings, list) or not isinstance(text, (str, type(None))):
        raise _bad(f"{at} must be a CodeableConcept (coding a list, text a string)", at)
    found = []
    for j, coding in enumerate(codings):
        if not isinstance(coding, dict) or not all(isinstance(coding.get(k), (str, type(None))) for k in ("system", "code", "display")):
            raise _bad(f"{at}.coding[{j}] must be a Coding with string system, code and display", f"{at}.coding[{j}]")
        if coding.get("system") and coding.get("code"):
            found.append((coding["system"], coding["code"].strip(), coding.get("display")))
    return tuple(found), text


def _service_code(resource: dict, at: str, medications: dict) -> tuple[tuple, str | None, str | None]:
    if resource.get("code") is None:
        return (), None, "the ServiceRequest has no code"
    codings, text = _concept(resource["code"], f"{at}.code")
    return codings, text, None if codings else "the ServiceRequest's code has no system and code"


def _medication_code(resource: dict, at: str, medications: dict) -> tuple[tuple, str | None, str | None]:
    if resource.get("medicationCodeableConcept") is not None:
        codings, text = _concept(resource["medicationCodeableConcept"], f"{at}.medicationCodeableConcept")
        return codings, text, None if codings else "the medicationCodeableConcept has no system and code"
    ref = resource.get("medicationReference")
    if ref is None:
        return (), None, "the MedicationRequest names no medication"
    target = ref.get("reference") if isinstance(ref, dict) else None
    if not isinstance(target, str) or not target:
        raise _bad(f"{at}.medicationReference must be a Reference with a reference", f"{at}.medicationReference")
    if target.startswith("#"):
        contained = resource.get("contained", [])
        if not isinstance(contained, list):
            raise _bad(f"{at}.contained must be a list", f"{at}.contained")
        medication = next((c for c in contained if isinstance(c, dict) and c.get("resourceType") == "Medication" and c.get("id") == target[1:]), None)
        where = f"{at}.contained"
    else:
        medication = medications.get(target) or medications.get("Medication/" + target.rsplit("Medication/", 1)[-1])
        where = "context.draftOrders"
    if medication is None:
        # Not fetched from the FHIR server: an order being written rarely points outside the request.
        return (), ref.get("display") if isinstance(ref.get("display"), str) else None, f"medicationReference {target} is not in {where}"
    if medication.get("code") is None:
        return (), None, f"the referenced Medication {target} has no code"
    codings, text = _concept(medication["code"], f"{where}(Medication {target}).code")
    return codings, text, None if codings else f"the referenced Medication {target} has no system and code"

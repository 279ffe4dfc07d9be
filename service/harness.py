"""Run the rules over saved patient data, in-process: for `rules test`, `rules explain` and `replay`.

Inputs it reads:
- a FHIR R4 Bundle (collection, searchset, transaction...) holding one patient's resources;
- a full CDS Hooks request (its prefetch values);
- a folder of those (recursively);
- a FHIR Bulk Data export: NDJSON files, one resource per line, grouped here by patient.
A Bundle's `timestamp` is the time the scenario is evaluated at (fixtures stay true
as the calendar moves on); without one, now.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Iterator

import orjson
import yaml

from service.engine.cards import CardContent, render_card
from service.engine.model import ORDER_HOOKS
from service.engine.record import OrderEntry
from service.engine.evaluate import Evaluation, evaluate
from service.engine.model import RuleSet
from service.patient.dates import parse_datetime
from service.patient.record import PatientRecord, patient_aliases, referenced_patient, resources_in
from service.screening.ndjson import ReadReport, place_group, read_lines, resource_of


class InputError(Exception):
    """A file that is not a Bundle, a hook request or NDJSON; names the file."""


SCENARIOS_FILE = "scenarios.yaml"


@dataclass(frozen=True)
class Expectation:
    """What a saved scenario must give, beside the written reason (fixtures/fhir/scenarios.yaml)."""

    name: str
    expect: tuple[str, ...]  # the rule ids that must fire; every other rule must stay silent
    reason: str
    fhir_server: str | None = None  # why a FHIR server could not serve this data, if it could not


def load_expectations(folder: str | Path) -> dict[str, Expectation]:
    """Read a folder's scenarios.yaml; {} if it has none. Raises InputError naming what is wrong."""
    path = Path(folder) / SCENARIOS_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of file name to {{expect, reason}}")
    found = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("reason"), str) or not entry["reason"].strip():
            raise InputError(f"{path}: {name}: needs a written reason")
        expect = entry.get("expect")
        if not isinstance(expect, list) or not all(isinstance(r, str) for r in expect):
            raise InputError(f"{path}: {name}: expect must be a list of rule ids (an empty list: no card)")
        unknown = set(entry) - {"expect", "reason", "fhir_server"}
        if unknown:
            raise InputError(f"{path}: {name}: unknown key(s) {', '.join(sorted(unknown))}")
        found[str(name)] = Expectation(str(name), tuple(expect), entry["reason"].strip(), entry.get("fhir_server"))
    return found


def expected_rules(case: "Case") -> list[str] | None:
    """The rule ids a case must fire, from scenarios.yaml beside its file; None if it has no expectation."""
    if not case.source or case.source == "bulk export":
        return None
    expectations = _expectations_near(str(Path(case.source).resolve().parent))
    found = expectations.get(case.name)
    return list(found.expect) if found else None


_EXPECTATIONS: dict[str, dict[str, Expectation]] = {}


def _expectations_near(folder: str) -> dict[str, Expectation]:
    if folder not in _EXPECTATIONS:
        _EXPECTATIONS[folder] = load_expectations(folder)
    return _EXPECTATIONS[folder]


@dataclass
class Case:
    name: str
    patient_id: str | None
    resources: list[dict]
    as_of: datetime | None = None
    request: dict | None = None  # the original hook request, when the input was one
    source: str = ""
    aliases: frozenset[str] = frozenset()  # other references meaning the patient (a Bundle entry's fullUrl)
    full_urls: dict[tuple[str, str], str] = field(default_factory=dict)  # (type, id) -> the Bundle entry's fullUrl
    attributed: bool = False  # a Bulk export group: the reader already tied each resource to the patient
    hook: str = "patient-view"
    orders: tuple[OrderEntry, ...] = ()  # order hooks: the draft orders in scope (selected, or all for order-sign)


@dataclass
class CaseResult:
    case: Case
    evaluation: Evaluation
    record: PatientRecord
    cards: list[CardContent] = field(default_factory=list)

    @property
    def fired(self) -> list[str]:
        return [c.rule_id for c in self.cards]


def _subject_id(resource: dict) -> str | None:
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    reference = (resource.get("subject") or resource.get("patient") or {}).get("reference") or ""
    return reference.rsplit("Patient/", 1)[1] if "Patient/" in reference else None


def _bundle_subject_id(resource: dict) -> str | None:
    """The patient id a Bundle resource's subject names (any reference form `referenced_patient` reads)."""
    subject = resource.get("subject") or resource.get("patient")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    return referenced_patient(reference) if isinstance(reference, str) else None


def case_from_json(data: object, name: str, source: str = "") -> Case:
    """Make a case from a parsed Bundle or hook request."""
    if not isinstance(data, dict):
        raise InputError(f"{source or name}: expected a JSON object (a FHIR Bundle or a CDS Hooks request)")
    if "hook" in data and "context" in data:
        prefetch = data.get("prefetch") or {}
        resources = [r for value in prefetch.values() for r in resources_in(value)]
        patient_id = (data.get("context") or {}).get("patientId")
        stamps = [parse_datetime(v.get("timestamp")) for v in prefetch.values() if isinstance(v, dict)]
        as_of = next((s for s in stamps if s), None)
        aliases = frozenset(patient_aliases(prefetch.values(), patient_id))
        hook = data.get("hook")
        orders: tuple[OrderEntry, ...] = ()
        if hook in ORDER_HOOKS:
            from service.cds_hooks.orders import parse_draft_orders
            from service.errors import BadRequest

            try:
                orders = parse_draft_orders(data.get("context") or {}, hook, str(patient_id)).in_scope
            except BadRequest as exc:
                raise InputError(f"{source or name}: {exc.message}") from None
        elif hook != "patient-view":
            raise InputError(f"{source or name}: hook {hook!r} is not one this service answers (patient-view, order-select, order-sign)")
        return Case(name, patient_id, resources, as_of, data, source, aliases, hook=hook, orders=orders)
    if data.get("resourceType") == "Bundle":
        resources = resources_in(data)
        patient_id = next((r.get("id") for r in resources if r.get("resourceType") == "Patient"), None)
        if patient_id is None:
            patient_id = next((pid for r in resources if (pid := _bundle_subject_id(r))), None)
        full_urls = {
            (e["resource"].get("resourceType"), e["resource"].get("id")): e["fullUrl"]
            for e in data.get("entry") or () if isinstance(e, dict) and isinstance(e.get("resource"), dict) and isinstance(e.get("fullUrl"), str)
        }
        aliases = frozenset(patient_aliases([data], patient_id))
        return Case(name, patient_id, resources, parse_datetime(data.get("timestamp")), None, source, aliases, full_urls)
    raise InputError(f"{source or name}: a {data.get('resourceType', 'JSON object')} is neither a Bundle nor a CDS Hooks request")


def load_cases(paths: list[str | Path], report: ReadReport | None = None, **bulk) -> Iterator[Case]:
    """Yield cases from files and folders, in a stable order; NDJSON leftovers are counted in `report`.

    `bulk` goes to `bulk_cases` (lenient, keep_types).
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            ndjson = sorted(path.glob("*.ndjson"))
            if ndjson:
                yield from bulk_cases(ndjson, report, **bulk)
            for child in sorted(p for p in path.rglob("*.json")):
                yield _json_case(child)
        elif path.suffix == ".ndjson":
            yield from bulk_cases([path], report, **bulk)
        elif path.exists():
            yield _json_case(path)
        else:
            raise InputError(f"{path}: no such file or folder")


def _json_case(path: Path) -> Case:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    return case_from_json(data, path.name, str(path))


def bulk_cases(files: list[Path], report: ReadReport | None = None, *, lenient: bool = False, keep_types: frozenset[str] | None = None) -> Iterator[Case]:
    """Group a Bulk Data export's resources by patient (files are read line by line).

    What cannot be attributed to a patient is counted in `report` (see
    `service.screening.ndjson`). An unreadable line is counted too when `lenient`;
    otherwise it stops the read with InputError naming the file and line. With
    `keep_types`, resources of other types are counted as skipped and not kept.
    """
    report = report if report is not None else ReadReport()
    by_patient: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for file in files:
        with file.open("rb") as handle:
            for patient_id, how, line in read_lines(_strict(handle, report, lenient), str(file), report, keep_types):
                by_patient[patient_id].append((how, line))
    for patient_id in sorted(by_patient):
        case = bulk_case(patient_id, by_patient[patient_id], report)
        if case is not None:
            yield case


def bulk_case(patient_id: str, items: list[tuple[str, bytes]], report: ReadReport) -> Case | None:
    """One patient's grouped Bulk lines, (how attributed, line) in export order, as a case; None if none hold."""
    lines = place_group(patient_id, items, report)
    if not lines:
        return None
    return Case(patient_id, patient_id, [resource_of(line) for line in lines], None, None, "bulk export", attributed=True)


def _strict(lines, report: ReadReport, lenient: bool):
    """Pass lines through, raising InputError as soon as one was counted unreadable (unless lenient)."""
    for line in lines:
        if not lenient and report.unreadable:
            break
        yield line
    if not lenient and report.unreadable:
        raise InputError(report.last)


def run_case(ruleset: RuleSet, case: Case, now: datetime | None = None, *, full_validation: bool = False) -> CaseResult:
    """Evaluate the rules for one case at `now`, else the case's own time, else the clock."""
    base_url = (case.request or {}).get("fhirServer")
    record = PatientRecord(
        ruleset.code_index, case.patient_id, aliases=case.aliases, base_url=base_url if isinstance(base_url, str) else None,
        attributed=case.attributed,
        full_validation=full_validation,
    )
    record.add_all(case.resources)
    record.add_orders(case.orders)
    evaluation = evaluate(ruleset, record, now or case.as_of or datetime.now(UTC), case.hook)
    cards = [render_card(f, evaluation.evaluator, ruleset) for f in evaluation.fired]
    return CaseResult(case, evaluation, record, cards)


def hook_request_for(case: Case, templates: dict[str, str], hook_instance: str) -> dict:
    """Build the CDS Hooks request an EHR would send for a case, prefetch filled per template."""
    if case.request is not None:
        return case.request
    prefetch: dict[str, object] = {}
    patient = next((r for r in case.resources if r.get("resourceType") == "Patient"), None)
    named_by_alias = any(_reference(r) in case.aliases for r in case.resources)
    for key, template in templates.items():
        kind = template.split("?")[0].split("/")[0]
        matching = [r for r in case.resources if r.get("resourceType") == kind]
        if "?" not in template:  # an instance read
            prefetch[key] = matching[0] if matching else None
            continue
        entries = [_entry(case, r) for r in matching]
        if named_by_alias and patient is not None:
            # References name the patient by its Bundle fullUrl: include the Patient entry that says so.
            entries.append(_entry(case, patient) | {"search": {"mode": "include"}})
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "total": len(matching), "entry": entries}
    return {
        "hook": "patient-view",
        "hookInstance": hook_instance,
        "context": {"patientId": case.patient_id or "unknown", "userId": "Practitioner/replay"},
        "prefetch": prefetch,
    }


def _reference(resource: dict) -> str | None:
    subject = resource.get("subject") or resource.get("patient")
    return subject.get("reference") if isinstance(subject, dict) else None


def _entry(case: Case, resource: dict) -> dict:
    url = case.full_urls.get((resource.get("resourceType"), resource.get("id")))
    return {"fullUrl": url, "resource": resource} if url else {"resource": resource}

"""Console commands: `rules check|test|explain`, `replay`, `screen`, `feedback report`, `calcinosis-cds serve`.

Rule authors use `rules`; integration testers use `replay`; everything else is for operators.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from .config import PROJECT_ROOT, from_environment
from .console import load_rules, parse_when

DEFAULT_FIXTURES = PROJECT_ROOT / "fixtures" / "fhir"


def _rules_dir(args) -> str:
    return args.rules or from_environment()["RULES_DIR"]


def _load(args):
    ruleset = load_rules(_rules_dir(args))
    if ruleset is None:
        raise SystemExit(1)
    return ruleset


def _when(text: str | None) -> datetime | None:
    try:
        return parse_when(text)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


# --- rules check ------------------------------------------------------------------------------

def cmd_check(args) -> int:
    """Validate every rule file; exit 1 on any error."""
    ruleset = _load(args)
    print(
        f"OK: {len(ruleset.rules)} rules, {len(ruleset.facts)} facts, {len(ruleset.valuesets)} value sets "
        f"in {ruleset.directory} (fingerprint {ruleset.fingerprint})"
    )
    return 0


# --- rules test --------------------------------------------------------------------------------

def cmd_test(args) -> int:
    """Run every scenario in the fixtures' scenarios.yaml and compare its cards with its `expect`."""
    from service.harness import InputError, load_cases, load_expectations, run_case

    ruleset = _load(args)
    fixtures = Path(args.fixtures)
    try:
        expectations = load_expectations(fixtures)
    except InputError as exc:
        print(f"FAIL  {exc}")
        return 1
    if not expectations:
        print(f"FAIL  no scenarios: {fixtures / 'scenarios.yaml'} is missing or empty")
        return 1
    known = {r.id for r in ruleset.rules}
    only = set(args.rule) if args.rule else known
    failures = 0
    for name, expectation in expectations.items():
        unknown = set(expectation.expect) - known
        try:
            result = run_case(ruleset, next(load_cases([fixtures / name])))
        except (InputError, StopIteration) as exc:
            failures += 1
            print(f"FAIL  {name}: cannot read fixture ({exc or 'empty'})")
            continue
        expected = set(expectation.expect) & only
        fired = set(result.fired) & only
        ok = expected == fired and not unknown
        failures += not ok
        line = f"{'PASS' if ok else 'FAIL'}  {name}: expected {', '.join(sorted(expected)) or 'no card'}"
        if unknown:
            line += f"; expect names unknown rule(s) {', '.join(sorted(unknown))}"
        if fired != expected:
            unknowns = [f.rule.id for f in result.evaluation.findings if f.result is None and f.rule.id in only]
            line += f", fired {', '.join(sorted(fired)) or 'nothing'}" + (f" (unknown: {', '.join(unknowns)})" if unknowns else "")
        print(line)
    never = [r for r in known & only if not any(r in e.expect for e in expectations.values())]
    for rule_id in sorted(never):
        print(f"WARN  rule {rule_id} fires in no scenario: add one that shows when it does")
    print(f"\n{len(expectations) - failures} passed, {failures} failed")
    return 1 if failures else 0


# --- rules explain -------------------------------------------------------------------------------

def _trace_lines(trace: dict, evaluator, depth: int = 1) -> list[str]:
    pad = "  " * depth
    mark = {True: "true", False: "false", None: "unknown"}[trace["result"]]
    if "fact" in trace:
        value = f" {_shown(trace['value'])}" if "value" in trace else ""
        why = f"  ({trace['why']})" if trace.get("why") else ""
        lines = [f"{pad}{trace['fact']} {trace['operator']}{value}: actual {trace['actual']} -> {mark}{why}"]
        fact = evaluator.computed().get(trace["fact"].split(".")[0])
        if fact is not None and fact.trace is not None:
            lines += _trace_lines(fact.trace, evaluator, depth + 1)
        return lines
    if "not" in trace:
        return [f"{pad}not -> {mark}"] + _trace_lines(trace["not"], evaluator, depth + 1)
    key = "all" if "all" in trace else "any"
    lines = [f"{pad}{key} of -> {mark}"]
    for item in trace[key]:
        lines += _trace_lines(item, evaluator, depth + 1)
    return lines


def _shown(value: object) -> str:
    from service.engine.templates import format_number

    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, tuple):
        return " to ".join(_shown(v) for v in value)
    return str(value)


def explain_text(result, snoozed: dict | None = None) -> str:
    """Say, for each rule, whether it fired and why; then every value the rules read."""
    evaluation, case = result.evaluation, result.case
    evaluator = evaluation.evaluator
    snoozed = snoozed or {}
    lines = [f"{case.name}: patient {case.patient_id or '(unknown)'}, hook {case.hook}, evaluated at {evaluator.now.isoformat()}"]
    if case.hook != "patient-view":
        lines.append(f"draft orders in scope: {', '.join(o.reference for o in case.orders) or 'none'}")
        lines += [f"  {o.reference} could not be read: {o.problem}" for o in case.orders if o.problem]
    lines.append("")
    for finding in evaluation.findings:
        snooze = snoozed.get(finding.rule.id)
        state = f"fired, withheld by snooze until {snooze.until.date().isoformat()} ({snooze.reason})" if finding.fired and snooze else "FIRED" if finding.fired else (f"SUPPRESSED by {finding.suppressed_by}" if finding.suppressed_by else ("not fired (unknown)" if finding.result is None else "not fired"))
        lines.append(f"{finding.rule.id}: {state}")
        lines += _trace_lines(finding.trace, evaluator)
        lines.append("")
    lines.append("Values read")
    for name, fact in evaluator.computed().items():
        if fact.trace is not None:
            continue
        lines.append(f"  {name} ({fact.title}): {fact.shown} [{fact.state}]")
        for e in fact.evidence:
            date = e.date.isoformat() if e.date else "no date"
            if e.sent is not None:
                lines.append(f"    {e.reference}: sent {e.sent}, normalised {e.normalised or 'unknown'}, {date}")
            elif e.reference.startswith("Patient/"):
                lines.append(f"    {e.reference}")
            else:
                lines.append(f"    {e.reference}: {e.display or ''} ({e.code}), {date}")
        lines += [f"    - {note}" for note in fact.notes]
    if result.record.invalid:
        lines += ["", "Invalid resources skipped"] + [f"  {k}: {v}" for k, v in result.record.invalid.items()]
    return "\n".join(lines)


def cmd_explain(args) -> int:
    """Evaluate one bundle or hook request and print the full trace."""
    from service.harness import InputError, load_cases

    ruleset = _load(args)
    try:
        cases = list(load_cases([args.file]))
    except InputError as exc:
        print(exc, file=sys.stderr)
        return 2
    store = None
    if args.database:
        from service.store import Store

        store = Store.from_url(args.database)
    try:
        for case in cases:
            _explain_case(ruleset, case, args, store)
    finally:
        if store is not None:
            store.close()
    return 0


def _active_snoozes(ruleset, result, case, args, store) -> dict:
    """Snoozes that would keep back a card this patient gets now: rule id -> Snooze."""
    from service.engine.cards import render_card
    from service.identity import patient_secret
    from service.store import patient_key

    config = from_environment()
    # Read the key the service uses; never make a new one here (it would match nothing).
    secret = patient_secret(str(config["PATIENT_KEY"]), config["PATIENT_KEY_FILE"],
                            required=not Path(config["PATIENT_KEY_FILE"]).exists())
    fhir_server = case.request.get("fhirServer") if isinstance(case.request, dict) else None
    key = patient_key(secret, case.patient_id or "unknown", fhir_server)
    fired = {f.rule.id: f for f in result.evaluation.findings if f.fired}
    now = result.evaluation.evaluator.now
    active = {}
    for rule_id, snooze in store.snoozes_for(args.service, key, fired).items():
        finding = fired[rule_id]
        indicator = render_card(finding, result.evaluation.evaluator, ruleset).indicator
        if snooze.ends_because(now, finding.rule.snooze_fingerprint, indicator) is None:
            active[rule_id] = snooze
    return active


def _explain_case(ruleset, case, args, store) -> None:
    from service.harness import run_case

    result = run_case(ruleset, case, _when(args.now))
    snoozed = _active_snoozes(ruleset, result, case, args, store) if store is not None else {}
    if args.json:
        print(json.dumps({
            "patient": case.patient_id,
            "hook": case.hook,
            "orders_in_scope": [o.reference for o in case.orders],
            "evaluated_at": result.evaluation.evaluator.now.isoformat(),
            "rules": [{"id": f.rule.id, "fired": f.fired, "result": f.result, "suppressed_by": f.suppressed_by,
                       **({"withheld_by_snooze": {"until": snoozed[f.rule.id].until.isoformat(), "reason": snoozed[f.rule.id].reason}} if f.rule.id in snoozed else {}),
                       "trace": f.trace} for f in result.evaluation.findings],
            "invalid_resources": result.record.invalid,
        }, indent=2, default=str))
    else:
        print(explain_text(result, snoozed))


def rules_main(argv: list[str] | None = None) -> int:
    """`rules check | test | explain` for rule authors."""
    parser = argparse.ArgumentParser(prog="rules", description="Check, test and explain the rules in rules/.")
    parser.add_argument("--rules", help="rules folder (default: CDS_RULES_DIR or ./rules)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="validate every rule file").set_defaults(func=cmd_check)
    test = sub.add_parser("test", help="run every scenario in scenarios.yaml and compare with its expect")
    test.add_argument("--fixtures", default=str(DEFAULT_FIXTURES), help="folder holding scenarios.yaml and the files it names")
    test.add_argument("rule", nargs="*", help="compare only these rule ids")
    test.set_defaults(func=cmd_test)
    explain = sub.add_parser("explain", help="why each rule fired or not for one patient")
    explain.add_argument("file", help="a FHIR Bundle or CDS Hooks request (JSON)")
    explain.add_argument("--now", help="evaluate at this time (default: the bundle's timestamp, else now)")
    explain.add_argument("--json", action="store_true", help="machine-readable trace")
    explain.add_argument("--database", help="store URL: also say which fired rules a snooze withholds for this patient")
    explain.add_argument("--service", default="calcinosis-risk", help="CDS service id the snoozes belong to (with --database)")
    explain.set_defaults(func=cmd_explain)
    args = parser.parse_args(argv)
    return args.func(args)


def replay_main(argv: list[str] | None = None) -> int:
    """`replay PATH...` for integration testers."""
    from service.replay import main

    return main(argv)


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"--since {text!r}: expected an ISO 8601 date or date-time such as 2026-11-01") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def screen_main(argv: list[str] | None = None) -> int:
    """`screen SOURCE --out FILE`: population screening of a Bulk Data export on Dask."""
    from service.screening.command import main

    return main(argv)


def feedback_main(argv: list[str] | None = None) -> int:
    """`feedback report` and `feedback snoozes list|clear` for operators and rule authors."""
    from service import report as render
    from service.store import Store, format_report

    parser = argparse.ArgumentParser(prog="feedback", description="What clinicians did with the cards.")
    parser.add_argument("--database", help="store URL (default: CDS_DATABASE_URL or the embedded SQLite file)")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="per rule: cards issued, accepted, overridden by reason, withheld by snooze")
    # Accepted before or after the subcommand; SUPPRESS keeps an absent one from hiding the other.
    report.add_argument("--database", default=argparse.SUPPRESS, help="store URL")
    report.add_argument("--service", help="only this CDS service id")
    report.add_argument("--since", help="only cards issued, feedback received and cards withheld from this UTC date(-time) on")
    report.add_argument("--format", choices=("text", "csv", "json"), default="text")
    report.add_argument("--html", metavar="FILE", help="also write a page with a chart per rule over time")
    snoozes = sub.add_parser("snoozes", help="see or lift the snoozes set by overridden feedback")
    snoozes.add_argument("--database", default=argparse.SUPPRESS, help="store URL")
    snoozes.add_argument("action", choices=("list", "clear"))
    snoozes.add_argument("--rule", help="only this rule id")
    snoozes.add_argument("--service", help="only this CDS service id")
    args = parser.parse_args(argv)
    store = Store.from_url(args.database or from_environment()["DATABASE_URL"])
    try:
        if args.command == "snoozes":
            return _snoozes(store, args)
        since = _since(args.since)
        rows = store.report(args.service, since)
        print({"text": format_report, "csv": render.as_csv, "json": render.as_json}[args.format](rows).rstrip("\n"))
        if args.html:
            title = "Feedback report" + (f", service {args.service}" if args.service else "") + (f", since {args.since}" if args.since else "")
            Path(args.html).write_text(render.as_html(rows, store.timeline(args.service, since), title), encoding="utf-8")
            print(f"wrote {args.html}", file=sys.stderr)
    finally:
        store.close()
    return 0


def _snoozes(store, args) -> int:
    """List snoozes (never a patient id: the hash is cut short) or lift them."""
    import logging

    from service import logs

    if args.action == "list":
        found = store.list_snoozes(args.rule, args.service)
        for s in found:
            print(f"{s.rule_id}  {s.service_id}  patient {s.patient_key[:12]}  {s.reason}  until {s.until.isoformat()}  (set {s.set_at.isoformat()})")
        print(f"{len(found)} snooze(s)")
        return 0
    logs.configure(from_environment()["LOG_LEVEL"])
    log = logging.getLogger("service.cli")
    cleared = store.clear_snoozes(args.rule, args.service)
    for s in cleared:
        log.info("snooze lifted", extra={"event": "snooze_lifted", "service": s.service_id, "hookInstance": s.hook_instance,
                                         "rule": s.rule_id, "reason": s.reason, "until": s.until.isoformat(), "cause": "cleared"})
    print(f"lifted {len(cleared)} snooze(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`calcinosis-cds serve`: Flask's server, for debugging (production uses gunicorn)."""
    parser = argparse.ArgumentParser(prog="calcinosis-cds")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve with Flask's development server (SIGHUP reloads rules)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    import signal

    from service import create_app

    app = create_app()
    signal.signal(signal.SIGHUP, lambda *_: app.extensions["calcinosis"].rules.refresh(force=True))
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Console commands: `rules check|test|explain`, `replay`, `feedback report`, `calcinosis-cds serve`.

Rule authors use `rules`; integration testers use `replay`; everything else is for operators.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from .config import PROJECT_ROOT, from_environment

DEFAULT_FIXTURES = PROJECT_ROOT / "fixtures" / "fhir"


def _rules_dir(args) -> str:
    return args.rules or from_environment()["RULES_DIR"]


def load_rules(rules_dir: str):
    """Load a rule set for a command, or print every error to stderr and return None."""
    from service.engine.loader import RuleSetError, load_ruleset
    from service.patient.validation import validation_error

    try:
        return load_ruleset(rules_dir, validate_resource=validation_error)
    except RuleSetError as exc:
        print(f"{len(exc.errors)} error(s) in {rules_dir}:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return None


def _load(args):
    ruleset = load_rules(_rules_dir(args))
    if ruleset is None:
        raise SystemExit(1)
    return ruleset


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"--now {text!r}: expected an ISO 8601 date-time such as 2026-11-01T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=datetime.now().astimezone().tzinfo)


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


def explain_text(result) -> str:
    """Say, for each rule, whether it fired and why; then every value the rules read."""
    evaluation, case = result.evaluation, result.case
    evaluator = evaluation.evaluator
    lines = [f"{case.name}: patient {case.patient_id or '(unknown)'}, hook {case.hook}, evaluated at {evaluator.now.isoformat()}"]
    if case.hook != "patient-view":
        lines.append(f"draft orders in scope: {', '.join(o.reference for o in case.orders) or 'none'}")
        lines += [f"  {o.reference} could not be read: {o.problem}" for o in case.orders if o.problem]
    lines.append("")
    for finding in evaluation.findings:
        state = "FIRED" if finding.fired else (f"SUPPRESSED by {finding.suppressed_by}" if finding.suppressed_by else ("not fired (unknown)" if finding.result is None else "not fired"))
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
    from service.harness import InputError, load_cases, run_case

    ruleset = _load(args)
    try:
        cases = list(load_cases([args.file]))
    except InputError as exc:
        print(exc, file=sys.stderr)
        return 2
    for case in cases:
        result = run_case(ruleset, case, _when(args.now))
        if args.json:
            print(json.dumps({
                "patient": case.patient_id,
                "hook": case.hook,
                "orders_in_scope": [o.reference for o in case.orders],
                "evaluated_at": result.evaluation.evaluator.now.isoformat(),
                "rules": [{"id": f.rule.id, "fired": f.fired, "result": f.result, "suppressed_by": f.suppressed_by, "trace": f.trace} for f in result.evaluation.findings],
                "invalid_resources": result.record.invalid,
            }, indent=2, default=str))
        else:
            print(explain_text(result))
    return 0


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
    explain.set_defaults(func=cmd_explain)
    args = parser.parse_args(argv)
    return args.func(args)


def replay_main(argv: list[str] | None = None) -> int:
    """`replay PATH...` for integration testers."""
    from service.replay import main

    return main(argv)


def feedback_main(argv: list[str] | None = None) -> int:
    """`feedback report`: per rule, cards issued, accepted, overridden and why."""
    from service.store import Store, format_report

    parser = argparse.ArgumentParser(prog="feedback", description="What clinicians did with the cards.")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="per rule: cards issued, accepted, overridden, top override reasons")
    report.add_argument("--database", help="store URL (default: CDS_DATABASE_URL or the embedded SQLite file)")
    report.add_argument("--service", help="only this CDS service id")
    args = parser.parse_args(argv)
    store = Store.from_url(args.database or from_environment()["DATABASE_URL"])
    try:
        print(format_report(store.report(args.service)))
    finally:
        store.close()
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

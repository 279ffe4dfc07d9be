"""`replay PATH...`: run saved patients through the rules, or through a running service.

For integration testers. Inputs are whatever `service.harness.load_cases` reads: FHIR
Bundles, full CDS Hooks requests, folders of them, FHIR Bulk Data NDJSON exports.

- In-process (default): the rules in --rules, evaluated at --now, else each case's own
  time (Bundle.timestamp), else the clock.
- --url BASE: real CDS Hooks calls to a running service (discovery first, then one POST
  per patient), optionally signed with a JWT as an EHR would sign them.
- --expect: compare the rules that fired with the scenario's `expect` in scenarios.yaml.
- --screen OUT.csv|OUT.ndjson|OUT.parquet: an alias of `screen PATH --out OUT`
  (service.screening.command): population screening, only the flagged patients written.

The hook client (HTTP, signing) is service.hook_client; screening is service.screening.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TextIO

from service.console import load_rules, parse_when
from service.hook_client import DEFAULT_TIMEOUT, SERVICE_ID, Card, HookClient, HookClientError, Outcome, Signer, _error

PROGRESS_AFTER = 20  # cases; smaller runs finish before a bar is worth drawing

EPILOG = """\
exit status: 0 all cases answered (and, with --expect, matched; with --validate, every
resource valid); 1 a mismatch, an invalid resource, a case that could not be evaluated or
answered, or a broken rule set; 2 unreadable input or bad arguments.

expectations (--expect): for a case read from file X (e.g.
esrd-dialysis-high-product.json), the rules listed under X's `expect` in the
scenarios.yaml beside it must fire and every other rule must not; a case with no
entry there has no expectation.

examples:
  replay fixtures/fhir/ --expect
  replay request.json --json
  replay fixtures/fhir/ --url http://127.0.0.1:8080 --jwt-key ehr.pem --jwt-iss https://ehr.example.org
  replay export/ --screen flagged.csv --now 2026-11-01T12:00:00Z --workers 8
"""


def expected_rules(case) -> list[str] | None:
    """The rule ids that must fire for a case, from scenarios.yaml beside it; None if it names none."""
    from service.harness import expected_rules as from_scenarios

    return from_scenarios(case)


# --- in-process ------------------------------------------------------------------------------------

def evaluate_case(ruleset, case, when: datetime, validate: bool = False) -> Outcome:
    """Run the rules over one case; an engine failure is reported for this case only.

    With `validate`, every resource of the case is validated with fhir.resources and the rules
    read resources as under CDS_VALIDATION=full.
    """
    from service.harness import run_case
    from service.patient.validation import validation_error

    outcome = Outcome(case.name, case.patient_id, case.source)
    if validate:
        for resource in case.resources:
            problem = validation_error(resource)
            if problem:
                kind, rid = resource.get("resourceType"), resource.get("id")
                outcome.invalid.append(f"{kind if isinstance(kind, str) else '?'}/{rid if isinstance(rid, str) else '(no id)'}: {problem}")
    try:
        result = run_case(ruleset, case, when, full_validation=validate)
    except Exception as exc:  # noqa: BLE001 - one bad case must not end a run of thousands
        outcome.error = _error("evaluation_failed", f"{type(exc).__name__}: {exc}")
        return outcome
    outcome.evaluated_at = result.evaluation.evaluator.now.isoformat()
    outcome.cards = [Card(c.rule_id, c.indicator, c.summary) for c in result.cards]
    return outcome


# --- output --------------------------------------------------------------------------------------------

def _progress(args, total: int, what: str):
    from tqdm import tqdm

    disabled = args.no_progress or total <= PROGRESS_AFTER or not sys.stderr.isatty()
    return tqdm(total=total, desc=what, unit="patient", file=sys.stderr, disable=disabled, leave=False)


class Table:
    """The readable output: one block of rows per patient, one row per card."""

    def __init__(self, out: TextIO, patient_width: int, rule_width: int, expect: bool, write) -> None:
        self.out, self.write = out, write
        self.pw, self.rw, self.expect = patient_width, rule_width, expect

    def _line(self, patient: str, rule: str, indicator: str, expectation: str, summary: str) -> str:
        parts = [patient.ljust(self.pw), rule.ljust(self.rw), indicator.ljust(9)]
        if self.expect:
            parts.append(expectation.ljust(8))
        return "  ".join(parts + [summary]).rstrip()

    def header(self) -> None:
        self.write(self._line("PATIENT", "RULE", "INDICATOR", "EXPECT", "SUMMARY"))

    def rows(self, outcome: Outcome) -> None:
        patient = outcome.patient or outcome.name
        expectation = outcome.expectation if self.expect else ""
        if outcome.error:
            e = outcome.error
            status = f"HTTP {e['status']} " if e.get("status") else ""
            self.write(self._line(patient, "-", "ERROR", expectation, f"{status}{e.get('code') or ''}: {e.get('message') or ''}"))
            return
        if not outcome.cards:
            self.write(self._line(patient, "-", "-", expectation, "(no cards)"))
            return
        for i, card in enumerate(outcome.cards):
            self.write(self._line(patient if i == 0 else "", card.rule, card.indicator, expectation if i == 0 else "", card.summary))


def _describe_mismatch(outcome: Outcome) -> str:
    expected = ", ".join(outcome.expected or ()) or "no rule"
    fired = ", ".join(outcome.fired) or "no rule"
    if outcome.error:
        return f"{outcome.name}: expected {expected}, but the case was not answered ({outcome.error.get('code')})"
    detail = "; ".join(
        part for part in (
            f"missing {', '.join(outcome.missing)}" if outcome.missing else "",
            f"unexpected {', '.join(outcome.unexpected)}" if outcome.unexpected else "",
        ) if part
    )
    return f"{outcome.name}: expected {expected}, fired {fired} ({detail})"


# --- the command -----------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="replay",
        description="Replay saved patients (FHIR Bundles, CDS Hooks requests, folders, Bulk Data NDJSON exports) "
        "through the rules in-process, or through a running service with --url.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="a Bundle or hook request (.json), a folder of them, or a Bulk Data export (folder of *.ndjson)")
    p.add_argument("--rules", help="rules folder (default: CDS_RULES_DIR or ./rules); in --url mode used only for --expect")
    p.add_argument("--now", metavar="ISO", help="evaluate at this time (default: each case's own Bundle.timestamp, else now); in-process only")
    p.add_argument("--json", action="store_true", help="one JSON object per patient on stdout (NDJSON); summaries go to stderr")
    p.add_argument("--validate", action="store_true", help="validate every resource with fhir.resources (as CDS_VALIDATION=full) and list the invalid ones; exit 1 if any")
    p.add_argument("--expect", action="store_true", help="compare fired rules with each scenario's expect in scenarios.yaml beside it; exit 1 on a mismatch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on a terminal for more than 20 cases)")
    remote = p.add_argument_group("against a running service")
    remote.add_argument("--url", metavar="BASE", help=f"send real hook calls to BASE/cds-services/{SERVICE_ID} (discovery first)")
    remote.add_argument("--jwt-key", metavar="PEM", help="sign each call with this private key (EC P-384 -> ES384, RSA -> RS384)")
    remote.add_argument("--jwt-iss", metavar="ISS", help="the token's iss (required with --jwt-key)")
    remote.add_argument("--jwt-kid", metavar="KID", help="the token header's kid (default: the key's RFC 7638 thumbprint)")
    remote.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help=f"per HTTP call (default {DEFAULT_TIMEOUT:g})")
    screen = p.add_argument_group("population screening (an alias of `screen PATH --out OUT`)")
    screen.add_argument("--screen", metavar="OUT", help="screen on Dask and write only flagged patients to OUT.csv, OUT.ndjson or OUT.parquet")
    screen.add_argument("--workers", type=int, metavar="N", help="worker processes for --screen (default: the CPU count)")
    return p


def _check_arguments(p: argparse.ArgumentParser, args) -> None:
    if args.url and args.now:
        p.error("--now cannot be used with --url: the service evaluates at its own clock")
    if (args.jwt_key or args.jwt_iss or args.jwt_kid) and not args.url:
        p.error("--jwt-key, --jwt-iss and --jwt-kid sign hook calls: use them with --url")
    if bool(args.jwt_key) != bool(args.jwt_iss):
        p.error("--jwt-key and --jwt-iss go together")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    if args.screen and (args.url or args.json or args.expect):
        p.error("--screen runs the rules itself and writes its own file: it does not combine with --url, --json or --expect")
    if args.validate and (args.url or args.screen):
        p.error("--validate runs in-process: it does not combine with --url or --screen")
    if args.workers is not None and not args.screen:
        p.error("--workers is for --screen")


def screen_alias(args) -> list[str]:
    """`replay PATH... --screen OUT [...]` as the `screen` command's arguments."""
    argv = [*args.paths, "--out", args.screen]
    for flag, value in (("--rules", args.rules), ("--now", args.now), ("--workers", args.workers)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--no-progress"] if args.no_progress else [])


def main(argv: list[str] | None = None) -> int:
    from service.config import from_environment
    from service.harness import InputError, load_cases
    from service.screening.ndjson import ReadReport

    p = parser()
    args = p.parse_args(argv)
    _check_arguments(p, args)
    if args.screen:
        from service.screening.command import main as screen_main

        return screen_main(screen_alias(args), prog="replay --screen")
    try:
        now = parse_when(args.now)
    except ValueError as exc:
        p.error(str(exc))

    rules_dir = args.rules or from_environment()["RULES_DIR"]
    ruleset = None
    if not args.url or args.expect:
        ruleset = load_rules(rules_dir)
        if ruleset is None:
            return 1

    report = ReadReport()
    try:
        cases = list(load_cases(args.paths, report))
    except InputError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    for line in report.lines_of_text():  # NDJSON lines no patient could be found for
        print(f"replay: {line}", file=sys.stderr)
    if not cases:
        print(f"replay: no Bundles, hook requests or NDJSON resources in {' '.join(args.paths)}", file=sys.stderr)
        return 2

    client = None
    if args.url:
        try:
            signer = Signer(args.jwt_key, args.jwt_iss, args.jwt_kid) if args.jwt_key else None
            client = HookClient(args.url, args.timeout, signer)
            client.discover()
        except HookClientError as exc:
            if client is not None:
                client.close()
            print(f"replay: {exc}", file=sys.stderr)
            return 2
    try:
        outcomes = _replay(args, ruleset, cases, now, client)
    finally:
        if client is not None:
            client.close()
    return _summarise(args, outcomes)


def _replay(args, ruleset, cases: list, now: datetime | None, client: HookClient | None) -> list[Outcome]:
    from tqdm import tqdm

    bar = _progress(args, len(cases), "replaying")
    write = (lambda line: tqdm.write(line, file=sys.stdout)) if not bar.disable else print
    table = None
    if not args.json:
        rule_width = max([len(r.id) for r in ruleset.rules] if ruleset else [20]) + 2
        patient_width = min(40, max(len(c.patient_id or c.name) for c in cases))
        table = Table(sys.stdout, max(patient_width, 7), max(rule_width, 4), args.expect, write)
        table.header()
    fallback = datetime.now(UTC)
    outcomes = []
    try:
        for case in cases:
            if client is not None:
                outcome = client.call(case)
            else:
                outcome = evaluate_case(ruleset, case, now or case.as_of or fallback, args.validate)
            if args.expect:
                outcome.expected = expected_rules(case)
            outcomes.append(outcome)
            if table is not None:
                table.rows(outcome)
            else:
                write(json.dumps(outcome.to_json(args.expect), ensure_ascii=False))
            bar.update(1)
    finally:
        bar.close()
    return outcomes


def _summarise(args, outcomes: list[Outcome]) -> int:
    out = sys.stderr if args.json else sys.stdout
    errors = [o for o in outcomes if o.error]
    with_cards = sum(1 for o in outcomes if o.cards)
    where = f"via {args.url}" if args.url else "in-process"
    print(f"\n{len(outcomes)} case(s) {where}: {with_cards} with cards, {len(outcomes) - with_cards - len(errors)} without, {len(errors)} not answered", file=out)
    failed = bool(errors)
    if args.expect:
        mismatches = [o for o in outcomes if o.expectation == "mismatch"]
        unexpected_none = [o for o in outcomes if o.expectation == "none"]
        ok = len(outcomes) - len(mismatches) - len(unexpected_none)
        print(f"expectations: {ok} ok, {len(mismatches)} mismatch(es), {len(unexpected_none)} case(s) without expectation", file=out)
        for o in mismatches:
            print(f"  MISMATCH {_describe_mismatch(o)}", file=out)
        for o in unexpected_none:
            print(f"  no expectation: {o.name} (no rule's tests name it)", file=out)
        failed = failed or bool(mismatches)
    if args.validate:
        invalid = [(o, problem) for o in outcomes for problem in o.invalid]
        print(f"validation (fhir.resources, every resource): {len(invalid)} invalid resource(s) in {len({o.name for o, _ in invalid})} case(s)", file=out)
        for o, problem in invalid[:50]:
            print(f"  INVALID {o.name}: {problem}", file=out)
        if len(invalid) > 50:
            print(f"  ... and {len(invalid) - 50} more", file=out)
        failed = failed or bool(invalid)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

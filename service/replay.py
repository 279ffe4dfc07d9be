"""`replay PATH...`: run saved patients through the rules, or through a running service.

For integration testers. Inputs are whatever `service.harness.load_cases` reads: FHIR
Bundles, full CDS Hooks requests, folders of them, FHIR Bulk Data NDJSON exports.

- In-process (default): the rules in --rules, evaluated at --now, else each case's own
  time (Bundle.timestamp), else the clock.
- --url BASE: real CDS Hooks calls to a running service (discovery first, then one POST
  per patient), optionally signed with a JWT as an EHR would sign them.
- --expect: compare the rules that fired with the scenario's `expect` in scenarios.yaml.
- --screen OUT.csv|OUT.ndjson: population screening of a bulk export on all cores;
  writes only the flagged patients, with the values their rules read.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import math
import os
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import TextIO

SERVICE_ID = "calcinosis-risk"
# The service that answers each hook: a saved order-select / order-sign request replays against its own.
SERVICE_BY_HOOK = {"patient-view": SERVICE_ID, "order-select": "calcinosis-order-select", "order-sign": "calcinosis-order-sign"}
PROGRESS_AFTER = 20  # cases; smaller runs finish before a bar is worth drawing
DEFAULT_TIMEOUT = 10.0
JWT_LIFETIME_SECONDS = 300  # CDS Hooks 2.0: exp SHOULD be no more than 5 minutes ahead
MAX_CHUNK = 250  # patients sent to a screening worker at a time

EPILOG = """\
exit status: 0 all cases answered (and, with --expect, matched); 1 a mismatch, a case
that could not be evaluated or answered, or a broken rule set; 2 unreadable input or
bad arguments.

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


class ReplayError(Exception):
    """Something that stops the whole run (not one patient): unreadable key, no discovery."""


# --- what one case produced ----------------------------------------------------------------------

@dataclass
class Card:
    rule: str
    indicator: str
    summary: str


@dataclass
class Outcome:
    """One case's answer, from the engine in-process or from the service."""

    name: str
    patient: str | None
    source: str
    cards: list[Card] = field(default_factory=list)
    evaluated_at: str | None = None
    error: dict | None = None  # {"status": int | None, "code": str | None, "message": str}
    expected: list[str] | None = None  # None: no expectation (or --expect not asked for)

    @property
    def fired(self) -> list[str]:
        return [c.rule for c in self.cards]

    @property
    def missing(self) -> list[str]:
        return [r for r in self.expected or () if r not in self.fired]

    @property
    def unexpected(self) -> list[str]:
        return [r for r in self.fired if self.expected is not None and r not in self.expected]

    @property
    def expectation(self) -> str:
        if self.expected is None:
            return "none"
        return "mismatch" if self.error or self.missing or self.unexpected else "ok"

    def to_json(self, with_expectation: bool) -> dict:
        body = {
            "case": self.name,
            "patient": self.patient,
            "source": self.source,
            "evaluated_at": self.evaluated_at,
            "rules": self.fired,
            "cards": [{"rule": c.rule, "indicator": c.indicator, "summary": c.summary} for c in self.cards],
            "error": self.error,
        }
        if with_expectation:
            body |= {"expectation": self.expectation, "expected": self.expected, "missing": self.missing, "unexpected": self.unexpected}
        return body


def expected_rules(ruleset, case) -> list[str] | None:
    """The rule ids that must fire for a case, from scenarios.yaml beside it; None if it names none."""
    from service.harness import expected_rules as from_scenarios

    return from_scenarios(case)


def _error(code: str, message: str, status: int | None = None) -> dict:
    return {"status": status, "code": code, "message": message}


# --- in-process ------------------------------------------------------------------------------------

def evaluate_case(ruleset, case, when: datetime) -> Outcome:
    """Run the rules over one case; an engine failure is reported for this case only."""
    from service.harness import run_case

    outcome = Outcome(case.name, case.patient_id, case.source)
    try:
        result = run_case(ruleset, case, when)
    except Exception as exc:  # noqa: BLE001 - one bad case must not end a run of thousands
        outcome.error = _error("evaluation_failed", f"{type(exc).__name__}: {exc}")
        return outcome
    outcome.evaluated_at = result.evaluation.evaluator.now.isoformat()
    outcome.cards = [Card(c.rule_id, c.indicator, c.summary) for c in result.cards]
    return outcome


# --- against a running service ---------------------------------------------------------------------

class Signer:
    """Signs each hook call as an EHR would (CDS Hooks 2.0, "Trusting CDS Clients")."""

    def __init__(self, pem_path: str, issuer: str, kid: str | None = None) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        try:
            key = serialization.load_pem_private_key(Path(pem_path).read_bytes(), password=None)
        except OSError as exc:
            raise ReplayError(f"--jwt-key {pem_path}: cannot read it ({exc.strerror or exc})") from None
        except (TypeError, ValueError) as exc:
            raise ReplayError(f"--jwt-key {pem_path}: not an unencrypted PEM private key ({exc})") from None
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "RS384"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            # JWA binds each ES algorithm to one curve; ES384 (P-384) is the spec's recommendation.
            curves = {"secp384r1": "ES384", "secp256r1": "ES256", "secp521r1": "ES512"}
            if key.curve.name not in curves:
                raise ReplayError(f"--jwt-key {pem_path}: EC curve {key.curve.name} has no JWS algorithm; use P-384")
            self.algorithm = curves[key.curve.name]
        else:
            raise ReplayError(f"--jwt-key {pem_path}: a {type(key).__name__} cannot sign ES384 or RS384 tokens; use an EC P-384 or RSA key")
        self.key = key
        self.issuer = issuer
        self.kid = kid or jwk_thumbprint(key.public_key())

    def token(self, audience: str) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": self.issuer, "aud": audience, "exp": now + JWT_LIFETIME_SECONDS, "iat": now, "jti": str(uuid.uuid4())}
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers={"kid": self.kid, "typ": "JWT"})


def jwk_thumbprint(public_key) -> str:
    """RFC 7638 thumbprint of a public key: the default kid, stable for a key."""
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    from cryptography.hazmat.primitives.asymmetric import rsa

    jwk = (RSAAlgorithm if isinstance(public_key, rsa.RSAPublicKey) else ECAlgorithm).to_jwk(public_key, as_dict=True)
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, sort_keys=True, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


class HookClient:
    """Discovery once, then one hook call per case; every call has a timeout."""

    def __init__(self, base_url: str, timeout: float, signer: Signer | None = None) -> None:
        import requests

        self.base = base_url.rstrip("/")
        self.endpoint = f"{self.base}/cds-services/{SERVICE_ID}"
        self.timeout = timeout
        self.signer = signer
        self.session = requests.Session()
        self.templates: dict[str, str] = {}
        self.offered: set[str] = set()

    def close(self) -> None:
        self.session.close()

    def discover(self) -> dict[str, str]:
        import requests

        url = f"{self.base}/cds-services"
        try:
            response = self.session.get(url, timeout=self.timeout, headers={"Accept": "application/json"})
        except requests.Timeout:
            raise ReplayError(f"discovery {url}: no answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise ReplayError(f"discovery {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise ReplayError(f"discovery {url}: HTTP {response.status_code} {_error_code(response) or ''}".rstrip())
        try:
            services = response.json()["services"]
            service = next(s for s in services if s.get("id") == SERVICE_ID)
        except (ValueError, KeyError, TypeError):
            raise ReplayError(f"discovery {url}: the answer is not a CDS Hooks discovery document") from None
        except StopIteration:
            raise ReplayError(f"discovery {url}: the service does not offer '{SERVICE_ID}'") from None
        self.templates = dict(service.get("prefetch") or {})
        self.offered = {s.get("id") for s in services if isinstance(s, dict)}
        return self.templates

    def call(self, case) -> Outcome:
        import requests

        from service.harness import hook_request_for

        outcome = Outcome(case.name, case.patient_id, case.source)
        service_id = SERVICE_BY_HOOK.get(case.hook)
        if service_id is None or service_id not in self.offered:
            outcome.error = _error("no_service", f"the service offers no '{service_id or case.hook}' service for hook {case.hook}")
            return outcome
        endpoint = f"{self.base}/cds-services/{service_id}"
        body = hook_request_for(case, self.templates, str(uuid.uuid4()))
        headers = {"Accept": "application/json"}
        if self.signer is not None:
            headers["Authorization"] = f"Bearer {self.signer.token(endpoint)}"
        try:
            response = self.session.post(endpoint, json=body, headers=headers, timeout=self.timeout)
        except requests.Timeout:
            outcome.error = _error("timeout", f"no answer within {self.timeout:g} s")
            return outcome
        except requests.RequestException as exc:
            outcome.error = _error("connection_failed", f"{type(exc).__name__}: {exc}")
            return outcome
        if response.status_code != 200:
            message = _error_message(response) or response.reason or ""
            outcome.error = _error(_error_code(response) or "http_error", message, response.status_code)
            return outcome
        try:
            cards = response.json()["cards"]
            outcome.cards = [
                Card(((c.get("source") or {}).get("topic") or {}).get("code") or "(no topic)", c.get("indicator", ""), c.get("summary", ""))
                for c in cards
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            outcome.error = _error("invalid_response", "HTTP 200 but the body is not a CDS Hooks response (no cards list)", 200)
        return outcome


def _error_body(response) -> dict:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _error_code(response) -> str | None:
    return _error_body(response).get("code")


def _error_message(response) -> str | None:
    return _error_body(response).get("message")


# --- population screening ----------------------------------------------------------------------------

_worker_ruleset = None


def _init_worker(rules_dir: str) -> None:
    """Each worker loads (and checks) the rule set once."""
    global _worker_ruleset
    from service.engine.loader import load_ruleset
    from service.patient.validation import validation_error

    _worker_ruleset = load_ruleset(rules_dir, validate_resource=validation_error)


def screen_chunk(cases: list, now: datetime | None, fallback: datetime, ruleset=None) -> tuple[int, list[dict], list[dict]]:
    """Evaluate a chunk; return (patients evaluated, flagged rows, errors)."""
    from service.harness import run_case

    ruleset = ruleset or _worker_ruleset
    flagged, errors = [], []
    for case in cases:
        patient = case.patient_id or case.name
        try:
            result = run_case(ruleset, case, now or case.as_of or fallback)
        except Exception as exc:  # noqa: BLE001 - reported, counted, and the run goes on
            errors.append({"patient": patient, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if not result.cards:
            continue
        computed = result.evaluation.evaluator.computed()
        values: dict[str, str] = {}
        for finding in result.evaluation.fired:
            for name in finding.rule.facts_read:
                if name in computed and name not in values:
                    values[name] = computed[name].shown
        flagged.append({"patient": patient, "rules": result.fired, "values": values})
    return len(cases), flagged, errors


def value_columns(ruleset) -> list[str]:
    """Every fact some rule lists as evidence, in rule order: the screening file's value columns."""
    columns: list[str] = []
    for rule in ruleset.rules:
        columns += [name for name in rule.facts_read if name not in columns]
    return columns


def write_screen(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["patient", "rules"] + columns)
            for row in rows:
                writer.writerow([row["patient"], " ".join(row["rules"])] + [row["values"].get(c, "") for c in columns])
    else:
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_screen(args, ruleset, cases: list, now: datetime | None, read_seconds: float) -> int:
    out = Path(args.screen)
    workers = max(1, args.workers or os.cpu_count() or 1)
    chunk = max(1, min(MAX_CHUNK, math.ceil(len(cases) / (workers * 4))))
    chunks = [cases[i : i + chunk] for i in range(0, len(cases), chunk)]
    workers = min(workers, len(chunks)) or 1
    fallback = datetime.now(UTC)
    results: dict[int, list[dict]] = {}
    errors: list[dict] = []
    done = 0
    bar = _progress(args, len(cases), "screening")
    started = time.perf_counter()
    try:
        if workers == 1:
            for index, part in enumerate(chunks):
                count, results[index], failed = screen_chunk(part, now, fallback, ruleset)
                errors += failed
                done += count
                bar.update(count)
        else:
            # spawn: a clean interpreter per worker, safe whatever threads this process runs.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(str(ruleset.directory),)) as pool:
                futures = {pool.submit(screen_chunk, part, now, fallback): index for index, part in enumerate(chunks)}
                for future in as_completed(futures):
                    count, results[futures[future]], failed = future.result()
                    errors += failed
                    done += count
                    bar.update(count)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    rows = [row for index in sorted(results) for row in results[index]]
    write_screen(out, rows, value_columns(ruleset))
    rate = done / elapsed if elapsed > 0 else float("inf")
    by_rule: dict[str, int] = {}
    for row in rows:
        for rule in row["rules"]:
            by_rule[rule] = by_rule.get(rule, 0) + 1
    print(f"read {len(cases)} patients in {read_seconds:.2f} s")
    print(f"screened {done} patients in {elapsed:.2f} s with {workers} worker{'s' if workers > 1 else ''}: {rate:,.0f} patients/s")
    print(f"{len(rows)} flagged -> {out}")
    for rule in ruleset.rules:
        if rule.id in by_rule:
            print(f"  {rule.id}: {by_rule[rule.id]}")
    if errors:
        print(f"{len(errors)} patient(s) could not be evaluated:", file=sys.stderr)
        for failure in errors[:20]:
            print(f"  {failure['patient']}: {failure['error']}", file=sys.stderr)
        return 1
    return 0


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
    p.add_argument("--expect", action="store_true", help="compare fired rules with each scenario's expect in scenarios.yaml beside it; exit 1 on a mismatch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on a terminal for more than 20 cases)")
    remote = p.add_argument_group("against a running service")
    remote.add_argument("--url", metavar="BASE", help=f"send real hook calls to BASE/cds-services/{SERVICE_ID} (discovery first)")
    remote.add_argument("--jwt-key", metavar="PEM", help="sign each call with this private key (EC P-384 -> ES384, RSA -> RS384)")
    remote.add_argument("--jwt-iss", metavar="ISS", help="the token's iss (required with --jwt-key)")
    remote.add_argument("--jwt-kid", metavar="KID", help="the token header's kid (default: the key's RFC 7638 thumbprint)")
    remote.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help=f"per HTTP call (default {DEFAULT_TIMEOUT:g})")
    screen = p.add_argument_group("population screening")
    screen.add_argument("--screen", metavar="OUT", help="evaluate on all cores and write only flagged patients to OUT.csv or OUT.ndjson")
    screen.add_argument("--workers", type=int, metavar="N", help="worker processes for --screen (default: the CPU count, os.cpu_count())")
    return p


def _parse_when(p: argparse.ArgumentParser, text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        p.error(f"--now {text!r}: expected an ISO 8601 date-time such as 2026-11-01T12:00:00Z")
    return value if value.tzinfo else value.replace(tzinfo=datetime.now().astimezone().tzinfo)


def _check_arguments(p: argparse.ArgumentParser, args) -> None:
    if args.url and args.now:
        p.error("--now cannot be used with --url: the service evaluates at its own clock")
    if (args.jwt_key or args.jwt_iss or args.jwt_kid) and not args.url:
        p.error("--jwt-key, --jwt-iss and --jwt-kid sign hook calls: use them with --url")
    if bool(args.jwt_key) != bool(args.jwt_iss):
        p.error("--jwt-key and --jwt-iss go together")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    if args.screen:
        if args.url or args.json or args.expect:
            p.error("--screen runs in-process and writes its own file: it does not combine with --url, --json or --expect")
        if Path(args.screen).suffix.lower() not in (".csv", ".ndjson", ".jsonl"):
            p.error(f"--screen {args.screen}: the file name must end in .csv or .ndjson")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")


def main(argv: list[str] | None = None) -> int:
    from service.cli import load_rules
    from service.config import from_environment
    from service.harness import InputError, load_cases

    p = parser()
    args = p.parse_args(argv)
    _check_arguments(p, args)
    now = _parse_when(p, args.now)

    rules_dir = args.rules or from_environment()["RULES_DIR"]
    ruleset = None
    if not args.url or args.expect:
        ruleset = load_rules(rules_dir)
        if ruleset is None:
            return 1

    started = time.perf_counter()
    try:
        cases = list(load_cases(args.paths))
    except InputError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    if not cases:
        print(f"replay: no Bundles, hook requests or NDJSON resources in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    read_seconds = time.perf_counter() - started

    if args.screen:
        return run_screen(args, ruleset, cases, now, read_seconds)

    client = None
    if args.url:
        try:
            signer = Signer(args.jwt_key, args.jwt_iss, args.jwt_kid) if args.jwt_key else None
            client = HookClient(args.url, args.timeout, signer)
            client.discover()
        except ReplayError as exc:
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
                outcome = evaluate_case(ruleset, case, now or case.as_of or fallback)
            if args.expect:
                outcome.expected = expected_rules(ruleset, case)
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

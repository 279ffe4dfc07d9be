"""A FHIR Bulk Data $export client, for `screen --from-fhir BASE [--group ID]`.

FHIR Bulk Data Access IG (v2), "Export" flow, as separate steps each with a line of progress:
1. kick-off: GET [base]/Patient/$export or [base]/Group/[id]/$export, `Prefer: respond-async`,
   `_type` the resource types the rules read, `_typeFilter` by the rules' codes when the
   server's CapabilityStatement names `_typeFilter`; answer 202 with `Content-Location`;
2. status: poll that URL, waiting as `Retry-After` says (seconds or an HTTP date), showing
   `X-Progress`, until 200 and the manifest (or an error with its OperationOutcome);
3. download: each `output` file streamed to disk, resumed with a `Range` request from a
   partial file, bounded in size; each `error` file (OperationOutcome NDJSON) reported;
4. Ctrl-C: DELETE the status URL, so the server can stop and delete the files.
The state (status URL, manifest) is kept in the download folder: a rerun resumes there.

Authorization: a static bearer token, or SMART Backend Services (client_credentials with a
JWT assertion signed RS384/ES384, the token endpoint from `.well-known/smart-configuration`);
a token is refreshed before it expires and once more when the server answers 401.
"""
from __future__ import annotations

import email.utils
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

EXPORT_TYPES = ("Patient", "Observation", "Condition", "Procedure")
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
REQUEST_TIMEOUT = 30.0  # seconds, per HTTP call (connect and each read)
MAX_RETRY_AFTER = 300.0  # never wait longer than this for one Retry-After
DEFAULT_POLL = 2.0  # seconds between polls when the server gives no Retry-After
MAX_RETRIES = 5  # 429s and broken downloads, per request
MAX_FILE_BYTES = 64 * 2**30  # per output file
MAX_ERROR_BYTES = 16 * 2**20  # per error file: read to report, not to screen
CHUNK = 2**16  # bytes read and written at a time; what a broken transfer can lose
TOKEN_MARGIN = 30.0  # refresh a token this many seconds before it expires
ASSERTION_LIFETIME = 300  # SMART Backend Services: exp no more than five minutes ahead


class BulkExportError(Exception):
    """The export cannot go on: names the step and what the server said."""


# --- authorization ----------------------------------------------------------------------------------------

class StaticToken:
    def __init__(self, token: str) -> None:
        self._token = token

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        return False  # nothing to refresh: a 401 is final


class NoAuth:
    def header(self) -> dict[str, str]:
        return {}

    def invalidate(self) -> bool:
        return False


class SmartBackend:
    """SMART Backend Services: a signed client assertion exchanged for an access token, refreshed as it expires."""

    def __init__(self, base: str, client_id: str, signer, scope: str, session, clock=time.time) -> None:
        self.base, self.client_id, self.signer, self.scope = base.rstrip("/"), client_id, signer, scope
        self.session, self.clock = session, clock
        self.token_url: str | None = None
        self._token: str | None = None
        self._expires = 0.0
        self.issued = 0  # tokens obtained, for the summary

    def _discover(self) -> str:
        url = f"{self.base}/.well-known/smart-configuration"
        response = _call(self.session, "GET", url, "SMART configuration", headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise BulkExportError(f"SMART configuration {url}: HTTP {response.status_code}{_outcome_text(response)}")
        try:
            token_url = response.json()["token_endpoint"]
        except (ValueError, KeyError, TypeError):
            raise BulkExportError(f"SMART configuration {url}: no token_endpoint in the answer") from None
        if not isinstance(token_url, str) or not token_url.startswith(("https://", "http://")):
            raise BulkExportError(f"SMART configuration {url}: token_endpoint is not a URL")
        return token_url

    def _fetch(self) -> None:
        self.token_url = self.token_url or self._discover()
        assertion = self.signer.token(self.token_url, subject=self.client_id, lifetime=ASSERTION_LIFETIME)
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        }
        response = _call(self.session, "POST", self.token_url, "token request", data=form, headers={"Accept": "application/json"})
        if response.status_code != 200:
            detail = _json_field(response, "error_description") or _json_field(response, "error") or ""
            raise BulkExportError(f"token request {self.token_url}: HTTP {response.status_code} {detail}".rstrip())
        try:
            body = response.json()
            token, lifetime = body["access_token"], float(body.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise BulkExportError(f"token request {self.token_url}: the answer has no access_token") from None
        self._token, self._expires = token, self.clock() + lifetime
        self.issued += 1

    def header(self) -> dict[str, str]:
        if self._token is None or self.clock() > self._expires - TOKEN_MARGIN:
            self._fetch()
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        """The server refused the token (401): get a new one."""
        self._token = None
        return True


# --- HTTP helpers ---------------------------------------------------------------------------------------------

def _call(session, method: str, url: str, step: str, **kwargs):
    import requests

    try:
        return session.request(method, url, timeout=kwargs.pop("timeout", REQUEST_TIMEOUT), **kwargs)
    except requests.Timeout:
        raise BulkExportError(f"{step} {url}: no answer within {REQUEST_TIMEOUT:g} s") from None
    except requests.RequestException as exc:
        raise BulkExportError(f"{step} {url}: {type(exc).__name__}: {exc}") from None


def _json_field(response, name: str) -> str | None:
    try:
        value = response.json().get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def outcome_issues(outcome: object) -> list[str]:
    """'severity code: diagnostics' for each issue of an OperationOutcome."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    found = []
    for issue in outcome.get("issue") or []:
        if isinstance(issue, dict):
            text = issue.get("diagnostics") or ((issue.get("details") or {}).get("text")) or ""
            found.append(f"{issue.get('severity', '?')} {issue.get('code', '?')}: {text}".rstrip(": "))
    return found


def _outcome_text(response) -> str:
    try:
        issues = outcome_issues(response.json())
    except ValueError:
        return ""
    return f" ({'; '.join(issues[:3])})" if issues else ""


def retry_after(value: str | None, clock=time.time) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - clock(), MAX_RETRY_AFTER))


def type_filters(ruleset) -> list[str]:
    """`_typeFilter` queries selecting the Observations and Conditions the rules read by code.

    A type whose value sets have prefix entries (ICD-10 `N18*`) cannot be filtered by exact
    codes, so it gets no filter: every resource of it is exported.
    """
    filters = []
    for kind, names in (("Observation", ruleset.observation_valuesets()), ("Condition", ruleset.condition_valuesets())):
        tokens: set[str] = set()
        for name in names:
            found = ruleset.valuesets[name].search_tokens()
            if found is None:
                tokens = set()
                break
            for token in found:
                tokens.add(token)
                system, code = token.split("|", 1)
                if system == ICD10CM and len(code) > 3:  # value sets hold ICD-10-CM without its dot
                    tokens.add(f"{system}|{code[:3]}.{code[3:]}")
        if tokens:
            filters.append(f"{kind}?code={','.join(sorted(tokens))}")
    return filters


# --- the export ---------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    folder: Path
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    errors: list[str] = field(default_factory=list)  # issues read from the error files
    error_files: int = 0
    resumed: int = 0  # files continued from a partial download


class BulkClient:
    """Kick-off, status polling, download and cancel against one FHIR server; `sleep`, `clock`, `say` are injectable."""

    def __init__(self, base: str, auth, session, *, say=None, sleep=time.sleep, clock=time.monotonic,
                 max_file_bytes: int = MAX_FILE_BYTES, deadline: float | None = None) -> None:
        self.base = base.rstrip("/")
        self.auth, self.session = auth, session
        self.say = say or (lambda line: print(line, file=sys.stderr))
        self.sleep, self.clock = sleep, clock
        self.max_file_bytes = max_file_bytes
        self.deadline = deadline

    # one request, with the token, a refresh on 401, and waits on 429
    def request(self, method: str, url: str, step: str, *, authorize: bool = True, **kwargs):
        refreshed = False
        for _ in range(MAX_RETRIES + 1):
            self._check_deadline(step)
            headers = {**kwargs.pop("headers", {}), **(self.auth.header() if authorize else {})}
            response = _call(self.session, method, url, step, headers=headers, **kwargs)
            kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
            if response.status_code == 401 and authorize and not refreshed and self.auth.invalidate():
                refreshed = True
                response.close()
                self.say(f"{step}: token refused (401), getting a new one")
                continue
            if response.status_code == 429:
                wait = retry_after(response.headers.get("Retry-After"), time.time)
                wait = DEFAULT_POLL if wait is None else wait
                response.close()
                self.say(f"{step}: 429 Too Many Requests, waiting {wait:g} s")
                self._wait(wait, step)
                continue
            return response
        raise BulkExportError(f"{step} {url}: still refused after {MAX_RETRIES} retries")

    def _check_deadline(self, step: str) -> None:
        if self.deadline is not None and self.clock() > self.deadline:
            raise BulkExportError(f"{step}: the export did not finish within --export-timeout")

    def _wait(self, seconds: float, step: str) -> None:
        if self.deadline is not None and self.clock() + seconds > self.deadline:
            raise BulkExportError(f"{step}: the export did not finish within --export-timeout")
        self.sleep(seconds)

    def supports_type_filter(self) -> bool:
        """Whether the CapabilityStatement names `_typeFilter` (a server that does not would reject or ignore it)."""
        response = self.request("GET", f"{self.base}/metadata", "capability statement", headers={"Accept": "application/fhir+json"})
        if response.status_code != 200:
            return False
        return "_typeFilter" in response.text

    def kick_off(self, group: str | None, types: tuple[str, ...], filters: list[str]) -> str:
        path = f"Group/{group}/$export" if group else "Patient/$export"
        query = [("_type", ",".join(types))] + [("_typeFilter", f) for f in filters]
        url = f"{self.base}/{path}?{urlencode(query)}"
        response = self.request("GET", url, "kick-off", headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
        if response.status_code != 202:
            raise BulkExportError(f"kick-off {self.base}/{path}: HTTP {response.status_code}{_outcome_text(response)}")
        location = response.headers.get("Content-Location")
        if not location:
            raise BulkExportError(f"kick-off {self.base}/{path}: 202 without a Content-Location status URL")
        self.say(f"kick-off: accepted; status at {location}")
        return location

    def poll(self, status_url: str) -> dict:
        """Poll until the manifest; raise BulkExportError with the server's OperationOutcome on failure."""
        while True:
            response = self.request("GET", status_url, "status", headers={"Accept": "application/json"})
            if response.status_code == 202:
                progress = response.headers.get("X-Progress")
                wait = retry_after(response.headers.get("Retry-After"), time.time)
                wait = DEFAULT_POLL if wait is None else wait
                self.say(f"status: in progress{f' ({progress})' if progress else ''}; next poll in {wait:g} s")
                self._wait(wait, "status")
                continue
            if response.status_code == 200:
                try:
                    manifest = response.json()
                    outputs = manifest["output"]
                    if not isinstance(outputs, list):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise BulkExportError(f"status {status_url}: 200 but not a Bulk Data manifest (no output list)") from None
                self.say(f"status: complete, {len(outputs)} file(s), {len(manifest.get('error') or [])} error file(s)")
                return manifest
            raise BulkExportError(f"status {status_url}: export failed, HTTP {response.status_code}{_outcome_text(response)}")

    def cancel(self, status_url: str) -> None:
        """DELETE the status URL (Bulk Data "Delete a Bulk Data Request"); best effort, bounded."""
        try:
            response = self.request("DELETE", status_url, "cancel")
            self.say(f"cancel: DELETE {status_url}: HTTP {response.status_code}")
        except BulkExportError as exc:
            self.say(f"cancel: {exc}")

    def download(self, manifest: dict, folder: Path) -> ExportResult:
        result = ExportResult(folder)
        authorize = bool(manifest.get("requiresAccessToken"))
        counts: dict[str, int] = {}
        outputs = [o for o in manifest.get("output") or [] if isinstance(o, dict)]
        for number, output in enumerate(outputs, 1):
            kind = str(output.get("type") or "Resource")
            counts[kind] = counts.get(kind, 0) + 1
            target = folder / f"{kind}.{counts[kind]:03d}.ndjson"
            size, resumed = self._fetch_file(str(output.get("url") or ""), target, authorize, self.max_file_bytes)
            result.files.append(target)
            result.bytes += size
            result.resumed += resumed
            self.say(f"download: {number}/{len(outputs)} {target.name} ({size:,} bytes{', resumed' if resumed else ''})")
        for number, entry in enumerate([e for e in manifest.get("error") or [] if isinstance(e, dict)], 1):
            target = folder / "errors" / f"OperationOutcome.{number:03d}.ndjson"
            self._fetch_file(str(entry.get("url") or ""), target, authorize, MAX_ERROR_BYTES)
            result.error_files += 1
            for line in target.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    result.errors += outcome_issues(json.loads(line)) if line.strip() else []
                except ValueError:
                    result.errors.append(f"unreadable line in {target.name}")
        return result

    def _fetch_file(self, url: str, target: Path, authorize: bool, limit: int) -> tuple[int, bool]:
        """Stream `url` to `target`, continuing a `.part` file with a Range request; (bytes, resumed)."""
        import requests

        if not url.startswith(("https://", "http://")):
            raise BulkExportError(f"download: the manifest lists {url!r}, not an http(s) URL")
        if target.exists():  # finished in an earlier run
            return target.stat().st_size, False
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        resumed = False
        for _ in range(MAX_RETRIES + 1):
            have = part.stat().st_size if part.exists() else 0
            headers = {"Accept": "application/fhir+ndjson"} | ({"Range": f"bytes={have}-"} if have else {})
            response = self.request("GET", url, "download", authorize=authorize, headers=headers, stream=True)
            with response:
                if response.status_code == 416 and have:  # the part already holds the whole file
                    break
                if response.status_code not in (200, 206):
                    raise BulkExportError(f"download {url}: HTTP {response.status_code}{_outcome_text(response)}")
                if response.status_code == 206 and have:
                    resumed, mode = True, "ab"
                else:
                    have, mode = 0, "wb"  # the server ignored Range: start again
                try:
                    with part.open(mode) as handle:
                        for chunk in response.iter_content(CHUNK):  # module-level, so tests can make it small
                            have += len(chunk)
                            if have > limit:
                                raise BulkExportError(f"download {url}: larger than {limit:,} bytes; stopped")
                            handle.write(chunk)
                            self._check_deadline("download")
                except requests.RequestException as exc:  # a broken stream: resume from what arrived
                    self.say(f"download: {target.name} interrupted after {have:,} bytes ({type(exc).__name__}); resuming")
                    continue
                except OSError as exc:
                    raise BulkExportError(f"download {url}: cannot write {part}: {exc}") from None
            break
        else:
            raise BulkExportError(f"download {url}: broken off {MAX_RETRIES + 1} times")
        part.replace(target)
        return target.stat().st_size, resumed


# --- the command's part ---------------------------------------------------------------------------------------

STATE = "export.state"  # JSON, but not *.json: replay and the process pool read *.json files as cases


def run_export(client: BulkClient, folder: Path, group: str | None, filters: list[str]) -> ExportResult:
    """Kick off (or resume) an export into `folder` and download it; Ctrl-C cancels it on the server."""
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state and (state.get("base") != client.base or state.get("group") != group):
        raise BulkExportError(f"{folder} holds an export from {state.get('base')} (group {state.get('group')}); use another --download-dir")
    status_url = state.get("status_url")
    if not state and any(folder.glob("*.ndjson*")):
        raise BulkExportError(f"{folder} already holds NDJSON files from another export; use another --download-dir")
    try:
        if state.get("manifest") is None:
            if status_url is None:
                status_url = client.kick_off(group, EXPORT_TYPES, filters)
                state = {"base": client.base, "group": group, "status_url": status_url, "manifest": None}
                state_file.write_text(json.dumps(state))
            else:
                client.say(f"resuming: polling {status_url} again")
            state["manifest"] = client.poll(status_url)
            state_file.write_text(json.dumps(state))
        else:
            client.say(f"resuming: the manifest is in {state_file}; downloading what is missing")
        return client.download(state["manifest"], folder)
    except KeyboardInterrupt:
        if status_url:
            client.say("interrupted: cancelling the export on the server")
            client.cancel(status_url)
            state_file.unlink(missing_ok=True)
        raise


def run_export_command(args, ruleset, progress) -> tuple[int, Path | None]:
    """`screen --from-fhir`: export, then hand the folder to screening; (exit code, folder or None to stop)."""
    import requests

    from service.hook_client import HookClientError, Signer

    base = args.from_fhir.rstrip("/")
    if "://" in args.out and not args.download_dir:
        folder = Path("bulk-export")
    else:
        folder = Path(args.download_dir) if args.download_dir else Path(args.out).with_name(Path(args.out).stem + "-export")
    session = requests.Session()
    try:
        if args.smart_key:
            try:
                signer = Signer(args.smart_key, args.smart_client_id, args.smart_kid)
            except HookClientError as exc:
                print(f"screen: {str(exc).replace('--jwt-key', '--smart-key')}", file=sys.stderr)
                return 2, None
            auth = SmartBackend(base, args.smart_client_id, signer, args.smart_scope, session)
        else:
            import os

            token = args.token or os.environ.get("CDS_BULK_TOKEN")
            auth = StaticToken(token) if token else NoAuth()
        client = BulkClient(base, auth, session, deadline=time.monotonic() + args.export_timeout)
        try:
            filters = type_filters(ruleset) if client.supports_type_filter() else []
            client.say(f"_typeFilter: {'by the rules codes' if filters else 'not used (the server does not list it)'}")
            result = run_export(client, folder, args.group, filters)
        except BulkExportError as exc:
            print(f"screen: export failed: {exc}", file=sys.stderr)
            return 1, None
        except KeyboardInterrupt:
            print("screen: interrupted; the export was cancelled", file=sys.stderr)
            return 130, None
    finally:
        session.close()
    print(f"export: {len(result.files)} file(s), {result.bytes:,} bytes in {folder}"
          f"{f', {result.resumed} resumed' if result.resumed else ''}", file=sys.stderr)
    if result.errors or result.error_files:
        print(f"export: the server reported {len(result.errors)} error(s) in {result.error_files} error file(s); "
              f"the screening below may miss those resources:", file=sys.stderr)
        for issue in result.errors[:10]:
            print(f"  {issue}", file=sys.stderr)
        return 1, folder
    return 0, folder

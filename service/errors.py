"""Domain errors with an HTTP status and a stable code; the web layer maps them to JSON."""
from __future__ import annotations


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details

    def body(self) -> dict:
        """The JSON error body: {"error": {"code", "message", ...details}}."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="cds-services"'}


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class PreconditionFailed(ServiceError):
    """CDS Hooks 2.0: the data could be had neither from prefetch nor from the FHIR server."""

    status = 412
    code = "prefetch_unavailable"


class ServiceUnavailable(ServiceError):
    status = 503
    code = "unavailable"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"

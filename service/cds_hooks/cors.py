"""CORS for browser-based CDS clients (CDS Hooks 2.0 "Cross-Origin Resource Sharing").

The sandbox and SMART-era EHRs call from a browser, so every CDS endpoint answers the
preflight and allows Authorization and Content-Type. Allowed origins are configured
(`CDS_CORS_ORIGINS`, default `*`); with a list, the request origin is echoed when it
is on it and `Vary: Origin` keeps caches honest.
"""
from __future__ import annotations

from flask import Flask, Response, request

EXPOSED = "X-Calcinosis-Skipped-Resources, X-Calcinosis-Incomplete, X-Calcinosis-Rules, X-Calcinosis-Ignored-Orders"


def init_app(app: Flask) -> None:
    """Add CORS headers to every response under /cds-services."""
    allowed = [o.strip() for o in app.config["CORS_ORIGINS"].split(",") if o.strip()]

    @app.after_request
    def add_cors_headers(response: Response) -> Response:
        if not request.path.startswith("/cds-services"):
            return response
        origin = request.headers.get("Origin")
        if "*" in allowed:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin and origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        else:
            return response
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Expose-Headers"] = EXPOSED
        response.headers["Access-Control-Max-Age"] = "600"
        return response

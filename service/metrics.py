"""Prometheus metrics. Under gunicorn the workers share them through PROMETHEUS_MULTIPROC_DIR
(set by gunicorn.conf.py); without it (tests, Flask's server) one process registry is used."""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REQUESTS = Counter("cds_requests_total", "CDS Hooks requests answered", ["service", "endpoint", "status"])
LATENCY = Histogram(
    "cds_request_seconds", "Time to answer a CDS Hooks request", ["service", "endpoint", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CARDS = Counter("cds_cards_total", "Cards returned", ["rule", "indicator"])
FHIR_CALLS = Counter("cds_fhir_fallback_calls_total", "HTTP calls made to EHR FHIR servers for missing prefetch")
FHIR_FAILURES = Counter("cds_fhir_fallback_failures_total", "Prefetch keys the FHIR server could not supply", ["key"])
RULE_RELOADS = Counter("cds_rule_reloads_total", "Rule set reload attempts", ["result"])
CARD_RECORD_FAILURES = Counter(
    "cds_card_record_failures_total", "Hook answers whose issued cards could not be recorded (the cards were still answered)"
)
INVALID_RESOURCES = Counter("cds_invalid_resources_total", "FHIR resources skipped as invalid")


def exposition() -> tuple[bytes, str]:
    """Render every metric, merged across gunicorn workers when running multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

"""The rule engine: rule files in, findings out. No Flask, no HTTP, no fhir.resources.

The engine reads plain data through the `Record` protocol (`record.py`); `facts.py` computes each fact from it, so the
same evaluation serves the CDS Hooks endpoint, `rules explain`, `rules test` and
`replay`.
"""

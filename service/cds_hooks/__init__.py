"""The CDS Hooks 2.0 protocol and nothing else: routes, request parsing, prefetch, cards, auth, CORS, feedback.

Spec: HL7/cds-hooks v2.0.1, input/pagecontent/index.md.
"""

"""calcinosis-cds: a CDS Hooks 2.0 service for calciphylaxis risk and calcinosis workup.

Kept free of imports so `service.engine` can be used (rules check, replay workers)
without loading Flask or requests.
"""


def create_app(test_config: dict | None = None):
    """Build the Flask app (see service.app.create_app); gunicorn serves `service:create_app()`."""
    from .app import create_app as build

    return build(test_config)

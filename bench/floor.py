"""The floor: the least a Flask app must do to answer the same request.

It reads the body, parses it with the standard library's `json.loads` and returns one
constant card, under plain gunicorn (2 sync workers, no config file). Whatever the
service costs above this is the service's own work: the rules, the patient record,
card rendering, logging and its gunicorn settings.

    gunicorn --workers 2 --bind 127.0.0.1:8090 'bench.floor:app'
"""
from __future__ import annotations

import json

from flask import Flask, Response, request

CARD = {
    "cards": [
        {
            "uuid": "6f1c3b52-6f43-4d7e-9a0e-1d2c3b4a5f60",
            "summary": "Calciphylaxis risk: Ca x P 76.2 mg²/dL² with kidney failure",
            "indicator": "warning",
            "detail": "Constant card from the benchmark floor app.",
            "source": {"label": "Calcinosis CDS rules", "topic": {"system": "urn:calcinosis-cds:rule", "code": "calciphylaxis-risk"}},
        }
    ]
}
CARD_BYTES = json.dumps(CARD).encode()


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/cds-services/<service_id>")
    def invoke(service_id: str) -> Response:
        body = json.loads(request.get_data(cache=False))
        if not isinstance(body, dict) or "hook" not in body:
            return Response(b'{"error":"bad request"}', status=400, mimetype="application/json")
        return Response(CARD_BYTES, mimetype="application/json")

    return app


app = create_app()

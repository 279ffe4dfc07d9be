"""The peer: HealthChain 0.16.1 answering the same hook request with one constant card.

HealthChain's own CDS Hooks service (FastAPI) parses the request body into its pydantic
`CDSRequest` and validates the constant `CDSResponse` on the way out; it does no clinical
work. It runs in its own virtualenv (`bench/peer.py` makes it), never the project's, under
gunicorn with uvicorn workers, uvloop and httptools:

    <peer venv>/bin/gunicorn --pythonpath bench -k uvicorn.workers.UvicornWorker -w 2 \
        --bind 127.0.0.1:8091 'peer_app:app'

This file imports nothing from the project (the peer's virtualenv does not have it).
"""
from healthchain.gateway import CDSHooksService, HealthChainAPI
from healthchain.gateway.cds import CDSHooksConfig
from healthchain.models import CDSRequest, CDSResponse

SERVICE_ID = "calcinosis-risk"  # bench.data.SERVICE_ID: the same URL as the service and the floor

CARD = {
    "summary": "Calciphylaxis risk: Ca x P 76.2 mg²/dL² with kidney failure",
    "indicator": "warning",
    "detail": "Constant card from the benchmark peer app.",
    "source": {"label": "Calcinosis CDS rules", "topic": {"system": "urn:calcinosis-cds:rule", "code": "calciphylaxis-risk"}},
}

# Mounted at the root, so the hook is served at /cds-services/<id> like the other two apps.
cds = CDSHooksService(config=CDSHooksConfig(base_path=""))


@cds.hook("patient-view", id=SERVICE_ID)
def calcinosis_risk(request: CDSRequest) -> CDSResponse:
    return CDSResponse(cards=[CARD])


app = HealthChainAPI(title="bench peer", enable_events=False)
app.register_service(cds)

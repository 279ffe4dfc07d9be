"""Malformed bodies get a 4xx naming the problem, never a 500: deep nesting, numbers out of range, oversized chunked bodies."""
from __future__ import annotations

import io

import orjson
import pytest

from tests.conftest import make_app
from tests.requests_builder import request_with_prefetch

URL = "/cds-services/calcinosis-risk"
NAME = "esrd-dialysis-high-product.json"
SENTINEL = 123456.789


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def test_a_hook_body_nested_1000_deep_is_400_malformed_json(client):
    body = orjson.dumps(request_with_prefetch(NAME)).replace(b'"context":{', b'"deep":' + deep(1000) + b',"context":{', 1)
    response = client.post(URL, data=body, content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "malformed_json"
    assert "nested too deeply" in response.json["error"]["message"]


def test_deep_nesting_inside_a_prefetch_entry_is_400_too(client):
    request = request_with_prefetch(NAME)
    request["prefetch"]["observations"]["entry"][0]["resource"]["extension"] = "DEEP"
    body = orjson.dumps(request).replace(b'"DEEP"', deep(5000))
    response = client.post(URL, data=body, content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "malformed_json"


def test_a_feedback_body_nested_5000_deep_is_400_malformed_json(client):
    response = client.post(URL + "/feedback", data=b'{"feedback": ' + deep(5000) + b"}", content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "malformed_json"


def calcium_value_replaced_by(literal: bytes) -> bytes:
    request = request_with_prefetch(NAME)
    calcium = next(
        e["resource"] for e in request["prefetch"]["observations"]["entry"]
        if e["resource"].get("valueQuantity", {}).get("value") == 10.4
    )
    calcium["valueQuantity"]["value"] = SENTINEL
    body = orjson.dumps(request)
    assert body.count(str(SENTINEL).encode()) == 1
    return body.replace(str(SENTINEL).encode(), literal)


@pytest.mark.parametrize("literal", [b"1" * 400, b"1e999", b"-1e999"], ids=["400-digit integer", "1e999", "-1e999"])
def test_a_value_out_of_range_makes_that_observation_invalid_and_skipped(client, literal):
    response = client.post(URL, data=calcium_value_replaced_by(literal), content_type="application/json")
    assert response.status_code == 200
    assert response.headers["X-Calcinosis-Skipped-Resources"] == "1"
    text = response.get_data(as_text=True).lower()
    assert "inf" not in text.replace("info", "") and "111111111111" not in text


def test_a_number_out_of_range_outside_any_resource_is_400(client):
    body = orjson.dumps(request_with_prefetch(NAME)).replace(b'"context":{', b'"x":1e999,"context":{', 1)
    response = client.post(URL, data=body, content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "malformed_json"


def chunked_post(app, path: str, body: bytes):
    """What gunicorn hands the app for `Transfer-Encoding: chunked`: no Content-Length, input terminated."""
    return app.test_client().post(
        path, input_stream=io.BytesIO(body), content_type="application/json",
        headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True},
    )


@pytest.mark.parametrize("path", [URL, URL + "/feedback"])
def test_a_chunked_body_over_the_limit_is_413_not_truncated(tmp_path, path):
    app = make_app(tmp_path, MAX_CONTENT_LENGTH=100_000)
    valid = orjson.dumps(request_with_prefetch(NAME))
    response = chunked_post(app, path, valid + b" " * 200_000)  # valid JSON, then padding past the limit
    assert response.status_code == 413 and response.json["error"]["code"] == "payload_too_large"
    assert "100000 bytes" in response.json["error"]["message"]


def test_a_chunked_body_under_the_limit_is_answered(tmp_path):
    app = make_app(tmp_path, MAX_CONTENT_LENGTH=100_000)
    response = chunked_post(app, URL, orjson.dumps(request_with_prefetch(NAME)) + b" " * 1000)
    assert response.status_code == 200 and response.json["cards"]

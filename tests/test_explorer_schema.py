"""The explorer's API conforms to its own OpenAPI schema (schemathesis, in-process, bounded).

schemathesis (4.x) loads /openapi.json from the ASGI app and, for every operation, sends
schema-valid and schema-invalid requests (its examples, coverage and fuzzing phases;
`MAX_EXAMPLES` each), then checks that every status code is declared, every body matches the
declared schema and content type, declared headers (Retry-After) are sent, invalid data is
rejected, and a method the path does not have answers 405 with `Allow`. The direct tests
below pin the fixes one by one, so a failure names what regressed.
"""

from __future__ import annotations

import hypothesis
import pytest
from fastapi.testclient import TestClient

from mlsae_core.explorer.options import ExplorerSettings
from mlsae_core.explorer.server import create_app
from tests.test_explorer_api import PROMPT, examples_table, tiny_pair

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 20
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "unsupported_method",
)
CONFIG = {
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": False},
    },
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
}


def _app(**settings):
    sae, tf = tiny_pair()
    return create_app(
        sae,
        tf,
        examples_table=examples_table(sae, tf),
        settings=ExplorerSettings(max_prompt_tokens=40, **settings),
    )


# Loaded at import: schemathesis' lazy loader (`pytest.from_fixture`) needs pytest < 9
# (it sets `node._nodeid`). Building the tiny app takes about a second.
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", _app(), config=schemathesis.Config.from_dict(CONFIG)
)


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a red test is reproducible
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_api_conforms_to_its_schema(case) -> None:
    case.call_and_validate()


# ----- the fixes, one by one ----------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with TestClient(_app(), raise_server_exceptions=False) as c:
        yield c


def test_every_status_is_declared_with_the_error_body(client) -> None:
    spec = client.get("/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            want = {"200", "400", "413", "500", "503"} | ({"422"} if path != "/api/info" else set())
            want |= {"404"} if path == "/api/latent/{latent}" else set()
            assert set(op["responses"]) == want, (path, method, set(op["responses"]))
            for code in want - {"200"}:
                body = op["responses"][code]["content"]["application/json"]["schema"]
                assert body == error, (path, code, body)
            assert "Retry-After" in op["responses"]["503"]["headers"]
    detail = spec["components"]["schemas"]["ErrorBody"]["properties"]["detail"]
    assert detail["type"] == "string"


def test_422_body_is_the_declared_one(client) -> None:
    r = client.post("/api/heatmap", json={"prompt": PROMPT, "position": -1})
    assert r.status_code == 422
    body = r.json()
    assert isinstance(body["detail"], str) and "position" in body["detail"]
    assert body["errors"] and body["errors"][0]["field"] == "position"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": PROMPT, "position": True, "layer": 0},
        {"prompt": PROMPT, "position": 0, "layer": False},
        {"prompt": PROMPT, "position": 0, "layer": 0, "latent": True},
        {"prompt": PROMPT, "position": 0, "layer": 0, "top_k": True},
        {"prompt": PROMPT, "position": 0, "layer": 0, "factor": True},
        {"prompt": PROMPT, "position": "1", "layer": 0},
        {"prompt": PROMPT, "position": 1.0, "layer": 0},
    ],
)
def test_booleans_and_strings_are_not_integers(client, body) -> None:
    r = client.post("/api/logits", json=body)
    assert r.status_code == 422, r.text


def test_405_says_what_is_allowed(client) -> None:
    r = client.get("/api/prompt")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = client.delete("/api/examples?latent=0&layer=0")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    assert isinstance(r.json()["detail"], str)


def test_busy_is_503_with_retry_after() -> None:
    """Beyond the workers and the queue, a request is refused at once, saying when to retry."""
    import threading

    app = _app(workers=1, max_queue=0)
    gate = app.state.explorer.gate
    release = threading.Event()
    with TestClient(app, raise_server_exceptions=False) as c:
        started = threading.Event()

        def hold() -> None:
            started.set()
            release.wait(10)

        import asyncio

        blocker = threading.Thread(target=lambda: asyncio.run(gate.run(hold)))
        blocker.start()
        assert started.wait(10)
        try:
            r = c.post("/api/prompt", json={"prompt": PROMPT})
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"]
            assert c.get("/api/info").json()["memory"]["rejected"] == 1
        finally:
            release.set()
            blocker.join(10)
        assert c.post("/api/prompt", json={"prompt": PROMPT}).status_code == 200

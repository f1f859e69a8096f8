"""Fuzz the API from its own OpenAPI document (schemathesis), as an author and as a checker,
with real hub tokens through the proxy: no input may cause a server error, and afterwards the
audit chain still verifies and no request was released."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from airlock.service.app import create_app
from tre.audit import verify_chain

from .conftest import postgres_db


@pytest.fixture
def db(request, tmp_path):
    return postgres_db(request, tmp_path)


pytestmark = [pytest.mark.postgres, pytest.mark.hub]


# the document the live service publishes at <prefix>openapi.json (compared in the test)
SPEC = create_app(None, None, prefix="/services/airlock/").openapi()  # type: ignore[arg-type]
schema = schemathesis.openapi.from_dict(SPEC)


@schema.parametrize()
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_never_fails_with_a_server_error(case, client):
    base = client.live.hub.url
    assert client.call(None, "GET", "openapi.json").json() == SPEC
    for who in ("alice", "checker1"):
        token = client.live.tokens[who]
        response = case.call(base_url=base, headers={"Authorization": f"token {token}"})
        case.validate_response(response, checks=[not_a_server_error])
    with client.service.factory() as s:
        assert verify_chain(s) == []

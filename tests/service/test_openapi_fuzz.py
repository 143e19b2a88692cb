"""Property test of the whole HTTP surface: requests generated from the OpenAPI schema
(schemathesis, in-process over ASGI) must never get a 5xx. Bounded: a few examples per
operation, so it runs in seconds."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from service.app import create_app


@pytest.fixture(scope="module")
def api_schema(settings):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(
    max_examples=12, deadline=None, suppress_health_check=list(hypothesis.HealthCheck)
)
def test_no_request_gets_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error])

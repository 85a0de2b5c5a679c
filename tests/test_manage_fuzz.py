"""Bad requests to the management API get 4xx, never 500: schemathesis generates
requests from the API's own OpenAPI document (valid and invalid path parameters,
bodies, query strings and headers) and sends them to a real instance."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

import fleet
from fleet import _api
from fleet._manage.openapi import spec

HERE = os.path.dirname(__file__)

# Stopping the instance or following its event stream ends or holds the run: left out.
schema = (schemathesis.openapi.from_dict(spec())
          .exclude(path="/api/instance/shutdown")
          .exclude(path="/api/events/stream"))


@pytest.fixture(scope="module")
def target():
    """(management URL, auth headers) of an instance with one application deployed."""
    fleet.shutdown()
    fleet.start(http_options={"port": 0}, management_options={"port": 0})
    inst = _api._instance
    assert isinstance(inst, _api.Instance) and inst.ops is not None
    headers = {"Authorization": f"Bearer {inst.ops.token}"}
    url = inst.ops.url()
    r = httpx.put(f"{url}/api/applications/fuzzed", headers=headers, timeout=60,
                  params={"app_dir": HERE},
                  json={"import_path": "apps.cli_apps:app", "route_prefix": "/fuzzed"})
    assert r.status_code == 202
    try:
        yield url, headers
    finally:
        fleet.shutdown()


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, target):
    url, headers = target
    response = case.call(base_url=url, headers=headers, timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert body["error"] and body["request_id"], body

"""The call-method header never goes around an app: an ingress app sees every request,
and plain deployments expose only their own public methods, keeping no trace of names
they refused."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import httpx
import pytest
from conftest import start_instance
from fastapi import Depends, FastAPI, Header, HTTPException
from starlette.requests import Request

import fleet

guarded = FastAPI()


def require_token(authorization: str = Header("")) -> None:
    if authorization != "Bearer good":
        raise HTTPException(status_code=403, detail="no token")


@fleet.deployment
@fleet.ingress(guarded)
class Guarded:
    def __init__(self) -> None:
        self.items = ["a", "b"]

    @guarded.get("/items", dependencies=[Depends(require_token)])
    def list_items(self) -> list[str]:
        return self.items

    def delete_all(self) -> str:
        self.items = []
        return "deleted"


@fleet.deployment(user_config={"v": 1})
class Plain:
    def __init__(self) -> None:
        self.secret_state = "hidden"

    def __call__(self, request: Request) -> str:
        return "call"

    def shown(self, request: Request) -> str:
        return "shown"

    def _private(self, request: Request) -> str:
        return "private"

    def reconfigure(self, config: dict) -> None:
        self.config = config

    def check_health(self) -> None:
        pass

    async def kept_names(self) -> list[str]:
        """Every method name the replica remembers (for the no-trace test)."""
        from fleet._replica.replica import Replica
        rep = next(o for o in gc.get_objects() if isinstance(o, Replica))
        return sorted({*rep._methods, *rep._slow, *rep.http._takes})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    fleet.shutdown()
    inst = start_instance()
    fleet.run(Guarded.bind(), name="guarded", route_prefix="/guarded")
    fleet.run(Plain.bind(), name="plain", route_prefix="/plain")
    try:
        yield inst.http_url
    finally:
        fleet.shutdown()


def test_ingress_app_sees_every_request_so_the_header_cannot_skip_its_auth(url):
    r = httpx.get(f"{url}/guarded/items", headers={"X-SERVE-CALL-METHOD": "delete_all"})
    assert r.status_code == 403 and r.json() == {"detail": "no token"}
    r = httpx.get(f"{url}/guarded/items", headers={"Authorization": "Bearer good",
                                                   "X-SERVE-CALL-METHOD": "delete_all"})
    assert r.status_code == 200 and r.json() == ["a", "b"]     # nothing was deleted
    r = httpx.post(f"{url}/guarded/", headers={"X-SERVE-CALL-METHOD": "delete_all"})
    assert r.status_code == 404                                # the app's own answer
    # handles still reach the class's methods
    assert fleet.get_app_handle("guarded").delete_all.remote().result() == "deleted"


def test_plain_deployment_header_reaches_public_methods_and_call(url):
    assert httpx.get(f"{url}/plain").text == "call"
    assert httpx.get(f"{url}/plain", headers={"X-SERVE-CALL-METHOD": "shown"}).text == "shown"
    assert httpx.get(f"{url}/plain",
                     headers={"X-SERVE-CALL-METHOD": "__call__"}).text == "call"


@pytest.mark.parametrize("name", ["_private", "__init__", "__del__", "__class__",
                                  "reconfigure", "check_health", "secret_state", "nope",
                                  "_fleet_batch_x"])
def test_private_lifecycle_attribute_and_unknown_names_are_404(url, name):
    r = httpx.get(f"{url}/plain", headers={"X-SERVE-CALL-METHOD": name})
    assert r.status_code == 404, r.text
    body = r.json()
    assert body["deployment"] == "Plain" and name in body["error"]


def test_refused_names_leave_no_trace_in_the_replica(url):
    handle = fleet.get_app_handle("plain")
    with httpx.Client(base_url=url) as client:
        for i in range(100):
            # long names: handling one may pass the 1 ms after which the replica used
            # to remember the name as a slow method, for good
            name = f"unknown_{i}_" + "x" * 50_000
            r = client.get("/plain", headers={"X-SERVE-CALL-METHOD": name})
            assert r.status_code == 404
            assert len(r.json()["method"]) < 100       # long names are not echoed whole
    kept = handle.kept_names.remote().result()
    assert not [name for name in kept if name.startswith("unknown")]
    assert len(kept) <= 5


def test_call_method_header_can_be_switched_off():
    fleet.shutdown()
    inst = start_instance(call_method_header=False)
    try:
        fleet.run(Plain.bind(), name="plain", route_prefix="/plain")
        r = httpx.get(f"{inst.http_url}/plain", headers={"X-SERVE-CALL-METHOD": "shown"})
        assert r.status_code == 200 and r.text == "call"
    finally:
        fleet.shutdown()

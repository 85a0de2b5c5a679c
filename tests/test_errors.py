"""Errors tell clients an id, not internals: every HTTP response carries X-Request-ID,
error bodies say what happened in fleet's words, gRPC errors carry the id as trailing
metadata, and the exception itself goes to the log, ``fleet.status()`` and handles."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI
from helpers import wait_for
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse

import fleet
from fleet import exceptions
from fleet.drivers import gRPCIngress

SERVICER_FN = "protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server"
HEX32 = re.compile(r"[0-9a-f]{32}")


@fleet.deployment
class Api:
    def __call__(self, request: Request) -> str:
        return "ok"

    def fail(self, request: Request) -> str:
        raise ValueError("password=hunter2 rejected")

    def teapot(self, request: Request) -> str:
        raise HTTPException(status_code=418, detail="I chose this message")

    def custom(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse("my own words", status_code=409)

    async def hang(self) -> None:
        await asyncio.Event().wait()


boom_app = FastAPI()


@fleet.deployment
@fleet.ingress(boom_app)
class BoomApp:
    @boom_app.get("/boom")
    def boom(self) -> str:
        raise RuntimeError("api_key=xyz leaked?")


@fleet.deployment
class LeakyConstructor:
    def __init__(self) -> None:
        raise ConnectionError("could not reach postgres://app:s3cret@db:5432/prod")


@fleet.deployment(is_driver_deployment=True)
class Echo(pb_grpc.EchoServiceServicer, gRPCIngress):
    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        if request.text == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "go away")
        raise ValueError("token=abc123 is invalid")


def _start(expose: bool) -> tuple[str, int]:
    fleet.shutdown()
    fleet.start(http_options={"port": 0, "expose_errors": expose},
                grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER_FN],
                              "expose_errors": expose})
    fleet.run(Api.bind(), name="api", route_prefix="/api")
    fleet.run(Echo.bind(), name="echo", route_prefix="/echo")
    proxies = fleet.status()["proxies"]
    return f"http://127.0.0.1:{proxies['http']['port']}", proxies["grpc"]["port"]


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[str, int]]:
    try:
        yield _start(expose=False)
    finally:
        fleet.shutdown()


def test_every_http_response_carries_a_request_id(ports):
    url, _ = ports
    with httpx.Client(base_url=url) as client:
        responses = [client.get("/api"), client.get("/nowhere"), client.get("/-/healthz"),
                     client.get("/-/nope"), client.post("/api", content=b"x" * (101 * 2**20)),
                     client.get("/api", headers={"X-SERVE-CALL-METHOD": "missing"}),
                     client.get("/api", headers={"X-SERVE-CALL-METHOD": "fail"})]
    assert [r.status_code for r in responses] == [200, 404, 200, 404, 413, 404, 500]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(HEX32.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)
    for r in responses:
        if r.status_code >= 400 and r.headers["content-type"] == "application/json" \
                and "request_id" in r.json():
            assert r.json()["request_id"] == r.headers["x-request-id"]


def test_a_clients_own_valid_request_id_is_kept_and_a_bad_one_replaced(ports):
    url, _ = ports
    mine = "client-7:abc.DEF_1"
    r = httpx.get(f"{url}/api", headers={"X-Request-ID": mine})
    assert r.headers["x-request-id"] == mine
    r = httpx.get(f"{url}/api", headers={"X-SERVE-CALL-METHOD": "fail", "X-Request-ID": mine})
    assert r.json() == {"error": "internal error", "request_id": mine}
    for bad in ["x" * 129, "has space", "semi;colon", "<script>"]:
        r = httpx.get(f"{url}/api", headers={"X-Request-ID": bad})
        assert HEX32.fullmatch(r.headers["x-request-id"]), bad


def test_user_exception_is_a_500_without_its_text_and_handles_get_it_whole(ports):
    url, _ = ports
    r = httpx.get(f"{url}/api", headers={"X-SERVE-CALL-METHOD": "fail"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error", "request_id": r.headers["x-request-id"]}
    assert "hunter2" not in r.text and "ValueError" not in r.text
    rid = r.headers["x-request-id"]

    def last_error() -> dict | None:
        dep = fleet.status()["applications"]["api"]["deployments"]["Api"]
        found = dep.get("last_error")
        return found if found and found["request_id"] == rid else None

    # fleet status keeps it: the message and the replica's traceback, under the id
    found = wait_for(last_error)
    assert found["error"] == "ValueError: password=hunter2 rejected"
    assert "raise ValueError" in found["traceback"] and "in fail of" in found["traceback"]
    request = fleet._serve_request.ServeRequest(None)
    with pytest.raises(ValueError, match="password=hunter2 rejected"):
        fleet.get_app_handle("api").fail.remote(request).result()


def test_an_ingress_apps_own_500_passes_and_its_exception_is_logged(ports, capfd):
    url, _ = ports
    # deployed here, so that its replica's stderr is the one capfd captures
    fleet.run(BoomApp.bind(), name="boomapp", route_prefix="/boomapp")
    r = httpx.get(f"{url}/boomapp/boom")
    assert r.status_code == 500 and "api_key" not in r.text     # Starlette's own answer
    assert HEX32.fullmatch(r.headers["x-request-id"])
    seen = ""

    def logged() -> bool:
        nonlocal seen
        seen += capfd.readouterr().err
        return "GET /boomapp/boom raised after answering" in seen

    wait_for(logged)
    assert "RuntimeError: api_key=xyz leaked?" in seen


def test_answers_the_users_code_chose_pass_as_they_are(ports):
    url, _ = ports
    r = httpx.get(f"{url}/api", headers={"X-SERVE-CALL-METHOD": "teapot"})
    assert r.status_code == 418 and r.json() == {"detail": "I chose this message"}
    r = httpx.get(f"{url}/api", headers={"X-SERVE-CALL-METHOD": "custom"})
    assert r.status_code == 409 and r.text == "my own words"
    assert HEX32.fullmatch(r.headers["x-request-id"])


def test_constructor_traceback_stays_out_of_503s_but_is_in_status(ports):
    url, _ = ports
    with pytest.raises(fleet.DeploymentFailedError, match="s3cret"):
        fleet.run(LeakyConstructor.bind(), name="leaky", route_prefix="/leaky")
    try:
        r = httpx.get(f"{url}/leaky")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": "the deployment failed to start",
                            "request_id": r.headers["x-request-id"]}
        assert "s3cret" not in r.text and "Traceback" not in r.text
        dep = fleet.status()["applications"]["leaky"]["deployments"]["LeakyConstructor"]
        assert dep["status"] == "DEPLOY_FAILED" and "s3cret" in dep["message"]
    finally:
        fleet.delete("leaky")


def test_grpc_errors_carry_an_id_and_a_short_detail(ports):
    _, grpc_port = ports
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.EchoServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Say(pb.EchoRequest(text="x"), metadata=(("application", "echo"),),
                     timeout=10)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == "internal error"
        ids = [v for k, v in err.value.trailing_metadata() if k == "x-request-id"]
        assert len(ids) == 1 and HEX32.fullmatch(ids[0])
        # the client's own id comes back; a status the servicer chose passes as it is
        with pytest.raises(grpc.RpcError) as err:
            stub.Say(pb.EchoRequest(text="abort"), timeout=10,
                     metadata=(("application", "echo"), ("x-request-id", "mine-1")))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "go away"
        assert ("x-request-id", "mine-1") in tuple(err.value.trailing_metadata())
        # an application that does not exist: an id too
        with pytest.raises(grpc.RpcError) as err:
            stub.Say(pb.EchoRequest(text="x"), metadata=(("application", "none"),),
                     timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert any(k == "x-request-id" for k, _ in err.value.trailing_metadata())


def test_a_cancelled_handle_call_raises_request_cancelled_error(ports):
    response = fleet.get_app_handle("api").hang.remote()
    response.cancel()
    with pytest.raises(fleet.RequestCancelledError, match="cancelled by its caller"):
        response.result(timeout_s=10)

    async def awaited() -> None:
        r = fleet.get_app_handle("api").hang.remote()
        r.cancel()
        await r

    with pytest.raises(fleet.RequestCancelledError):
        asyncio.run(awaited())


def test_expose_errors_adds_type_and_message_over_http_and_grpc():
    try:
        url, grpc_port = _start(expose=True)
        r = httpx.get(f"{url}/api", headers={"X-SERVE-CALL-METHOD": "fail"})
        assert r.status_code == 500
        assert r.json() == {"error": "internal error", "request_id": r.headers["x-request-id"],
                            "type": "ValueError", "message": "password=hunter2 rejected"}
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.EchoServiceStub(channel).Say(
                    pb.EchoRequest(text="x"), metadata=(("application", "echo"),), timeout=10)
        assert err.value.details() == "internal error: ValueError: token=abc123 is invalid"
    finally:
        fleet.shutdown()


def test_fleet_run_dev_exposes_errors(tmp_path):
    here = __file__.rsplit("/", 1)[0]
    # port 0, read back from its output: a port chosen here and released could be taken
    # by another process before fleet run binds it
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "run", "apps.cli_apps:failing",
                             "--app-dir", here, "--port", "0", "--dev"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "TMPDIR": str(tmp_path)})
    try:
        assert proc.stdout is not None
        port = None
        for line in proc.stdout:
            m = re.search(r"fleet: HTTP on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
            if "press Ctrl-C" in line:
                break
        assert port, "fleet run exited before serving"
        r = httpx.get(f"http://127.0.0.1:{port}/")
        assert r.status_code == 500 and r.json()["type"] == "KeyError"
        assert "secret table" in r.json()["message"]
    finally:
        proc.terminate()
        proc.wait(60)


def test_error_table_has_a_row_for_every_fleet_exception():
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        if isinstance(cls, type) and issubclass(cls, exceptions.FleetError):
            assert cls in exceptions.ERROR_TABLE, name
    assert exceptions.client_error(ValueError("x")) == (500, "INTERNAL", "internal error")
    assert exceptions.client_error(exceptions.ReplicaError("x"))[0] == 500
    assert exceptions.client_error(fleet.BackPressureError("x"))[:2] == (503,
                                                                         "RESOURCE_EXHAUSTED")
    for status, code, message in exceptions.ERROR_TABLE.values():
        assert grpc.StatusCode[code] and 400 <= status < 600 and message

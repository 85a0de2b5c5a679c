"""Several proxy processes on one port (num_proxies=2 for HTTP and for gRPC), on real
processes and sockets: both serve, a taken port still fails, the replica holds
max_ongoing_requests across callers, and backpressure, traffic splits, shadow copies
and rolling updates behave as with one proxy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import psutil
import pytest
from conftest import Instance
from helpers import wait_for
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc

import fleet

SERVICER_FN = "protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server"


@fleet.deployment(num_replicas=2)
class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, request=None) -> str:
        return self.name


@fleet.deployment(max_ongoing_requests=2)
class Counted:
    """Records the most calls it ever ran at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.calls = 0

    async def __call__(self, request=None) -> str:
        self.now += 1
        self.calls += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(0.02)       # the work: calls overlap while it runs
        finally:
            self.now -= 1
        return "ok"

    async def seen(self) -> tuple[int, int]:
        return self.peak, self.calls


@fleet.deployment(max_ongoing_requests=1000)
class Gate:
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()

    async def open(self) -> None:
        self.event.set()


@fleet.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Held:
    def __init__(self, gate) -> None:
        self.gate = gate

    async def __call__(self, request=None) -> str:
        await self.gate.wait.remote()
        return "done"


@fleet.deployment
class Copies:
    def __init__(self) -> None:
        self.hits = 0

    async def __call__(self, request=None) -> str:
        self.hits += 1
        return "copy"

    async def count(self) -> int:
        return self.hits


@fleet.deployment(num_replicas=2)
class Echo:
    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.EchoReply(text=request.text)


@pytest.fixture(scope="module")
def two_proxies() -> Iterator[Instance]:
    """An instance with two HTTP proxies and two gRPC proxies."""
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0, "num_proxies": 2,
                              "access_log": False},
                grpc_options={"host": "127.0.0.1", "port": 0, "num_proxies": 2,
                              "grpc_servicer_functions": [SERVICER_FN]})
    try:
        yield Instance(http_port=fleet.status()["proxies"]["http"]["port"])
    finally:
        fleet.shutdown()


def _proxy_of(response: httpx.Response) -> str:
    # a request id starts with its proxy process's own random prefix
    return response.headers["x-request-id"][:16]


def _through_both(url: str, path: str) -> list[httpx.Response]:
    """Requests on new connections until both proxies answered some (the kernel hands
    each connection to one of the processes accepting on the port)."""
    answers: list[httpx.Response] = []

    def both() -> bool:
        for _ in range(10):
            with httpx.Client(base_url=url, timeout=20) as client:
                answers.append(client.get(path))
        return len({_proxy_of(r) for r in answers}) == 2

    wait_for(both, timeout_s=30)
    return answers


def test_two_proxies_serve_one_port_and_status_lists_both(two_proxies) -> None:
    http = fleet.status()["proxies"]["http"]
    assert http["port"] == two_proxies.http_port and http["host"] == "127.0.0.1"
    assert len(http["pids"]) == 2 and http["pid"] == http["pids"][0]
    assert all(psutil.pid_exists(pid) for pid in http["pids"])
    fleet.run(Named.bind("one"), name="named", route_prefix="/named")
    answers = _through_both(two_proxies.http_url, "/named")
    assert {r.status_code for r in answers} == {200}
    assert {r.text for r in answers} == {"one"}


def test_a_taken_port_fails_with_address_in_use(two_proxies) -> None:
    code = ("import fleet\n"
            "try:\n"
            f"    fleet.start(http_options={{'host': '127.0.0.1', "
            f"'port': {two_proxies.http_port}, 'num_proxies': 2}})\n"
            "except fleet.FleetError as exc:\n"
            "    print('refused:', exc)\n"
            "fleet.shutdown()\n")
    # a runtime location of its own (short: Unix socket paths are), so the script starts
    # an instance rather than attaching to this one
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "TMPDIR": tmp})
    assert "refused: the HTTP proxy cannot listen on 127.0.0.1:" in out.stdout, out.stderr
    assert "Address already in use" in out.stdout


def test_num_proxies_is_checked() -> None:
    with pytest.raises(ValueError, match="num_proxies must be a whole number"):
        fleet.start(http_options={"num_proxies": 0})
    with pytest.raises(ValueError, match="needs server=.uvicorn."):
        fleet.start(http_options={"num_proxies": 2, "server": "granian"})
    assert fleet.HTTPOptions(num_proxies="auto").num_proxies == "auto"


def test_the_replica_holds_max_ongoing_requests_across_callers(two_proxies) -> None:
    handle = fleet.run(Counted.bind(), name="counted", route_prefix="/counted")
    errors: list[str] = []

    def http_calls() -> None:
        for _ in range(10):
            with httpx.Client(base_url=two_proxies.http_url, timeout=30) as client:
                r = client.get("/counted")
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text}")

    threads = [threading.Thread(target=http_calls) for _ in range(6)]
    for t in threads:
        t.start()
    # the driver is a third caller, with its own router and counts
    responses = [handle.remote() for _ in range(20)]
    assert [r.result(timeout_s=60) for r in responses] == ["ok"] * 20
    for t in threads:
        t.join(60)
    assert errors == []
    peak, calls = handle.seen.remote().result(timeout_s=30)
    assert calls == 80
    assert peak <= 2        # max_ongoing_requests, whoever sent the calls


def test_backpressure_still_refuses_past_the_queue(two_proxies) -> None:
    gate = Gate.bind()
    fleet.run(Held.bind(gate), name="held", route_prefix="/held")
    opener = fleet.get_deployment_handle("Gate", "held")
    results: list[int] = []

    def one() -> None:
        with httpx.Client(base_url=two_proxies.http_url, timeout=30) as client:
            results.append(client.get("/held").status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    # one call runs, each proxy queues at most one more: the others are refused now
    wait_for(lambda: results.count(503) >= 8 - 1 - 2)
    opener.open.remote().result(timeout_s=30)
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert results.count(200) >= 1 and results.count(503) >= 5
    assert set(results) <= {200, 503}


def test_traffic_split_and_shadow_copies_hold_on_every_proxy(two_proxies) -> None:
    fleet.run(Named.bind("old"), name="split_old", route_prefix="/split")
    fleet.run(Named.bind("new"), name="split_new", route_prefix=None)
    copies = fleet.run(Copies.bind(), name="split_copies", route_prefix=None)
    try:
        fleet.set_traffic("/split", {"split_new": 1.0})
        fleet.shadow_traffic("/split", "split_copies", 1.0)
        answers = _through_both(two_proxies.http_url, "/split")
        assert {r.text for r in answers} == {"new"}
        wait_for(lambda: copies.count.remote().result(timeout_s=10) == len(answers))
    finally:
        fleet.set_traffic("/split", None)
        fleet.shadow_traffic("/split", "split_copies", 0.0)


def test_rolling_update_through_two_proxies_fails_no_request(two_proxies) -> None:
    fleet.run(Named.bind("v1"), name="rolling", route_prefix="/rolling")
    stop = threading.Event()
    seen: list[str] = []
    proxies: set[str] = set()
    errors: list[Any] = []

    def load() -> None:
        while not stop.is_set():
            with httpx.Client(base_url=two_proxies.http_url, timeout=30) as client:
                r = client.get("/rolling")
            if r.status_code == 200:
                seen.append(r.text)
                proxies.add(_proxy_of(r))
            else:
                errors.append((r.status_code, r.text))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) > 20)
        fleet.run(Named.bind("v2"), name="rolling", route_prefix="/rolling")
        mark = len(seen)
        wait_for(lambda: len(seen) > mark + 20 and len(proxies) == 2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert "v1" in seen and seen[-1] == "v2"


def test_two_grpc_proxies_serve_one_port(two_proxies) -> None:
    info = fleet.status()["proxies"]["grpc"]
    assert len(info["pids"]) == 2 and info["pid"] == info["pids"][0]
    assert all(psutil.pid_exists(pid) for pid in info["pids"])
    fleet.run(Echo.bind(), name="echo", route_prefix="/echo")
    md = (("application", "echo"),)
    for i in range(20):             # a new connection each time, to either proxy
        with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
            reply = pb_grpc.EchoServiceStub(channel).Say(pb.EchoRequest(text=f"m{i}"),
                                                          metadata=md, timeout=20)
        assert reply.text == f"m{i}"


def test_a_taken_grpc_port_fails_with_address_in_use(two_proxies) -> None:
    port = fleet.status()["proxies"]["grpc"]["port"]
    code = ("import fleet\n"
            "try:\n"
            "    fleet.start(http_options={'port': 0}, grpc_options={'host': '127.0.0.1', "
            f"'port': {port}, 'num_proxies': 2}})\n"
            "except fleet.FleetError as exc:\n"
            "    print('refused:', exc)\n"
            "fleet.shutdown()\n")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "TMPDIR": tmp})
    assert f"refused: the gRPC proxy cannot listen on 127.0.0.1:{port}" in out.stdout, \
        out.stderr
    assert "Address already in use" in out.stdout

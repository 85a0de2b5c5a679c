"""Gone clients cost nothing: a call whose client leaves while it waits in a Router's
queue is dropped from the queue and never runs (HTTP disconnect, gRPC cancel, handle
cancel). Real processes and real clients; the one replica slot is held by a call the
test releases, so the other calls queue."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from helpers import wait_for
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc
from starlette.requests import Request

import fleet
from fleet import _api, _runtime

SERVICER_FN = "protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server"


@fleet.deployment(max_ongoing_requests=1000)
class Board:
    """Which calls of Single ran, and the gate its one call waits on: a deployment of
    its own, because Single's replica refuses other calls while one holds it."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.gate = asyncio.Event()

    async def hold(self, key: str) -> None:
        self.runs.append(key)
        await self.gate.wait()
        self.gate = asyncio.Event()

    async def release(self) -> None:
        self.gate.set()

    async def ran(self) -> list[str]:
        return self.runs


@fleet.deployment(max_ongoing_requests=1)
class Single:
    def __init__(self, board: Any) -> None:
        self.board = board

    async def hold(self, key: str) -> str:
        await self.board.hold.remote(key)
        return key

    async def __call__(self, request: Request) -> Any:
        return await self.hold(request.query_params["key"])

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.EchoReply(text=await self.hold(request.text))


@pytest.fixture(scope="module")
def setup() -> Iterator[dict[str, Any]]:
    fleet.shutdown()
    fleet.start(http_options={"port": 0},
                grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER_FN]})
    try:
        handle = fleet.run(Single.bind(Board.bind()), name="single", route_prefix="/single")
        st = fleet.status()
        yield {"handle": handle, "http": st["proxies"]["http"]["port"],
               "grpc": st["proxies"]["grpc"]["port"],
               "board": fleet.get_deployment_handle("Board", "single")}
    finally:
        fleet.shutdown()


def _ran(board: Any) -> list[str]:
    return list(board.ran.remote().result())


def _release(board: Any) -> None:
    board.release.remote().result()


def _proxy_count(name: str, code: Any) -> float:
    """Calls the proxies counted in the controller's store (fleet_http_requests_total or
    fleet_grpc_requests_total) whose status code passes code(); the proxies send their
    figures once a second."""
    inst = _api._instance
    assert isinstance(inst, _api.Instance) and inst.controller is not None
    return sum(v for (n, labels), v in list(inst.controller.metrics.counters.items())
               if n == name and code(dict(labels).get("status_code")))


def _next_run(board: Any, before: int) -> str:
    """The key of the call that took the slot after the first `before` runs."""
    return str(wait_for(lambda: (_ran(board)[before:] or [None])[0]))


def _http(port: int, key: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /single?key={key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_http_client_gone_while_queued_never_runs(setup):
    board, port = setup["board"], setup["http"]
    before = len(_ran(board))
    holder = _http(port, "http-holder")          # takes the proxy's one slot
    assert _next_run(board, before) == "http-holder"
    left = _proxy_count("fleet_http_requests_total", lambda code: code == "499")
    _http(port, "http-gone").close()             # queues in the proxy, then leaves
    # the proxy saw it leave (499) before the slot frees: on a slow machine it could
    # otherwise still be queued when the holder ends, and take the slot
    wait_for(lambda: _proxy_count("fleet_http_requests_total",
                                  lambda code: code == "499") > left,
             what="the proxy counting the gone HTTP call as 499")
    follower = _http(port, "http-after")         # queues behind it
    _release(board)
    assert holder.recv(4096).startswith(b"HTTP/1.1 200")
    holder.close()
    # FIFO: had the gone call stayed queued, it would take the slot first
    assert _next_run(board, before + 1) == "http-after"
    _release(board)
    assert follower.recv(4096).startswith(b"HTTP/1.1 200")
    follower.close()
    assert "http-gone" not in _ran(board)


def test_grpc_call_that_gives_up_while_queued_never_runs(setup):
    board = setup["board"]
    md = (("application", "single"),)
    before = len(_ran(board))
    with grpc.insecure_channel(f"127.0.0.1:{setup['grpc']}") as channel:
        stub = pb_grpc.EchoServiceStub(channel)
        holder = stub.Say.future(pb.EchoRequest(text="grpc-holder"), metadata=md)
        assert _next_run(board, before) == "grpc-holder"
        ended = _proxy_count("fleet_grpc_requests_total", lambda code: code != "OK")
        # the holder keeps the slot until released: the deadline passes while the call
        # waits in the proxy's queue, however slow the machine
        with pytest.raises(grpc.RpcError) as info:
            stub.Say(pb.EchoRequest(text="grpc-gone"), metadata=md, timeout=2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the proxy ended the call on its side too before the slot frees
        wait_for(lambda: _proxy_count("fleet_grpc_requests_total",
                                      lambda code: code != "OK") > ended,
                 what="the proxy ending the gRPC call whose deadline passed")
        follower = stub.Say.future(pb.EchoRequest(text="grpc-after"), metadata=md)
        _release(board)
        assert holder.result(timeout=10).text == "grpc-holder"
        assert _next_run(board, before + 1) == "grpc-after"
        _release(board)
        assert follower.result(timeout=10).text == "grpc-after"
    assert "grpc-gone" not in _ran(board)


def test_handle_call_cancelled_while_queued_never_runs(setup):
    handle, board = setup["handle"], setup["board"]
    proxy = board
    before = len(_ran(proxy))
    holder = handle.hold.remote("handle-holder")
    assert _next_run(proxy, before) == "handle-holder"
    router = _runtime.current().router("single", "Single")
    gone = handle.hold.remote("handle-gone")
    wait_for(lambda: len(router.queue) == 1)
    gone.cancel()
    wait_for(lambda: not router.queue)
    follower = handle.hold.remote("handle-after")
    wait_for(lambda: len(router.queue) == 1)
    _release(proxy)
    assert holder.result(timeout_s=10) == "handle-holder"
    assert _next_run(proxy, before + 1) == "handle-after"
    _release(proxy)
    assert follower.result(timeout_s=10) == "handle-after"
    assert "handle-gone" not in _ran(proxy)

"""gRPC limits and policies with a real grpcio client: ``grpc_options.request_timeout_s``
bounds the whole call, a replica that dies mid-call is UNAVAILABLE at once, traffic
splits and shadow copies apply to gRPC calls, and a driver deployment runs one replica."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc

import fleet
from fleet.drivers import gRPCIngress

SERVICER_FN = "protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server"
# request_timeout_s of the instance the timeout tests run on (the others run on one
# without it: a loaded machine can take longer than that on any call)
TIMEOUT_S = 3.0


@fleet.deployment(max_ongoing_requests=1)
class Held:
    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def stats(self) -> tuple[int, int]:
        return self.started, self.cancelled

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.started += 1
        if request.text:
            Path(request.text).write_text("started")
        try:
            await asyncio.sleep(request.sleep_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return pb.EchoReply(text="done")


@fleet.deployment
class Crash:
    def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        os._exit(1)                       # the process dies with the call in flight


@fleet.deployment
class Named:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.calls = 0

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls += 1
        if self.fail:
            raise RuntimeError("the shadow is broken")
        return pb.EchoReply(text=self.name, index=request.count)

    async def count(self) -> int:
        return self.calls

    async def Repeat(self, request: Any, context: Any) -> Any:  # noqa: N802
        for i in range(request.count):
            yield pb.EchoReply(text=self.name, index=i)
        await asyncio.sleep(request.sleep_s)


@fleet.deployment(is_driver_deployment=True, num_replicas=3)
class Driver(pb_grpc.EchoServiceServicer, gRPCIngress):
    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.EchoReply(text=f"driver {os.getpid()}")


class _Instances:
    """One instance at a time for the module: with request_timeout_s=TIMEOUT_S for the
    tests of that option, without it for the rest; started again only when a test needs
    the other kind."""

    def __init__(self) -> None:
        self.timed: bool | None = None
        self.channel: Any = None
        self.stub: Any = None

    def get(self, timed: bool) -> Any:
        if self.timed is timed:
            return self.stub
        self.close()
        grpc_options: dict[str, Any] = {"port": 0, "grpc_servicer_functions": [SERVICER_FN]}
        if timed:
            grpc_options["request_timeout_s"] = TIMEOUT_S
            apps = [(Held.bind(), "held", "/held"),
                    (Named.bind("primary"), "primary", "/primary")]
        else:
            apps = [(Crash.bind(), "crash", "/crash"),
                    (Named.bind("primary"), "primary", "/primary"),
                    (Named.bind("other"), "other", None),
                    (Named.bind("copy", fail=True), "copy", None),
                    (Driver.bind(), "driver", "/driver")]
        fleet.start(http_options={"port": 0}, grpc_options=grpc_options)
        with ThreadPoolExecutor(len(apps)) as pool:   # deploy side by side: faster
            for done in [pool.submit(fleet.run, app, name=name, route_prefix=prefix)
                         for app, name, prefix in apps]:
                done.result()
        port = fleet.status()["proxies"]["grpc"]["port"]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.EchoServiceStub(self.channel)
        self.timed = timed
        return self.stub

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel = self.stub = self.timed = None
        fleet.shutdown()


@pytest.fixture(scope="module")
def instances() -> Iterator[_Instances]:
    fleet.shutdown()
    held = _Instances()
    try:
        yield held
    finally:
        held.close()


@pytest.fixture
def timed_stub(instances: _Instances) -> Any:
    """A stub for an instance whose gRPC proxy has request_timeout_s=TIMEOUT_S."""
    return instances.get(True)


@pytest.fixture
def stub(instances: _Instances) -> Any:
    """A stub for an instance with no request_timeout_s."""
    return instances.get(False)


def _md(app: str) -> tuple[tuple[str, str], ...]:
    return (("application", app),)


def _wait_for(pred: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _held_stats() -> tuple[int, int]:
    # through a handle: no request_timeout_s of the proxy bounds it (it needs Held's only
    # slot: ask while nothing holds it)
    started, cancelled = fleet.get_deployment_handle("Held", "held").stats.remote().result(
        timeout_s=30)
    return int(started), int(cancelled)


def test_request_timeout_s_bounds_the_whole_call_and_cancels_the_replica_call(timed_stub,
                                                                            tmp_path):
    stub = timed_stub
    started, cancelled = _held_stats()
    marker = tmp_path / "holder"
    begun = time.monotonic()
    # no client deadline: only request_timeout_s ends these
    holder = stub.Say.future(pb.EchoRequest(text=str(marker), sleep_s=30),
                             metadata=_md("held"))
    _wait_for(marker.exists, "the first call to hold Held's one slot")
    # This one waits in the queue until the holder is cut off, then needs 0.9 of
    # request_timeout_s more: within request_timeout_s only if the wait in the queue did
    # not count. (The holder's time at the proxy before this one arrives, the machine's
    # speed, must stay under that 0.9: hence a TIMEOUT_S of seconds.)
    queued = stub.Say.future(pb.EchoRequest(sleep_s=0.9 * TIMEOUT_S), metadata=_md("held"))
    for call in (holder, queued):
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"request_timeout_s={TIMEOUT_S}" in err.value.details()
    # cut off by request_timeout_s, long before the holder's 30 s of sleep
    assert time.monotonic() - begun < 25

    def all_cancelled() -> bool:
        # the holder ran and was cancelled; the queued call may have been cancelled
        # before its coroutine took a step (then it counts in neither)
        now_started, now_cancelled = _held_stats()
        return now_started - started == now_cancelled - cancelled >= 1

    _wait_for(all_cancelled, "the replica's calls to be cancelled")


def test_request_timeout_s_bounds_streams_too(timed_stub):
    stub = timed_stub
    replies = stub.Repeat(pb.EchoRequest(count=2), metadata=_md("primary"), timeout=10)
    assert [r.index for r in replies] == [0, 1]
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for r in stub.Repeat(pb.EchoRequest(count=2, sleep_s=30), metadata=_md("primary"),
                             timeout=10):
            got.append(r.index)
    assert got == [0, 1]                         # the replies sent before the cut-off
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the proxy's cut-off, not the client's deadline
    assert f"request_timeout_s={TIMEOUT_S}" in err.value.details()


def test_replica_dying_mid_call_is_unavailable_at_once_naming_the_deployment(stub):
    # the client's deadline bounds the wait: a death not noticed is DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:
        stub.Say(pb.EchoRequest(text="x"), metadata=_md("crash"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "the replica serving the request died"


def test_traffic_split_applies_to_grpc_calls(stub):
    fleet.set_traffic("/primary", {"other": 1})
    try:
        got = {stub.Say(pb.EchoRequest(), metadata=_md("primary"), timeout=10).text
               for _ in range(5)}
        assert got == {"other"}
    finally:
        fleet.set_traffic("/primary", None)
    assert stub.Say(pb.EchoRequest(), metadata=_md("primary"), timeout=10).text == "primary"


def test_shadow_copies_of_grpc_calls_whose_failures_never_reach_the_client(stub):
    copies = fleet.get_app_handle("copy")
    before = copies.count.remote().result()
    fleet.shadow_traffic("/primary", "copy", 1.0)
    try:
        for i in range(10):
            reply = stub.Say(pb.EchoRequest(count=i), metadata=_md("primary"), timeout=10)
            assert (reply.text, reply.index) == ("primary", i)
        _wait_for(lambda: copies.count.remote().result() == before + 10,
                  "a shadow copy of each call")
    finally:
        fleet.shadow_traffic("/primary", "copy", 0)


def test_rolling_update_under_grpc_load_fails_no_call(stub):
    fleet.run(Named.options(num_replicas=2).bind("v1"), name="roll", route_prefix="/roll")
    stop = threading.Event()
    results: list[str] = []
    errors: list[str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(stub.Say(pb.EchoRequest(), metadata=_md("roll"),
                                        timeout=10).text)
            except grpc.RpcError as exc:
                errors.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(results) > 20, "calls before the update")
        fleet.run(Named.options(num_replicas=2).bind("v2"), name="roll", route_prefix="/roll")
        mark = len(results)
        _wait_for(lambda: len(results) > mark + 20, "calls after the update")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        fleet.delete("roll")
    assert errors == []
    assert "v1" in results and results[-1] == "v2"


def test_driver_deployment_runs_one_replica_whatever_num_replicas(stub):
    deployment = fleet.status()["applications"]["driver"]["deployments"]["Driver"]
    assert len(deployment["replicas"]) == 1
    assert stub.Say(pb.EchoRequest(), metadata=_md("driver"),
                    timeout=10).text.startswith("driver ")

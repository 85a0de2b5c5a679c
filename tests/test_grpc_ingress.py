"""Bring-your-own gRPC schemas (gRPCIngress and grpc_servicer_functions), with a real
grpcio client against real replicas: all four RPC kinds, the servicer context, errors,
deadlines, cancellation, health and reflection."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc

import fleet
from fleet.drivers import gRPCIngress

SERVICER_FN = "protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server"


@fleet.deployment(is_driver_deployment=True)
class Echo(pb_grpc.EchoServiceServicer, gRPCIngress):
    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        md = dict(context.invocation_metadata())
        if request.text == "boom":
            raise ValueError("no boom allowed")
        if request.text == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "go away")
        if request.text == "code":
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("nothing here")
            context.set_trailing_metadata([("x-why", "missing")])
            return pb.EchoReply()
        if request.text == "stats":
            return pb.EchoReply(text=f"{self.started} {self.cancelled}")
        if request.text == "context":
            await context.send_initial_metadata([("x-first", "early")])
            return pb.EchoReply(text=f"{context.time_remaining():.3f}")
        if request.sleep_s:
            self.started += 1
            try:
                await asyncio.sleep(request.sleep_s)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        context.set_trailing_metadata([("x-trailer", "t1")])
        return pb.EchoReply(text=md.get("x-greeting", "") + request.text, index=request.count)

    def Repeat(self, request: Any, context: Any) -> Any:  # noqa: N802 - a sync generator
        for i in range(request.count):
            yield pb.EchoReply(text=request.text, index=i)

    async def Join(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        texts = [r.text async for r in request_iterator]
        return pb.EchoReply(text="+".join(texts), index=len(texts))

    async def Chat(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        async for r in request_iterator:
            yield pb.EchoReply(text=r.text.upper(), index=r.count)


@fleet.deployment(num_replicas=2, max_ongoing_requests=1, max_queued_requests=1)
class Plain:
    """The modern way: a plain deployment whose methods are named after the RPCs."""

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        if request.sleep_s:
            await asyncio.sleep(request.sleep_s)
        return pb.EchoReply(text=f"plain {os.getpid()}", index=request.count)

    async def Repeat(self, request: Any, context: Any) -> None:  # noqa: N802
        for i in range(request.count):           # grpc.aio style: write, return None
            await context.write(pb.EchoReply(text=request.text, index=i))

    def Join(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802 - sync
        texts = [r.text for r in request_iterator]      # a plain iterator, in a thread
        return pb.EchoReply(text="-".join(texts), index=len(texts))


@fleet.deployment(max_ongoing_requests=10, autoscaling_config={
    "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
    "upscale_delay_s": 0, "look_back_period_s": 1})
class Scaled:
    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        await asyncio.sleep(request.sleep_s)
        return pb.EchoReply(text="scaled")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    fleet.shutdown()
    fleet.start(http_options={"port": 0},
                grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER_FN]})
    try:
        fleet.run(Echo.bind(), name="echo", route_prefix="/echo")
        fleet.run(Plain.bind(), name="plain", route_prefix="/plain")
        fleet.run(Scaled.bind(), name="scaled", route_prefix="/scaled")
        yield fleet.status()["proxies"]["grpc"]["port"]
    finally:
        fleet.shutdown()


ECHO = (("application", "echo"),)
PLAIN = (("application", "plain"),)


@pytest.fixture
def stub(port: int) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.EchoServiceStub(channel)


def test_unary_with_metadata_and_trailing_metadata(stub: Any) -> None:
    reply, call = stub.Say.with_call(pb.EchoRequest(text="hi", count=3), timeout=10,
                                     metadata=ECHO + (("x-greeting", "hello "),))
    assert (reply.text, reply.index) == ("hello hi", 3)
    assert ("x-trailer", "t1") in tuple(call.trailing_metadata())


def test_unary_stream_from_a_sync_generator(stub: Any) -> None:
    replies = list(stub.Repeat(pb.EchoRequest(text="r", count=4), metadata=ECHO, timeout=10))
    assert [(r.text, r.index) for r in replies] == [("r", i) for i in range(4)]


def test_unary_stream_written_with_context_write(stub: Any) -> None:
    replies = list(stub.Repeat(pb.EchoRequest(text="w", count=3), metadata=PLAIN, timeout=10))
    assert [(r.text, r.index) for r in replies] == [("w", 0), ("w", 1), ("w", 2)]


def test_stream_unary(stub: Any) -> None:
    requests = iter([pb.EchoRequest(text=t) for t in "abc"])
    reply = stub.Join(requests, metadata=ECHO, timeout=10)
    assert (reply.text, reply.index) == ("a+b+c", 3)


def test_stream_stream_replies_before_the_client_finishes(port: int) -> None:
    async def chat() -> list[str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.EchoServiceStub(channel).Chat(metadata=ECHO, timeout=10)
            got = []
            for word in ("one", "two", "three"):
                await call.write(pb.EchoRequest(text=word))
                got.append((await call.read()).text)     # answered while the stream is open
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            return got
    assert asyncio.run(chat()) == ["ONE", "TWO", "THREE"]


def test_initial_metadata_and_time_remaining(stub: Any) -> None:
    reply, call = stub.Say.with_call(pb.EchoRequest(text="context"), metadata=ECHO,
                                     timeout=10)
    assert ("x-first", "early") in tuple(call.initial_metadata())
    # the client's 10 s deadline, as the server saw it (grpc's own rounding adds a little)
    assert 5 < float(reply.text) < 11


def test_stream_unary_into_a_sync_method(stub: Any) -> None:
    reply = stub.Join(iter([pb.EchoRequest(text=t) for t in "xyz"]), metadata=PLAIN,
                      timeout=10)
    assert (reply.text, reply.index) == ("x-y-z", 3)


def test_set_code_details_and_abort_reach_the_client(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Say(pb.EchoRequest(text="code"), metadata=ECHO, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "nothing here"
    assert ("x-why", "missing") in tuple(err.value.trailing_metadata())
    with pytest.raises(grpc.RpcError) as err:
        stub.Say(pb.EchoRequest(text="abort"), metadata=ECHO, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "go away"


def test_user_exception_is_internal_with_a_request_id_not_its_message(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Say(pb.EchoRequest(text="boom"), metadata=ECHO, timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    ids = [v for k, v in err.value.trailing_metadata() if k == "x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 32


def test_unknown_application_and_method(port: int, stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Say(pb.EchoRequest(text="x"), metadata=(("application", "nope"),), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in err.value.details()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        missing = channel.unary_unary("/fleettest.EchoService/Missing")
        with pytest.raises(grpc.RpcError) as err:
            missing(b"", metadata=ECHO, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_bytes_that_do_not_parse_are_invalid_argument_and_serving_goes_on(port: int,
                                                                          stub: Any) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        raw = channel.unary_unary("/fleettest.EchoService/Say")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff", metadata=ECHO, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Say(pb.EchoRequest(text="still"), metadata=ECHO, timeout=10).text == "still"


def _stats(stub: Any) -> tuple[int, int]:
    started, cancelled = stub.Say(pb.EchoRequest(text="stats"), metadata=ECHO,
                                  timeout=10).text.split()
    return int(started), int(cancelled)


def _wait_for(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_deadline_is_honoured_and_the_replica_call_cancelled(stub: Any) -> None:
    started, cancelled = _stats(stub)
    # a deadline the call reaches the replica well within, however loaded the machine:
    # one that passed before the replica started it would leave nothing to cancel there
    future = stub.Say.future(pb.EchoRequest(text="slow", sleep_s=30), metadata=ECHO,
                             timeout=5)
    _wait_for(lambda: _stats(stub)[0] == started + 1)
    assert future.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_for(lambda: _stats(stub)[1] == cancelled + 1)


def test_client_cancel_cancels_the_replica_call(stub: Any) -> None:
    started, cancelled = _stats(stub)
    future = stub.Say.future(pb.EchoRequest(text="slow", sleep_s=30), metadata=ECHO,
                             timeout=30)
    _wait_for(lambda: _stats(stub)[0] == started + 1)
    assert future.cancel()
    _wait_for(lambda: _stats(stub)[1] == cancelled + 1)


def test_modern_way_plain_deployment_with_servicer_functions_and_num_replicas(
        stub: Any) -> None:
    pids = set()
    for i in range(40):
        reply = stub.Say(pb.EchoRequest(text="x", count=i), metadata=PLAIN, timeout=10)
        assert reply.index == i and reply.text.startswith("plain ")
        pids.add(reply.text)
        if len(pids) == 2:
            break
    assert len(pids) == 2, "num_replicas=2 spreads gRPC calls over both replicas"


def test_full_queue_is_resource_exhausted(stub: Any) -> None:
    # Plain: 2 replicas x max_ongoing_requests=1, max_queued_requests=1.
    def hold() -> Any:
        return stub.Say.future(pb.EchoRequest(text="s", sleep_s=30), metadata=PLAIN,
                               timeout=60)
    slow = [hold() for _ in range(3)]
    refused = None
    try:
        # the slow calls hold both replicas and the one queue place until cancelled: a
        # call made once they are all in is refused. One made before the third is in
        # takes the queue place itself (it then waits, and times out) and the third is
        # refused instead: that one goes again, until all three are in
        deadline = time.monotonic() + 60
        while refused is None:
            assert time.monotonic() < deadline, "no call was refused for a full queue"
            slow = [hold() if f.done() else f for f in slow]
            try:
                stub.Say(pb.EchoRequest(text="x"), metadata=PLAIN, timeout=2)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    refused = exc
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.details() == "the deployment's queue is full; retry later"
    finally:
        for f in slow:
            f.cancel()          # cancels the replicas' calls too


def test_health_service_reports_serving(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_server_reflection_lists_and_describes_services(port: int) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"fleettest.EchoService", "fleet.serve.PredictAPIsService",
                "grpc.health.v1.Health"} <= services
        service = DescriptorPool(db).FindServiceByName("fleettest.EchoService")
        assert {m.name for m in service.methods} == {"Say", "Repeat", "Join", "Chat"}


def test_autoscaling_acts_on_grpc_traffic(stub: Any) -> None:
    md = (("application", "scaled"),)
    # the calls last until cancelled below: the load holds however long the autoscaler
    # takes to see it on a loaded machine
    calls = [stub.Say.future(pb.EchoRequest(sleep_s=60), metadata=md, timeout=90)
             for _ in range(4)]

    def replicas() -> int:
        return int(fleet.status()["applications"]["scaled"]["deployments"]["Scaled"]
                   ["target_replicas"])
    _wait_for(lambda: replicas() == 2, 30)
    for call in calls:
        call.cancel()

"""What the seed's gRPC page promises, with real grpcio clients: clients generated from
Ray Serve's ``serve.proto`` (package ``ray.serve``) and from fleet's both work, health
and reflection name both services, the generated servicer base's UNIMPLEMENTED (and any
code a method sets before raising) reaches the client, a driver's ``port`` is served
and released, the bring-your-own example runs, and the defaults (port 9000, a
gRPCIngress class starting the proxy by itself) hold."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc

import fleet
from fleet.deployment_graph import InputNode
from fleet.drivers import DefaultgRPCDriver, gRPCIngress
from fleet.generated import ray_serve_pb2, serve_pb2, serve_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOS = os.path.join(ROOT, "fleet", "protos")


@fleet.deployment
class Echo:
    def join(self, inputs: dict[str, bytes]) -> bytes:
        return b",".join(k.encode() + b"=" + v for k, v in sorted(inputs.items()))


@fleet.deployment(is_driver_deployment=True)
class CodeSetter(pb_grpc.EchoServiceServicer, gRPCIngress):
    """Sets a status and raises, as grpcio servicers may; Repeat streams then does so."""

    async def Say(self, request, context):  # noqa: N802
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details(f"no item {request.text!r}")
        raise KeyError(request.text)

    async def Repeat(self, request, context):  # noqa: N802
        yield pb.EchoReply(text=request.text, index=0)
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        raise RuntimeError("the details come from the exception")


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: the sockets stay bound until all are chosen, so the
    kernel cannot hand the same port out twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def grpc_port() -> Iterator[int]:
    fleet.shutdown()
    fleet.start(http_options={"port": 0}, grpc_options={"port": 0})
    try:
        yield fleet.status()["proxies"]["grpc"]["port"]
    finally:
        fleet.shutdown()


@pytest.fixture(scope="module")
def echo_app(grpc_port: int) -> str:
    fleet.run(DefaultgRPCDriver.bind(Echo.bind().join.bind(InputNode())), name="echo",
              route_prefix="/echo")
    return "echo"


def _generate(proto: str, out: Any) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={PROTOS}",
                    f"--python_out={out}", f"--grpc_python_out={out}",
                    os.path.join(PROTOS, proto)], check=True)


def test_clients_generated_from_rays_and_fleets_proto_both_work(grpc_port: int, echo_app: str,
                                                                tmp_path: Any) -> None:
    _generate("ray_serve.proto", tmp_path)
    _generate("serve.proto", tmp_path)
    client = textwrap.dedent(f"""
        import grpc, ray_serve_pb2, ray_serve_pb2_grpc, serve_pb2, serve_pb2_grpc
        with grpc.insecure_channel("127.0.0.1:{grpc_port}") as ch:
            for pb2, pb2_grpc in ((ray_serve_pb2, ray_serve_pb2_grpc),
                                  (serve_pb2, serve_pb2_grpc)):
                stub = pb2_grpc.PredictAPIsServiceStub(ch)
                r = stub.Predict(pb2.PredictRequest(input={{"a": b"1", "b": b"2"}}),
                                 metadata=(("application", "{echo_app}"),), timeout=10)
                print(pb2.DESCRIPTOR.package, r.prediction.decode())
    """)
    out = subprocess.run([sys.executable, "-c", client], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ray.serve a=1,b=2", "fleet.serve a=1,b=2"]


def test_rays_method_name_is_the_one_rays_clients_call(grpc_port: int, echo_app: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        raw = ch.unary_unary("/ray.serve.PredictAPIsService/Predict",
                             request_serializer=ray_serve_pb2.PredictRequest.SerializeToString,
                             response_deserializer=ray_serve_pb2.PredictResponse.FromString)
        reply = raw(ray_serve_pb2.PredictRequest(input={"x": b"y"}), timeout=10)
    assert reply.prediction == b"x=y"


def test_health_and_reflection_name_both_predict_services(grpc_port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "fleet.serve.PredictAPIsService", "ray.serve.PredictAPIsService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"fleet.serve.PredictAPIsService", "ray.serve.PredictAPIsService"} <= services


def test_unimplemented_rpc_of_the_servicer_base_is_unimplemented(grpc_port: int) -> None:
    from examples.grpc_test_service import my_deployment
    from examples.protos import test_service_pb2, test_service_pb2_grpc
    fleet.run(my_deployment, name="test_service", route_prefix="/test_service")
    md = (("application", "test_service"),)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = test_service_pb2_grpc.TestServiceStub(ch)
        assert stub.Ping(test_service_pb2.PingRequest(), metadata=md, timeout=10) \
            == test_service_pb2.PingReply()
        with pytest.raises(grpc.RpcError) as err:
            stub.PingTimeout(test_service_pb2.PingTimeoutRequest(), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert err.value.details() == "Method not implemented!"
        # the replica goes on serving
        assert stub.Ping(test_service_pb2.PingRequest(), metadata=md, timeout=10) \
            == test_service_pb2.PingReply()


def test_code_and_details_set_before_raising_reach_the_client(grpc_port: int) -> None:
    fleet.run(CodeSetter.bind(), name="codes", route_prefix="/codes")
    md = (("application", "codes"),)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = pb_grpc.EchoServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Say(pb.EchoRequest(text="pear"), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no item 'pear'"
        stream = stub.Repeat(pb.EchoRequest(text="a"), metadata=md, timeout=10)
        assert next(stream).text == "a"
        with pytest.raises(grpc.RpcError) as err:
            next(stream)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # the code it chose reaches the client; the exception's text does not
        assert "the details come from the exception" not in (err.value.details() or "")


def _predict(port: int, app: str | None = None, timeout: float = 10) -> bytes:
    md = (("application", app),) if app else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = serve_pb2_grpc.PredictAPIsServiceStub(ch)
        return bytes(stub.Predict(serve_pb2.PredictRequest(input={"k": b"v"}), metadata=md,
                                  timeout=timeout).prediction)


@fleet.deployment
class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def name_of(self, inputs: dict[str, bytes]) -> bytes:
        return self.name.encode()


def test_driver_port_is_served_beside_the_proxys_and_released(grpc_port: int) -> None:
    first, second = _free_ports(2)
    try:
        _serve_two_drivers(first, second, grpc_port)
    finally:            # a failure here must not leave two gRPC apps for the next test
        for app in ("first", "second"):
            fleet.delete(app)


def _serve_two_drivers(first: int, second: int, grpc_port: int) -> None:
    fleet.run(DefaultgRPCDriver.bind(Named.bind("first").name_of.bind(InputNode()), port=first),
              name="first", route_prefix="/first")
    fleet.run(DefaultgRPCDriver.bind(Named.bind("second").name_of.bind(InputNode()), port=second),
              name="second", route_prefix="/second")
    assert {first, second} <= set(fleet.status()["proxies"]["grpc"]["ports"])
    # Without metadata, a call on a driver's port goes to that driver's application...
    assert _predict(first) == b"first"
    assert _predict(second) == b"second"
    # ... and the metadata still picks any application, on any port.
    assert _predict(first, app="second") == b"second"
    assert _predict(grpc_port, app="first") == b"first"
    fleet.delete("first")
    deadline = time.monotonic() + 10       # the proxy reports the port closed
    while first in fleet.status()["proxies"]["grpc"]["ports"]:
        assert time.monotonic() < deadline, "the port stayed open"
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as err:
        _predict(first, timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _predict(second) == b"second"


def test_driver_port_taken_by_another_process_fails_run_with_the_reason(grpc_port: int,
                                                                        echo_app: str
                                                                        ) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(fleet.FleetError, match=f"cannot listen on 127.0.0.1:{port}"):
            node = Named.bind("x").name_of.bind(InputNode())
            fleet.run(DefaultgRPCDriver.bind(node, port=port), name="taken",
                      route_prefix="/taken")
    fleet.delete("taken")
    assert _predict(grpc_port, app=echo_app) == b"k=v"    # the proxy serves on


def test_bring_your_own_example_and_its_client_run(grpc_port: int) -> None:
    from examples import grpc_test_service, grpc_test_service_client
    fleet.run(grpc_test_service.my_deployment, name="test_service",
              route_prefix="/test_service")
    # one gRPC application: the client sends no metadata
    for other in set(fleet.status()["applications"]) - {"test_service"}:
        fleet.delete(other)
    grpc_test_service_client.ADDRESS = f"127.0.0.1:{grpc_port}"
    results = asyncio.run(grpc_test_service_client.main())
    assert results == [("Ping", "PingReply"),
                       ("PingTimeout", "UNIMPLEMENTED", "Method not implemented!"),
                       ("Streaming", [0, 1, 2])]


def _port_9000_free() -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 9000))
        except OSError:
            return False
    return True


def test_seed_defaults_grpc_ingress_starts_the_proxy_on_9000() -> None:
    fleet.shutdown()
    if not _port_9000_free():
        pytest.skip("port 9000 is in use on this machine; the default cannot be checked")
    from examples.grpc_test_service import my_deployment
    from examples.protos import test_service_pb2, test_service_pb2_grpc
    try:
        fleet.start(http_options={"port": 0})       # no grpc_options: no gRPC proxy
        assert "grpc" not in fleet.status()["proxies"]
        fleet.run(my_deployment, name="ping", route_prefix="/ping")
        assert fleet.status()["proxies"]["grpc"]["port"] == 9000
        with grpc.insecure_channel("localhost:9000") as ch:
            reply = test_service_pb2_grpc.TestServiceStub(ch).Ping(
                test_service_pb2.PingRequest(), timeout=10)
        assert reply == test_service_pb2.PingReply()
    finally:
        fleet.shutdown()


def test_seed_defaults_grpc_options_default_port_is_9000() -> None:
    assert fleet.GRPCOptions().port == 9000
    fleet.shutdown()
    if not _port_9000_free():
        pytest.skip("port 9000 is in use on this machine; the default cannot be checked")
    try:
        fleet.start(http_options={"port": 0}, grpc_options={})
        assert fleet.status()["proxies"]["grpc"]["port"] == 9000
    finally:
        fleet.shutdown()


def test_grpc_guide_gRPCIngress_snippet_imports_and_defines_the_driver() -> None:
    import re
    with open(os.path.join(ROOT, "docs", "grpc.md")) as f:
        text = f.read()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S)
                   if "class MyDriver" in b)
    code = "\n".join(ln for ln in snippet.splitlines() if not ln.startswith("fleet.run("))
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/grpc.md", "exec"), namespace)
    assert isinstance(namespace["MyDriver"], fleet.Deployment)
    assert namespace["MyDriver"].config.is_driver_deployment

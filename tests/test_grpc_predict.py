"""The built-in Predict schema, InputNode graphs and the drivers, with real grpcio clients."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc

import fleet
from fleet.dag import InputNode
from fleet.drivers import DAGDriver, DefaultgRPCDriver, gRPCIngress
from fleet.generated import serve_pb2, serve_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@fleet.deployment
class Doubler:
    def __call__(self, x: int) -> int:
        return 2 * x


@fleet.deployment
class Summer:
    def __init__(self, doubler: Any) -> None:
        self.doubler = doubler

    async def total(self, inputs: dict[str, Any]) -> Any:
        total = 0
        for value in inputs.values():
            ref = await self.doubler.remote(int(value))   # graph handles: ref, then value
            total += await ref
        return total

    async def as_bytes(self, inputs: dict[str, bytes]) -> bytes:
        return str(await self.total(inputs)).encode()


@fleet.deployment
class Combine:
    def both(self, a: int, b: int) -> dict[str, int]:
        return {"a": a, "b": b}


@fleet.deployment
class Tally:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        return x

    def count(self) -> int:
        return self.calls


def query_value(request: Any) -> int:
    """An http_adapter: the input is the ``value`` query parameter."""
    return int(request.query_params["value"])


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, int]]:
    fleet.shutdown()
    fleet.start(http_options={"port": 0}, grpc_options={"port": 0})
    proxies = fleet.status()["proxies"]
    try:
        yield {"http": proxies["http"]["port"], "grpc": proxies["grpc"]["port"]}
    finally:
        fleet.shutdown()


def _predict(port: int, inputs: dict[str, bytes], app: str | None = None) -> Any:
    md = (("application", app),) if app else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = serve_pb2_grpc.PredictAPIsServiceStub(channel)
        return stub.Predict(serve_pb2.PredictRequest(input=inputs), metadata=md, timeout=10)


def test_seed_fruit_market_example_answers_29_over_grpc(ports: dict[str, int]) -> None:
    sys.path.insert(0, ROOT)
    from examples import grpc_fruit_market, grpc_fruit_market_client

    fleet.run(grpc_fruit_market.my_deployment, name="fruit", route_prefix="/fruit")
    grpc_fruit_market_client.ADDRESS = f"localhost:{ports['grpc']}"
    response = asyncio.run(grpc_fruit_market_client.send_request())
    assert struct.unpack("f", response.prediction) == (29.0,)
    # the driver deployment runs exactly one replica
    deps = fleet.status()["applications"]["fruit"]["deployments"]
    assert len(deps["DefaultgRPCDriver"]["replicas"]) == 1


def test_client_stubs_generated_from_the_installed_proto_work(ports: dict[str, int],
                                                              tmp_path: Any) -> None:
    import fleet as pkg
    proto_dir = os.path.join(os.path.dirname(pkg.__file__), "protos")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={proto_dir}",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    os.path.join(proto_dir, "serve.proto")], check=True)
    assert (tmp_path / "serve_pb2.py").exists() and (tmp_path / "serve_pb2_grpc.py").exists()
    fleet.run(DefaultgRPCDriver.bind(Summer.bind(Doubler.bind()).as_bytes.bind(InputNode())),
              name="gen", route_prefix="/gen")
    client = textwrap.dedent(f"""
        import grpc, serve_pb2, serve_pb2_grpc
        with grpc.insecure_channel("127.0.0.1:{ports['grpc']}") as ch:
            stub = serve_pb2_grpc.PredictAPIsServiceStub(ch)
            r = stub.Predict(serve_pb2.PredictRequest(input={{"a": b"4", "b": b"1"}}),
                             metadata=(("application", "gen"),), timeout=10)
            print(r.prediction.decode())
    """)
    out = subprocess.run([sys.executable, "-c", client], cwd=tmp_path, check=True,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "10"


def test_graph_node_returning_non_bytes_gives_internal_with_reason(ports: dict[str, int]
                                                                   ) -> None:
    with InputNode() as inp:
        node = Summer.bind(Doubler.bind()).total.bind(inp)
    fleet.run(DefaultgRPCDriver.bind(node), name="notbytes", route_prefix="/notbytes")
    with pytest.raises(grpc.RpcError) as err:
        _predict(ports["grpc"], {"x": b"1"}, app="notbytes")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "not bytes" in err.value.details() and "int" in err.value.details()


def test_dag_driver_serves_a_graph_over_http_json(ports: dict[str, int]) -> None:
    with InputNode() as inp:
        doubled = Doubler.bind()
        node = Combine.bind().both.bind(doubled.__call__.bind(inp[0]), inp[1])
    handle = fleet.run(DAGDriver.bind(node), name="dag", route_prefix="/dag")
    r = httpx.post(f"http://127.0.0.1:{ports['http']}/dag", json=[5, 7], timeout=10)
    assert r.status_code == 200 and r.json() == {"a": 10, "b": 7}
    assert handle.predict.remote([1, 2]).result(timeout_s=10) == {"a": 2, "b": 2}


def test_dag_driver_http_adapter_and_a_node_used_twice_runs_once(ports: dict[str, int]
                                                                 ) -> None:
    with InputNode() as inp:
        once = Tally.bind().__call__.bind(inp)
        node = Combine.bind().both.bind(once, once)
    fleet.run(DAGDriver.bind(node, http_adapter=query_value), name="twice",
              route_prefix="/twice")
    r = httpx.get(f"http://127.0.0.1:{ports['http']}/twice", params={"value": 4}, timeout=10)
    assert r.status_code == 200 and r.json() == {"a": 4, "b": 4}
    assert fleet.get_deployment_handle("Tally", "twice").count.remote().result() == 1


@fleet.deployment(is_driver_deployment=True)
class Shout(pb_grpc.EchoServiceServicer, gRPCIngress):
    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.EchoReply(text=request.text.upper())

    async def Chat(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        async for r in request_iterator:
            yield pb.EchoReply(text=r.text.upper())


def _shout(port: int) -> tuple[str, list[str]]:
    md = (("application", "shout"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EchoServiceStub(channel)
        one = stub.Say(pb.EchoRequest(text="a"), metadata=md, timeout=10).text
        many = [r.text for r in stub.Chat(iter([pb.EchoRequest(text=t) for t in "bc"]),
                                          metadata=md, timeout=10)]
    return one, many


def test_grpc_ingress_schema_learned_from_the_replica_without_servicer_functions(
        ports: dict[str, int]) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    fleet.run(Shout.bind(), name="shout", route_prefix="/shout")
    # served at once (as streams both ways until the proxy learns the kinds) ...
    assert _shout(ports["grpc"]) == ("A", ["B", "C"])
    # ... and the proxy learns the service from the replica, for reflection too
    deadline = time.monotonic() + 10
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        while "fleettest.EchoService" not in ProtoReflectionDescriptorDatabase(
                channel).get_services():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert _shout(ports["grpc"]) == ("A", ["B", "C"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_default_grpc_driver_port_argument_starts_the_proxy_there() -> None:
    fleet.shutdown()
    fleet.start(http_options={"port": 0})          # no gRPC proxy yet
    try:
        port = _free_port()
        node = Summer.bind(Doubler.bind()).as_bytes.bind(InputNode())
        fleet.run(DefaultgRPCDriver.bind(node, port=port), name="ported",
                  route_prefix="/ported")
        assert fleet.status()["proxies"]["grpc"]["port"] == port
        assert _predict(port, {"a": b"3"}).prediction == b"6"
        # A second driver's port is served too (tests/test_grpc_seed.py has the rest).
        other = _free_port()
        fleet.run(DefaultgRPCDriver.bind(node, port=other), name="other",
                  route_prefix="/other")
        assert _predict(other, {"a": b"4"}).prediction == b"8"
    finally:
        fleet.shutdown()

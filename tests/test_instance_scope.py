"""What an instance owns dies with it: a second instance started in the same process
after the first shut down sees nothing of the first (real processes: the gRPC proxy's
reflection lives in its process)."""

from __future__ import annotations

import re
from typing import Any

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from helpers import wait_for
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc
from protos import fleet_greet_pb2 as greet_pb
from protos import fleet_greet_pb2_grpc as greet_grpc

import fleet
from fleet.drivers import gRPCIngress

ECHO_FN = "protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server"
SERVICE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@fleet.deployment
class Plain:
    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.EchoReply(text=request.text)


@fleet.deployment(is_driver_deployment=True)
class Greeter(greet_grpc.GreetServiceServicer, gRPCIngress):
    async def Greet(self, request: Any, context: Any) -> Any:  # noqa: N802
        return greet_pb.GreetReply(text=f"hello {request.name}")


def _grpc_port() -> int:
    return int(fleet.status()["proxies"]["grpc"]["port"])


def _reflected(port: int) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_a_second_instance_reflects_its_own_grpc_services_only() -> None:
    fleet.shutdown()
    try:
        # the first instance serves EchoService through grpc_servicer_functions
        fleet.start(http_options={"port": 0},
                    grpc_options={"port": 0, "grpc_servicer_functions": [ECHO_FN]})
        fleet.run(Plain.bind(), name="first", route_prefix="/first")
        with grpc.insecure_channel(f"127.0.0.1:{_grpc_port()}") as channel:
            reply = pb_grpc.EchoServiceStub(channel).Say(
                pb.EchoRequest(text="one"), metadata=(("application", "first"),), timeout=30)
        assert reply.text == "one"
        first = _reflected(_grpc_port())
        assert "fleettest.EchoService" in first
        assert "fleettest2.GreetService" not in first
        fleet.shutdown()

        # the next one, in the same process, a bring-your-own servicer learned from its
        # replica: reflection lists it, and nothing of the first instance
        fleet.start(http_options={"port": 0}, grpc_options={"port": 0})
        fleet.run(Greeter.bind(), name="greet", route_prefix="/greet")
        with grpc.insecure_channel(f"127.0.0.1:{_grpc_port()}") as channel:
            greeted = greet_grpc.GreetServiceStub(channel).Greet(
                greet_pb.GreetRequest(name="two"), metadata=(("application", "greet"),),
                timeout=30)
        assert greeted.text == "hello two"
        # the proxy learns the service from the replica, on its own schedule
        second = wait_for(lambda: (got := _reflected(_grpc_port()))
                          and "fleettest2.GreetService" in got and got,
                          what="reflection listing the replica's GreetService")
        assert "fleettest.EchoService" not in second
        assert [s for s in second if not SERVICE_NAME.match(s)] == []
        assert list(fleet.status()["applications"]) == ["greet"]
    finally:
        fleet.shutdown()


def test_every_reflected_service_name_is_well_formed() -> None:
    """Generated code registers each service twice (a generic handler keyed by full
    method names, and registered handlers); each service is one name."""
    from fleet._grpc_schema import load_servicer_function, servicer_handlers
    methods = servicer_handlers(load_servicer_function(ECHO_FN))
    assert sorted(methods) == ["/fleettest.EchoService/Chat", "/fleettest.EchoService/Join",
                               "/fleettest.EchoService/Repeat", "/fleettest.EchoService/Say"]

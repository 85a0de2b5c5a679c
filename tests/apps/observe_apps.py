"""Deployments of tests/test_observe.py: request ids across a handle call, log lines,
failures on demand."""

from __future__ import annotations

import logging

import fleet

log = logging.getLogger("observe_app")


@fleet.deployment
class Inner:
    def __call__(self, text: str) -> dict[str, str]:
        # a sync method: runs in the thread pool, in a copy of the call's context
        log.info("inner sees %s", text)
        return {"inner_id": fleet.get_request_id()}


@fleet.deployment
class Front:
    def __init__(self, inner: fleet.DeploymentHandle) -> None:
        self.inner = inner

    async def __call__(self, request):
        if request.query_params.get("fail"):
            raise ValueError("asked to fail")
        log.info("front serving %s", request.url.path)
        print("front printed a line")
        inner = await self.inner.remote(request.url.path)
        return {"front_id": fleet.get_request_id(), **inner}


@fleet.deployment
class Broken:
    def __init__(self, fail: bool) -> None:
        if fail:
            raise RuntimeError("this constructor was told to fail")

    def __call__(self, request) -> str:
        return "fixed"


front = Front.bind(Inner.bind())


@fleet.deployment
class Batched:
    @fleet.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def __call__(self, items: list[int]) -> list[int]:
        return [i * 2 for i in items]


@fleet.deployment
class GrpcEcho:
    """gRPC Say: answers with the call's request id and trace id."""

    async def Say(self, request, context):  # noqa: N802 - the RPC's name
        from protos import fleet_echo_pb2 as pb

        from fleet import _context
        if request.text == "boom":
            raise ValueError("asked to fail")
        return pb.EchoReply(text=f"{fleet.get_request_id()} {_context.trace_id()}")

"""Deployments for ``python -m bench.reliability`` (module level: replicas import them)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
from fastapi import FastAPI, WebSocket
from starlette.requests import Request
from starlette.responses import StreamingResponse

import fleet
from bench.predict_pb import PredictRequest, PredictResponse

SERVICE = "fleetbench.Reliability"
CHUNK = b"x" * 65536


def add_ReliabilityServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """A unary RPC that parses its request (for the fuzzer) and a request stream."""
    server.add_registered_method_handlers(SERVICE, {
        "Predict": grpc.unary_unary_rpc_method_handler(
            servicer.Predict, request_deserializer=PredictRequest.FromString,
            response_serializer=PredictResponse.SerializeToString),
        "Join": grpc.stream_unary_rpc_method_handler(servicer.Join),
    })


@fleet.deployment
class Sleepy:
    """Sleeps ms milliseconds per request and answers its process id."""

    def __init__(self, ms: float) -> None:
        self.seconds = ms / 1000

    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(self.seconds)
        return str(os.getpid())


@fleet.deployment(max_ongoing_requests=1000)
class Hostile:
    """What hostile clients are pointed at: an echo of the body's size, an endless
    stream that never awaits, a gRPC unary that parses, a gRPC request stream whose
    handler reads one message."""

    async def __call__(self, request: Request) -> Any:
        if request.url.path.endswith("/endless"):
            async def endless() -> Any:
                while True:
                    yield CHUNK
            return StreamingResponse(endless())
        return {"bytes": len(await request.body())}

    async def numbers(self) -> Any:
        n = 0
        while True:         # never awaits
            n += 1
            yield n

    async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802
        return PredictResponse(prediction=b"ok")

    async def Join(self, requests: Any, context: Any) -> Any:  # noqa: N802
        async for _ in requests:
            await asyncio.sleep(3600)
        return b""


ws_api = FastAPI()


@fleet.deployment(graceful_shutdown_timeout_s=1)
@fleet.ingress(ws_api)
class WsSink:
    """Accepts a websocket, reads one message, then reads nothing."""

    @ws_api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_bytes()
        await asyncio.sleep(3600)

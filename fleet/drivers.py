"""Drivers: the ingress deployments of deployment graphs, and gRPC ingress classes.

- :class:`DefaultgRPCDriver` serves the built-in ``PredictAPIsService.Predict``
  (``fleet/protos/serve.proto``, and the same under Ray Serve's package name in
  ``fleet/protos/ray_serve.proto``) on the gRPC port: ``request.input`` (str -> bytes)
  goes to the bound graph node, whose bytes come back as ``prediction``.
- :class:`DAGDriver` does the same over HTTP: JSON body in, JSON out.
- :class:`gRPCIngress` marks a class that serves its own schema: subclass a generated
  ``XServicer`` and ``gRPCIngress``, decorate it ``@fleet.deployment(is_driver_deployment=
  True)``, and its methods answer that service's RPCs with grpcio's signatures.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, NamedTuple

import grpc

from fleet._deployment import Application, deployment
from fleet.dag import Graph, encode
from fleet.generated import ray_serve_pb2, ray_serve_pb2_grpc, serve_pb2, serve_pb2_grpc


class gRPCIngress:  # noqa: N801 - the name users of the seed API know
    """Base of classes serving a user gRPC schema on fleet's gRPC port.

    Example::

        @fleet.deployment(is_driver_deployment=True)
        class MyDriver(test_service_pb2_grpc.TestServiceServicer, gRPCIngress):
            async def Ping(self, request, context):
                return test_service_pb2.PingReply()

    Methods take ``(self, request, context)``; streaming requests arrive as an
    iterator (async for ``async def`` methods), streaming replies are yielded.
    ``context`` supports ``invocation_metadata``, ``set_code``, ``set_details``,
    ``abort``, ``set_trailing_metadata``, ``send_initial_metadata`` and
    ``time_remaining``.
    """


# Predict's request type -> its reply type: fleet's schema, and Ray Serve's (package
# ray.serve), whose clients call /ray.serve.PredictAPIsService/Predict.
_REPLIES: dict[type, Any] = {
    serve_pb2.PredictRequest: serve_pb2.PredictResponse,  # type: ignore[attr-defined]
    ray_serve_pb2.PredictRequest: ray_serve_pb2.PredictResponse,  # type: ignore[attr-defined]
}


class _DefaultgRPCDriver(serve_pb2_grpc.PredictAPIsServiceServicer,
                         ray_serve_pb2_grpc.PredictAPIsServiceServicer, gRPCIngress):
    """Serves ``Predict`` of both schemas: the graph node gets ``dict(request.input)``
    and returns bytes."""

    def __init__(self, graph: Any) -> None:
        self._graph = Graph(graph)

    async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC
        result = await self._graph.run(dict(request.input))
        if not isinstance(result, bytes | bytearray):
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"the graph returned {type(result).__name__}, not bytes: Predict's "
                "prediction is bytes, so serialize the result (struct.pack, json.dumps(...)"
                ".encode(), pickle) before returning it")
        return _REPLIES[type(request)](prediction=bytes(result))

    async def predict(self, value: Any) -> Any:
        """Run the graph on value (for handle calls)."""
        return await self._graph.run(value)


async def json_request(request: Any) -> Any:
    """DAGDriver's default HTTP adapter: the JSON body (None when empty)."""
    body = await request.body()
    return json.loads(body) if body else None


class _DAGDriver:
    """Serves a graph over HTTP: ``http_adapter(request)`` (JSON body by default) is the
    input, the graph's result is the response (JSON unless a str, bytes or Response)."""

    def __init__(self, graph: Any, http_adapter: Any = None) -> None:
        self._graph = Graph(graph)
        self._adapter = http_adapter or json_request

    async def __call__(self, request: Any) -> Any:
        value = self._adapter(request)
        if inspect.isawaitable(value):
            value = await value
        return await self._graph.run(value)

    async def predict(self, value: Any) -> Any:
        """Run the graph on value (for handle calls)."""
        return await self._graph.run(value)


_DRIVER_OPTIONS: dict[str, Any] = {"is_driver_deployment": True, "max_ongoing_requests": 1000}

DefaultgRPCDriver = deployment(_DefaultgRPCDriver, name="DefaultgRPCDriver", **_DRIVER_OPTIONS)
DefaultgRPCDriver.__doc__ = """The built-in gRPC driver: ``DefaultgRPCDriver.bind(node)`` serves
``PredictAPIsService.Predict`` with the graph node; ``bind(node, port=9100)`` picks the
gRPC port (default: the instance's, 9000 unless set)."""

DAGDriver = deployment(_DAGDriver, name="DAGDriver", **_DRIVER_OPTIONS)
DAGDriver.__doc__ = """The HTTP graph driver: ``DAGDriver.bind(node)``; the JSON body is the
input and the node's result the JSON response. ``bind(node, http_adapter=fn)`` parses
requests with ``fn(request)`` instead."""


def driver_protocol(target: Any) -> str | None:
    """"grpc" or "http" for a graph driver class, "grpc-ingress" for a gRPCIngress one."""
    if not isinstance(target, type):
        return None
    if issubclass(target, _DefaultgRPCDriver):
        return "grpc"
    if issubclass(target, _DAGDriver):
        return "http"
    if issubclass(target, gRPCIngress):
        return "grpc-ingress"
    return None


class Prepared(NamedTuple):
    """An application as fleet.run deploys it (see :func:`prepare_app`)."""

    app: Application
    protocol: str            # "http", "grpc" (a graph driver) or "grpc-ingress"
    grpc_port: int | None    # the port a gRPC driver asked for
    needs_grpc: bool         # the instance must run its gRPC proxy


def prepare_app(app: Application) -> Prepared:
    """Turn a graph driver into a plain application.

    A driver's bound node becomes its constructor's argument (Applications in it become
    handles). Whether the instance must run the gRPC proxy (for a gRPC driver, an
    ingress or an OIP model) is returned; the caller makes sure it does.
    """
    protocol = driver_protocol(app.deployment.func_or_class)
    if protocol is None:
        # an OIP model answers inference.GRPCInferenceService too
        oip = getattr(app.deployment.func_or_class, "_fleet_oip", None) is not None
        return Prepared(app, "http", None, oip)
    if protocol == "grpc-ingress":
        return Prepared(app, "grpc", None, True)
    args, kwargs = list(app.args), dict(app.kwargs)
    port = kwargs.pop("port", None) if protocol == "grpc" else None
    name = app.deployment.name
    if not args:
        raise TypeError(f"{name}.bind() needs the graph node to serve, as in "
                        f"{name}.bind(model.method.bind(inp))")
    plan = encode(args.pop(0))
    app = Application(app.deployment, (plan, *args), kwargs)
    return Prepared(app, protocol, port, protocol == "grpc")


__all__ = ["DAGDriver", "DefaultgRPCDriver", "gRPCIngress", "json_request"]

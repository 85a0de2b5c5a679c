"""Test an application in memory: no processes, no ports.

``with fleet.testing.TestClient(app) as client:`` runs the whole application in the
test's own process: the controller, every replica (as tasks on one event loop, through
the memory backend) and the HTTP proxy's own app. ``client`` is an ``httpx.Client``
speaking HTTP to that proxy, and ``client.get_handle()`` gives real handles. Arguments
and results are pickled on the way as they are between processes, so what passes here
passes for real::

    import fleet.testing

    def test_adds():
        with fleet.testing.TestClient(app) as client:
            assert client.get("/", params={"x": 1}).json() == {"x": 1, "total": 5}
            assert client.get_handle("Adder").remote(1).result() == 2

:class:`AsyncTestClient` is the same for async tests (an ``httpx.AsyncClient``).
Responses are read whole before they are returned, so an endless stream never ends;
websockets and gRPC are not served here (use a real instance for those). One client
runs at a time in a process, and not beside a real instance started in that process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from types import TracebackType
from typing import Any

import httpx

from fleet import _runtime
from fleet._api import Instance
from fleet._backends.memory import MemoryBackend
from fleet._config import GRPCOptions, HTTPOptions, coerce_options
from fleet._deployment import Application, build_plans
from fleet._handle import DeploymentHandle
from fleet._types import ASGIApp
from fleet.drivers import prepare_app

__all__ = ["AsyncTestClient", "TestClient"]

# A request answered later than this fails the test instead of hanging it.
REQUEST_DEADLINE_S = 300.0


class _Session:
    """One in-memory instance serving one application."""

    def __init__(self, app: Application, name: str, route_prefix: str | None,
                 http_options: Any) -> None:
        if not isinstance(app, Application):
            raise TypeError(f"TestClient expects an Application (Deployment.bind(...)), got "
                            f"{type(app).__name__}")
        self.app = app
        self.name = name
        self.route_prefix = route_prefix
        self.http_options: HTTPOptions = coerce_options(HTTPOptions, http_options,
                                                        "http_options")
        self.instance: Instance | None = None
        self.asgi: ASGIApp | None = None
        self.ingress = ""
        self.legacy_refs = False
        self._proxy: _runtime.Runtime | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self.instance is not None, "use the client in a `with` block"
        return self.instance.loop

    def start(self) -> None:
        # the client drives the HTTP proxy only: a driver's gRPC proxy is not started
        app, protocol, grpc_port, _ = prepare_app(self.app)
        plans = build_plans(app, self.name)
        self.ingress, self.legacy_refs = plans[0].name, plans[0].legacy_refs
        inst = Instance(HTTPOptions(enabled=False), GRPCOptions(enabled=False),
                        backend=MemoryBackend(), register=False)
        self.instance = inst
        try:
            inst.start()
            inst.call(self._deploy(plans, protocol, grpc_port))
        except BaseException:
            self.stop()
            raise

    async def _deploy(self, plans: list[Any], protocol: str, grpc_port: int | None) -> None:
        inst = self.instance
        assert inst is not None and inst.runtime is not None
        # The proxy's own runtime, as in a proxy process: its routers, its tables.
        proxy = _runtime.Runtime(inst.loop, inst.address, inst.secret)
        await proxy.connect_controller(subscribe=True)
        self._proxy = proxy
        from fleet._proxy.http import build_app
        self.asgi = build_app(proxy, self.http_options)
        await inst.runtime.call_controller("deploy", self.name, self.route_prefix, plans,
                                           protocol, grpc_port)
        await inst.runtime.call_controller("wait_ready", self.name)
        assert inst.runtime.tables is not None
        await proxy.wait_tables(inst.runtime.tables["version"])

    def stop(self) -> None:
        inst, self.instance = self.instance, None
        if inst is not None:
            if self._proxy is not None and self._proxy.controller is not None:
                inst.loop.call_soon_threadsafe(self._proxy.controller.close)
            inst.shutdown()

    async def send(self, request: httpx.Request, body: bytes) -> tuple[int, Any, bytes]:
        """Runs on the instance's loop: one request through the proxy's ASGI app."""
        assert self.asgi is not None, "use the client in a `with` block"
        transport = httpx.ASGITransport(app=self.asgi)
        inner = httpx.Request(request.method, request.url, headers=request.headers,
                              content=body)
        response = await transport.handle_async_request(inner)
        content = await response.aread()
        return response.status_code, response.headers.raw, content

    def handle(self, deployment: str | None) -> DeploymentHandle:
        if self.instance is None:
            raise RuntimeError("use the client in a `with` block before asking for handles")
        handle = DeploymentHandle(deployment or self.ingress, self.name)
        if deployment is None and self.legacy_refs:
            handle = handle._with_legacy_refs()
        return handle


class _Transport(httpx.BaseTransport):
    def __init__(self, session: _Session) -> None:
        self.session = session

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        fut = asyncio.run_coroutine_threadsafe(self.session.send(request, body),
                                               self.session.loop)
        try:
            status, headers, content = fut.result(REQUEST_DEADLINE_S)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise httpx.ReadTimeout(f"no response within {REQUEST_DEADLINE_S} s",
                                    request=request) from None
        return httpx.Response(status, headers=headers, content=content, request=request)


class _AsyncTransport(httpx.AsyncBaseTransport):
    def __init__(self, session: _Session) -> None:
        self.session = session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        fut = asyncio.run_coroutine_threadsafe(self.session.send(request, body),
                                               self.session.loop)
        try:
            status, headers, content = await asyncio.wait_for(asyncio.wrap_future(fut),
                                                              REQUEST_DEADLINE_S)
        except asyncio.TimeoutError:
            raise httpx.ReadTimeout(f"no response within {REQUEST_DEADLINE_S} s",
                                    request=request) from None
        return httpx.Response(status, headers=headers, content=content, request=request)


class TestClient(httpx.Client):
    """Run ``app`` in memory and speak HTTP to it: an ``httpx.Client``.

    ``name``, ``route_prefix`` and ``http_options`` (middlewares, request_timeout_s,
    max_body_bytes, ...) are those of :func:`fleet.run` and :func:`fleet.start`.
    """

    __test__ = False          # not a test class, whatever pytest guesses from the name

    def __init__(self, app: Application, *, name: str = "default",
                 route_prefix: str | None = "/", http_options: Any = None,
                 base_url: str = "http://testserver", **kwargs: Any) -> None:
        self._session = _Session(app, name, route_prefix, http_options)
        super().__init__(transport=_Transport(self._session), base_url=base_url, **kwargs)

    def __enter__(self) -> TestClient:
        self._session.start()
        super().__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None = None,
                 exc_value: BaseException | None = None,
                 traceback: TracebackType | None = None) -> None:
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            self._session.stop()

    def get_handle(self, deployment: str | None = None) -> DeploymentHandle:
        """A handle to the ingress deployment, or to the deployment of that name."""
        return self._session.handle(deployment)


class AsyncTestClient(httpx.AsyncClient):
    """:class:`TestClient` for async tests: an ``httpx.AsyncClient``."""

    __test__ = False

    def __init__(self, app: Application, *, name: str = "default",
                 route_prefix: str | None = "/", http_options: Any = None,
                 base_url: str = "http://testserver", **kwargs: Any) -> None:
        self._session = _Session(app, name, route_prefix, http_options)
        super().__init__(transport=_AsyncTransport(self._session), base_url=base_url,
                         **kwargs)

    async def __aenter__(self) -> AsyncTestClient:
        await asyncio.to_thread(self._session.start)
        await super().__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None = None,
                        exc_value: BaseException | None = None,
                        traceback: TracebackType | None = None) -> None:
        try:
            await super().__aexit__(exc_type, exc_value, traceback)
        finally:
            await asyncio.to_thread(self._session.stop)

    def get_handle(self, deployment: str | None = None) -> DeploymentHandle:
        """A handle to the ingress deployment, or to the deployment of that name."""
        return self._session.handle(deployment)

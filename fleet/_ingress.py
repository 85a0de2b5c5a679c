"""``@fleet.ingress(app)``: serve a FastAPI or Starlette app (any ASGI app) from a
deployment, with the replica's instance as ``self`` in the app's route functions."""

from __future__ import annotations

import copyreg
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.datastructures import State
from starlette.requests import HTTPConnection

T = TypeVar("T")

# The replica puts its instance in every request's scope under this key; route
# functions defined in the deployment class get it as ``self``.
INSTANCE_KEY = "fleet.instance"


def ingress(app: Any) -> Callable[[type[T]], type[T]]:
    """Mount an ASGI app in a deployment class: every HTTP request and websocket to the
    application's route prefix is served by ``app`` inside a replica.

    Route functions written in the class body take ``self`` like methods and see the
    replica's state; FastAPI features (path and query parameters, ``Depends``, request
    validation, ``response_model``, websockets, ``/docs`` and ``/openapi.json``) work
    as in a plain FastAPI app, under the route prefix. Put it below
    ``@fleet.deployment``::

        app = FastAPI()

        @fleet.deployment
        @fleet.ingress(app)
        class Counter:
            def __init__(self) -> None:
                self.count = 0

            @app.post("/incr/{by}")
            def incr(self, by: int) -> dict:
                self.count += by
                return {"count": self.count}

    Methods of the class remain callable from handles. Every HTTP request goes to the
    app, whose middleware, dependencies and validation always run: the
    ``X-SERVE-CALL-METHOD`` header is an ordinary header to it.
    """
    if not callable(app):
        raise TypeError(f"fleet.ingress expects an ASGI app (FastAPI, Starlette, ...), got "
                        f"{type(app).__name__}")

    def decorator(cls: type[T]) -> type[T]:
        if not inspect.isclass(cls):
            raise TypeError("@fleet.ingress(app) decorates a class; put it below "
                            "@fleet.deployment")
        _bind_routes(app, cls)
        cls._fleet_asgi_app = app  # type: ignore[attr-defined]
        return cls

    return decorator


def current_instance(conn: HTTPConnection) -> Any:
    """The replica's instance serving this request (the ``self`` of route functions)."""
    try:
        return conn.scope[INSTANCE_KEY]
    except KeyError:
        raise RuntimeError("this route function takes `self`: it runs only inside a fleet "
                           "replica of the deployment class it belongs to") from None


def _class_functions(cls: type) -> set[int]:
    found = set()
    for klass in cls.__mro__:
        for value in vars(klass).values():
            if inspect.isfunction(value):
                found.add(id(value))
    return found


def _bind_routes(app: Any, cls: type) -> None:
    router = getattr(app, "router", app)
    routes = getattr(router, "routes", None)
    if not isinstance(routes, list):
        return
    own = _class_functions(cls)
    for i, route in enumerate(routes):
        endpoint = getattr(route, "endpoint", None)
        if endpoint is None or id(endpoint) not in own:
            continue
        new = _rebuild(route, endpoint)
        if new is not None:
            routes[i] = new


def _rebuild(route: Any, endpoint: Any) -> Any:
    try:
        from fastapi.routing import APIRoute, APIWebSocketRoute
    except ImportError:  # pragma: no cover - FastAPI is optional
        APIRoute = APIWebSocketRoute = ()  # type: ignore[assignment,misc]
    from starlette.routing import Route, WebSocketRoute

    if isinstance(route, APIRoute | APIWebSocketRoute):
        return _same_route(route, _with_self_dependency(endpoint))
    if isinstance(route, Route):
        return Route(route.path, _self_first(endpoint), methods=route.methods,
                     name=route.name, include_in_schema=route.include_in_schema)
    if isinstance(route, WebSocketRoute):
        return WebSocketRoute(route.path, _self_first(endpoint), name=route.name)
    return None


def _same_route(route: Any, endpoint: Any) -> Any:
    """A route of the same class and options as route, calling endpoint instead.

    FastAPI works out parameters from the endpoint's signature when a route is made, so
    the route is made again rather than patched."""
    kwargs = {}
    for name, param in inspect.signature(type(route).__init__).parameters.items():
        if name in ("self", "path", "endpoint") or param.kind is param.VAR_KEYWORD:
            continue
        if hasattr(route, name):
            kwargs[name] = getattr(route, name)
    return type(route)(route.path, endpoint, **kwargs)


def _with_self_dependency(fn: Any) -> Any:
    """A copy of fn whose ``self`` FastAPI fills with the replica's instance."""
    from fastapi import Depends

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    first = params[0].replace(default=Depends(current_instance), annotation=inspect.Parameter.empty,
                              kind=inspect.Parameter.KEYWORD_ONLY)
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    functools.update_wrapper(copy, fn)
    del copy.__wrapped__  # type: ignore[attr-defined]  # FastAPI reads the new signature
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__signature__ = sig.replace(parameters=[first, *rest])  # type: ignore[attr-defined]
    return copy


def _self_first(fn: Any) -> Any:
    """A Starlette endpoint calling fn(instance, request_or_websocket)."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def endpoint(conn: Any) -> Any:
            return await fn(current_instance(conn), conn)
    else:
        @functools.wraps(fn)
        def endpoint(conn: Any) -> Any:
            return fn(current_instance(conn), conn)
    del endpoint.__wrapped__  # type: ignore[attr-defined]
    return endpoint


def _reduce_state(state: State) -> tuple[Any, ...]:
    return (State, (dict(state._state),))


# An app defined in a script travels to replicas by value; Starlette's State (app.state)
# cannot be unpickled as it is (its __getattr__ recurses before __dict__ is restored).
copyreg.pickle(State, _reduce_state)

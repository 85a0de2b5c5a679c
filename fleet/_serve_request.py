"""ServeRequest: what a Request-taking method receives when a Python handle calls it.

Over HTTP such a method gets a ``starlette.requests.Request``; through a handle it gets
a :class:`ServeRequest`, which reads the same way (headers, query params, ``body()``,
``json()``, ``form()``) and also carries any Python object unchanged in ``.data``.
It is deliberately not a Request subclass, so ``isinstance(request, Request)`` tells web
callers from Python ones.

This module also teaches pickle to carry a real Starlette Request (its scope and the
body already read), so a request handed on through a handle arrives as a Request.
"""

from __future__ import annotations

import copyreg
import json as _json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.datastructures import URL, FormData, Headers, QueryParams, State
from starlette.requests import Request, cookie_parser

_NO_BODY = b""

# The parts of an ASGI scope that describe the request (the rest is per-app state).
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
               "root_path", "query_string", "headers", "client", "server", "path_params")
BODY_KEY = "fleet.body"


class ServeRequest:
    """A handle call seen as a request.

    ``handle.options(http_headers={"k": "v"}).remote(...)`` fills ``headers``;
    keyword arguments fill ``query_params``; a dict is what ``await json()`` and
    ``await form()`` return; a str or bytes is ``await body()``; and whatever was passed
    first, of any type or size, is ``data``. Example::

        @fleet.deployment
        class Echo:
            async def __call__(self, request: Request):
                if isinstance(request, Request):        # came over HTTP
                    return await request.json()
                return request.data                     # came from a handle
    """

    def __init__(self, data: Any = None, *, headers: Mapping[str, str] | None = None,
                 query_params: Mapping[str, Any] | None = None) -> None:
        self.data = data
        raw = {k.lower(): str(v) for k, v in (headers or {}).items()}
        if "content-type" not in raw:
            kind = _content_type(data)
            if kind:
                raw["content-type"] = kind
        self.headers = Headers(raw)
        self.query_params = QueryParams(dict(query_params or {}))
        self.path_params: dict[str, Any] = {}
        self.client = None
        self.state = State()
        self._body: bytes | None = None
        self._cookies: dict[str, str] | None = None

    @property
    def method(self) -> str:
        """``POST`` when a value was passed, else ``GET`` (as an HTTP client would send)."""
        return "GET" if self.data is None else "POST"

    @property
    def url(self) -> URL:
        """``/`` with the query string of the keyword arguments."""
        query = str(self.query_params)
        return URL("/" + (f"?{query}" if query else ""))

    @property
    def cookies(self) -> dict[str, str]:
        """Cookies from a ``cookie`` entry in ``http_headers``."""
        if self._cookies is None:
            self._cookies = cookie_parser(self.headers.get("cookie", ""))
        return self._cookies

    @property
    def scope(self) -> dict[str, Any]:
        """An ASGI-like scope, for code that reads a few keys of it."""
        return {"type": "http", "method": self.method, "path": "/", "root_path": "",
                "query_string": str(self.query_params).encode(),
                "headers": self.headers.raw, "client": None, "fleet.handle": True}

    async def body(self) -> bytes:
        """The bytes an HTTP client would have sent: str as UTF-8, dicts and lists as JSON."""
        if self._body is None:
            self._body = _to_bytes(self.data)
        return self._body

    async def json(self) -> Any:
        """A passed dict or list as it is; otherwise the body parsed as JSON."""
        if isinstance(self.data, dict | list):
            return self.data
        return _json.loads(await self.body())

    async def form(self) -> FormData:
        """A passed dict as form fields (values keep their Python types)."""
        if isinstance(self.data, Mapping):
            return FormData(list(self.data.items()))
        return FormData()

    async def stream(self) -> AsyncIterator[bytes]:
        """The body in one chunk, then the empty chunk that ends a stream."""
        yield await self.body()
        yield b""

    async def is_disconnected(self) -> bool:
        """A handle caller is never seen as disconnected (a cancel arrives as CancelledError)."""
        return False

    def __repr__(self) -> str:
        return (f"ServeRequest(data={self.data!r}, headers={dict(self.headers)!r}, "
                f"query_params={dict(self.query_params)!r})")


def _content_type(data: Any) -> str:
    if isinstance(data, str):
        return "text/plain; charset=utf-8"
    if isinstance(data, bytes | bytearray | memoryview):
        return "application/octet-stream"
    if isinstance(data, dict | list):
        return "application/json"
    return ""


def _to_bytes(data: Any) -> bytes:
    if data is None:
        return _NO_BODY
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if isinstance(data, dict | list):
        try:
            return _json.dumps(data).encode()
        except (TypeError, ValueError):
            return _NO_BODY
    return _NO_BODY


# -- a real Request through a handle ---------------------------------------------------

def _rebuild_request(scope: dict[str, Any], body: bytes) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request(scope, receive)
    request._body = body  # read already: body(), json(), form() and stream() work at once
    return request


def _reduce_request(request: Request) -> tuple[Any, ...]:
    scope = request.scope
    body = getattr(request, "_body", None)
    if body is None:
        # fleet's replicas keep the proxied body in the scope, so a Request an app built
        # itself (FastAPI does) still travels with it.
        body = scope.get(BODY_KEY, b"")
    small = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
    small[BODY_KEY] = body
    return (_rebuild_request, (small, body))


copyreg.pickle(Request, _reduce_request)

"""The dashboard's routes: its page and assets, the sign-in page and the playground's
relay to the HTTP proxy.

The management server mounts :func:`routes`. The page itself is static (HTML, CSS and
JavaScript under ``static/``, no build step, nothing fetched from elsewhere) and reads
everything else from the REST API.

Access: ``GET /?token=T`` checks T against the instance's token, sets the ``fleet_token``
cookie and redirects to ``/``; ``GET /`` without a valid token or cookie serves only the
sign-in page. The server lets ``GET /`` and ``/static/...`` (:data:`PUBLIC_PREFIXES`:
assets that hold no data) through without a token and checks it for every other path,
``/api/playground`` included.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
COOKIE = "fleet_token"
# paths the management server serves without a token: the sign-in page is what `/`
# answers without one, and the assets under /static hold no data
PUBLIC_PREFIXES = ("/static/",)

# the playground relays one request at a time per click: bound what it holds and waits
PLAYGROUND_TIMEOUT_S = 30.0
PLAYGROUND_MAX_BODY = 1 << 20          # bytes of the response the page is shown
PLAYGROUND_MAX_REQUEST = 2 << 20       # bytes of JSON describing the request to send
_HOP_BY_HOP = frozenset({"host", "content-length", "connection", "transfer-encoding",
                         "keep-alive", "upgrade", "te", "trailer", "proxy-connection"})


def request_id() -> str:
    """An id for a management API reply, shown in its error body."""
    return secrets.token_hex(8)


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    """The API's error body: what went wrong, where, and what to do."""
    return JSONResponse({"error": message, "request_id": request_id(), **extra},
                        status_code=status)


def presented_token(request: Request) -> str | None:
    """The token a request carries: ``Authorization: Bearer`` first, then the cookie."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.cookies.get(COOKIE)


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison, so the reply's timing tells nothing about the token."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class PlaygroundRequest(BaseModel):
    """``POST /api/playground``: one request to send through the HTTP proxy."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    # what a request line can carry: printable ASCII, no space (encode the rest: %20)
    path: str = Field(pattern=r"^/[\x21-\x7e]*$", max_length=8192,
                      description="path and query on the HTTP proxy, starting with /; "
                                  "printable ASCII, percent-encode the rest")
    headers: dict[str, str] = Field(default_factory=dict, max_length=100)
    body: str = Field(default="", max_length=PLAYGROUND_MAX_BODY)

    @field_validator("headers")
    @classmethod
    def _header_fields(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token (letters, "
                                 "digits and !#$%&'*+-.^_`|~)")
            if not _FIELD_VALUE.fullmatch(value):
                raise ValueError(f"header {name!r}: its value must be visible ASCII, "
                                 "spaces and tabs, without line breaks")
        return headers


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]{0,8192}")


def proxy_base(proxies: dict[str, dict[str, Any]]) -> str | None:
    """The HTTP proxy's base URL, reachable from this process, or None without one
    (proxies: the controller's, as in ``status()["proxies"]``)."""
    info = proxies.get("http")
    if not info or "port" not in info or info.get("error"):
        return None
    host = str(info.get("host") or "127.0.0.1")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if info.get("tls") or info.get("ssl") else "http"
    return f"{scheme}://{host}:{info['port']}"


def routes(token: str, proxy: Callable[[], str | None]) -> list[BaseRoute]:
    """The dashboard's routes for the management server of one instance: ``token`` is
    the instance's, ``proxy()`` the HTTP proxy's base URL now (None without one)."""

    async def index(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if not token_matches(given, token):
                return signin_page(status=401, message="That token is not this "
                                   "instance's: copy the address 'fleet start' or "
                                   "'fleet run' printed, or the token from it.")
            reply = RedirectResponse("/", status_code=303)
            reply.set_cookie(COOKIE, given, httponly=True, samesite="strict", path="/",
                             secure=request.url.scheme == "https")
            return reply
        if not token_matches(presented_token(request), token):
            return signin_page(status=401)      # a browser shows it; a script sees 401
        return FileResponse(STATIC_DIR / "index.html", headers=_NO_STORE)

    async def playground(request: Request) -> Response:
        where = "POST /api/playground"
        length = request.headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > PLAYGROUND_MAX_REQUEST):
            return error(413, f"{where}: the body may be at most {PLAYGROUND_MAX_REQUEST} "
                              "bytes of JSON")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > PLAYGROUND_MAX_REQUEST:
                return error(413, f"{where}: the body may be at most "
                                  f"{PLAYGROUND_MAX_REQUEST} bytes of JSON")
        try:
            data = json.loads(raw or b"{}")
        except ValueError as exc:
            return error(400, f"{where}: the body is not JSON ({exc}); send "
                              '{"method", "path", "headers", "body"}')
        try:
            spec = PlaygroundRequest.model_validate(data)
        except ValidationError as exc:
            return error(422, f"{where}: the body must be JSON "
                              '{"method", "path", "headers", "body"}; see detail',
                         detail=[{"loc": ["body", *err["loc"]], "msg": err["msg"]}
                                 for err in exc.errors()])
        base = proxy()
        if base is None:
            return error(503, "the playground sends requests through the HTTP proxy, and "
                              "this instance has none running; start one with an HTTP "
                              "port (fleet run/start --port)")
        return await relay(base, spec)

    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/api/playground", playground, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]


_NO_STORE = {"cache-control": "no-store"}


async def relay(base: str, spec: PlaygroundRequest) -> Response:
    """Send spec to the HTTP proxy at base; the reply as the page shows it."""
    # httpx (and with it its command line's click, rich and pygments: about 7 MiB) only
    # once the playground is used, not in every management server
    import httpx
    headers = {k: v for k, v in spec.headers.items() if k.lower() not in _HOP_BY_HOP}
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(base_url=base, timeout=PLAYGROUND_TIMEOUT_S,
                                     verify=False, follow_redirects=False) as client:
            async with client.stream(spec.method, spec.path, headers=headers,
                                     content=spec.body.encode() or None) as reply:
                body = bytearray()
                truncated = False
                async for chunk in reply.aiter_bytes():
                    body += chunk
                    if len(body) > PLAYGROUND_MAX_BODY:
                        del body[PLAYGROUND_MAX_BODY:]
                        truncated = True
                        break
    except httpx.TimeoutException:
        return error(504, f"{spec.method} {spec.path}: the HTTP proxy at {base} gave no "
                          f"complete reply within {PLAYGROUND_TIMEOUT_S:g} s")
    except httpx.HTTPError as exc:
        return error(502, f"{spec.method} {spec.path}: could not reach the HTTP proxy at "
                          f"{base}: {exc or type(exc).__name__}; check 'fleet status'")
    latency_ms = (time.perf_counter() - started) * 1000
    return JSONResponse({
        "status": reply.status_code,
        "headers": [[k, v] for k, v in reply.headers.multi_items()],
        "body": bytes(body).decode("utf-8", errors="replace"),
        "truncated": truncated,
        "latency_ms": round(latency_ms, 2),
        "request_id": reply.headers.get("x-request-id", ""),
    })


def signin_page(status: int = 401, message: str = "") -> Response:
    """The one page served without a token: asks for it once, then ``/?token=``."""
    text = (STATIC_DIR / "signin.html").read_text(encoding="utf-8")
    note = f'<p class="error" role="alert">{_escape(message)}</p>' if message else ""
    return Response(text.replace("<!--message-->", note), status_code=status,
                    media_type="text/html", headers=_NO_STORE)


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))

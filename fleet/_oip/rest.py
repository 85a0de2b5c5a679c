"""The Open Inference Protocol's REST routes, answered by the HTTP proxy at its root.

``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready`` and ``.../infer``, with JSON tensors and the binary tensor extension
(``Inference-Header-Content-Length``), and the repository extension
(``/v2/repository/index``, ``.../models/{name}/load`` and ``/unload``). Errors are
``{"error": "..."}`` with a 4xx (5xx when the model or fleet failed).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fleet._oip import core
from fleet._oip.codec import OIPError, from_json, from_raw, to_json, to_raw
from fleet._version import __version__

_JSON = [(b"content-type", b"application/json")]
_HEADER_LENGTH = b"inference-header-content-length"
# How long a repository load or unload may take when request_timeout_s is unset.
REPOSITORY_TIMEOUT_S = 300.0


def _reply(status: int, payload: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return status, _JSON, json.dumps(payload).encode()


def _route(path: str) -> tuple[str, str, str]:
    """(what, model, version) of a /v2 path; what is '' for an unknown route."""
    parts = path.rstrip("/").split("/")[2:]     # after '', 'v2'
    if not parts:
        return "server", "", ""
    if parts == ["health", "live"]:
        return "live", "", ""
    if parts == ["health", "ready"]:
        return "ready", "", ""
    if parts[0] == "repository":
        if parts[1:] == ["index"]:
            return "repo_index", "", ""
        if len(parts) == 4 and parts[1] == "models" and parts[3] in ("load", "unload"):
            return "repo_" + parts[3], parts[2], ""
        return "", "", ""
    if parts[0] != "models" or len(parts) < 2:
        return "", "", ""
    name, rest, version = parts[1], parts[2:], ""
    if rest[:1] == ["versions"]:
        if len(rest) < 2:
            return "", "", ""
        version, rest = rest[1], rest[2:]
    if not rest:
        return "model", name, version
    if rest == ["ready"]:
        return "model_ready", name, version
    if rest == ["infer"]:
        return "infer", name, version
    return "", "", ""


async def handle(proxy: Any, scope: dict[str, Any], receive: Any, send: Any,
                 path: str, rid: bytes) -> int:
    """Answer one /v2 request (its id in X-Request-ID); returns the status for the
    access log."""
    try:
        status, headers, body = await _answer(proxy, scope, receive, send, path, rid)
    except OIPError as exc:
        status, headers, body = _reply(exc.status, {"error": str(exc)})
    if status:
        await proxy._respond(send, status, headers, body, rid)
    return status


async def _answer(proxy: Any, scope: dict[str, Any], receive: Any, send: Any, path: str,
                  rid: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    runtime = proxy.runtime
    what, name, version = _route(path)
    method = scope["method"]
    if not what:
        raise OIPError(f"no Open Inference Protocol route {path!r}", 404, "NOT_FOUND")
    want = "POST" if what == "infer" or what.startswith("repo_") else "GET"
    if method != want:
        raise OIPError(f"{path} takes {want}, not {method}", 405, "UNIMPLEMENTED")
    if what == "live":
        return _reply(200, {"live": True})
    if what == "ready":
        ok = core.server_ready(runtime)
        return _reply(200 if ok else 400, {"ready": ok})
    if what == "server":
        return _reply(200, {"name": core.SERVER_NAME, "version": _version(),
                            "extensions": core.EXTENSIONS})
    if what.startswith("repo_"):
        return await _repository(proxy, what, name)
    entry = core.find(runtime, name, version)
    if what == "model":
        return _reply(200, core.metadata(entry))
    if what == "model_ready":
        ok = core.ready(runtime, entry)
        return _reply(200 if ok else 400, {"name": name, "ready": ok})
    held = [0]                           # bytes of the body the proxy counts as held
    try:
        body = await proxy._read_body(receive, send, rid, held)
        if isinstance(body, int):        # refused (answered) or the client left
            return 0, [], b""
        return await _infer(proxy, scope, entry, body)
    finally:
        proxy.buffered -= held[0]


async def _repository(proxy: Any, what: str, name: str
                      ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The repository extension: index, and load/unload as deploying and deleting."""
    runtime = proxy.runtime
    method = {"repo_index": "oip_index", "repo_load": "oip_load",
              "repo_unload": "oip_unload"}[what]
    args = () if what == "repo_index" else (name,)
    try:
        result = await asyncio.wait_for(runtime.call_controller(method, *args),
                                        proxy.timeout or REPOSITORY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise OIPError(f"{what[5:]} of model {name!r} did not finish in time", 504,
                       "DEADLINE_EXCEEDED") from None
    except KeyError as exc:
        raise OIPError(str(exc.args[0] if exc.args else exc), 404, "NOT_FOUND") from None
    except Exception as exc:
        raise OIPError(f"{what[5:]} of model {name!r} failed: {type(exc).__name__}: {exc}",
                       400) from None
    if what == "repo_index":
        return 200, _JSON, json.dumps(result).encode()
    return _reply(200, {})


def _version() -> str:
    return __version__


async def _infer(proxy: Any, scope: dict[str, Any], entry: dict[str, Any], body: bytes
                 ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    model = entry["name"]
    split = len(body)
    for key, value in scope["headers"]:
        if key == _HEADER_LENGTH:
            if not value.isdigit() or int(value) > len(body):
                raise OIPError(f"Inference-Header-Content-Length {value.decode('latin-1')!r} "
                               f"is not a length within the {len(body)}-byte body")
            split = int(value)
    try:
        request = json.loads(body[:split])
    except ValueError as exc:
        raise OIPError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise OIPError("the inference request must be a JSON object with an 'inputs' list")
    binary = memoryview(body)[split:]
    at = 0
    inputs = {}
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict):
            raise OIPError(f"each input must be an object, got {tensor!r}")
        spec = core.input_spec(entry, tensor.get("name"))
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(binary):
                raise OIPError(f"input {spec['name']!r}: binary_data_size {size!r} runs past "
                               f"the {len(binary)} bytes after the JSON header")
            inputs[spec["name"]] = from_raw(spec, tensor.get("datatype"), tensor.get("shape"),
                                            binary[at:at + size], "input", model)
            at += size
        else:
            inputs[spec["name"]] = from_json(spec, tensor, model)
    asked = request.get("outputs")
    if asked is not None and not isinstance(asked, list):
        raise OIPError("'outputs' must be a list of {'name': ...}")
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    as_binary: dict[str, bool] = {}
    for out in asked or []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise OIPError(f"each requested output must be {{'name': ...}}, got {out!r}")
        as_binary[out["name"]] = bool((out.get("parameters") or {}).get(
            "binary_data", binary_default))
    specs = core.wanted_outputs(entry, [o["name"] for o in asked or []])
    results = await core.infer(proxy.runtime, entry, inputs, specs, proxy.timeout)
    reply: dict[str, Any] = {"model_name": model, "model_version": entry["version"]}
    if "id" in request:
        reply["id"] = request["id"]
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for spec, arr in results:
        out_tensor: dict[str, Any] = {"name": spec["name"], "datatype": spec["datatype"],
                                      "shape": list(arr.shape)}
        if as_binary.get(spec["name"], binary_default):
            raw = to_raw(arr, spec["datatype"])
            out_tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out_tensor["data"] = to_json(arr, spec["datatype"])
        tensors.append(out_tensor)
    reply["outputs"] = tensors
    head = json.dumps(reply).encode()
    if not chunks:
        return 200, _JSON, head
    return 200, [(b"content-type", b"application/octet-stream"),
                 (b"inference-header-content-length", str(len(head)).encode())], \
        head + b"".join(chunks)

"""What the REST and gRPC front ends of the Open Inference Protocol share: finding a
model by name in the published tables, readiness, and one inference call."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from fleet._oip.codec import OIPError, output
from fleet._runtime import Runtime
from fleet.exceptions import BackPressureError, FleetError, ReplicaDiedError

SERVER_NAME = "fleet"
EXTENSIONS = ["binary_tensor_data"]


def models(runtime: Runtime) -> dict[str, dict[str, Any]]:
    """Every OIP model in the tables, by name."""
    tables = runtime.tables
    return tables.get("oip", {}) if tables is not None else {}  # type: ignore[return-value]


def find(runtime: Runtime, name: str, version: str = "") -> dict[str, Any]:
    """A model's entry (its spec plus app and deployment); 404 naming what exists."""
    entry = models(runtime).get(name)
    if entry is None and "*" in models(runtime) and name:
        # A multiplexed model server: the name is the model id its loader gets.
        entry = {**models(runtime)["*"], "name": name, "model_id": name}
    if entry is None:
        raise OIPError(f"unknown model {name!r}; served models: "
                       f"{sorted(models(runtime)) or 'none'}", 404, "NOT_FOUND")
    if version and version != entry["version"]:
        raise OIPError(f"model {name!r} has no version {version!r}; it serves version "
                       f"{entry['version']!r}", 404, "NOT_FOUND")
    return entry


def ready(runtime: Runtime, entry: dict[str, Any]) -> bool:
    tables = runtime.tables
    if tables is None:
        return False
    dep = tables["deployments"].get(f"{entry['app']}#{entry['deployment']}")
    return dep is not None and bool(dep["replicas"])


def server_ready(runtime: Runtime) -> bool:
    return all(ready(runtime, e) for e in models(runtime).values())


def metadata(entry: dict[str, Any]) -> dict[str, Any]:
    return {"name": entry["name"], "versions": [entry["version"]],
            "platform": entry["platform"], "inputs": entry["inputs"],
            "outputs": entry["outputs"]}


def wanted_outputs(entry: dict[str, Any], names: list[str] | None) -> list[dict[str, Any]]:
    """The output specs a request asks for (all when it names none)."""
    specs = {s["name"]: s for s in entry["outputs"]}
    if not names:
        return entry["outputs"]  # type: ignore[no-any-return]
    out = []
    for n in names:
        if n not in specs:
            raise OIPError(f"model {entry['name']!r} has no output {n!r}; its outputs: "
                           f"{sorted(specs)}")
        out.append(specs[n])
    return out


def input_spec(entry: dict[str, Any], name: Any) -> dict[str, Any]:
    for spec in entry["inputs"]:
        if spec["name"] == name:
            return spec  # type: ignore[no-any-return]
    raise OIPError(f"model {entry['name']!r} has no input {name!r}; its inputs: "
                   f"{[s['name'] for s in entry['inputs']]}")


def check_complete(entry: dict[str, Any], inputs: dict[str, np.ndarray]) -> None:
    missing = [s["name"] for s in entry["inputs"] if s["name"] not in inputs]
    if missing:
        raise OIPError(f"model {entry['name']!r} needs the inputs {missing} too")


async def infer(runtime: Runtime, entry: dict[str, Any], inputs: dict[str, np.ndarray],
                outputs: list[dict[str, Any]], timeout_s: float | None
                ) -> list[tuple[dict[str, Any], np.ndarray]]:
    """Call the model's ``__call__`` with the input arrays; its outputs, checked."""
    check_complete(entry, inputs)
    router = runtime.router(entry["app"], entry["deployment"])
    model_id = entry.get("model_id")
    call = runtime._call_once(router, "__call__", (inputs,), {},
                              {"model": model_id} if model_id else None)
    try:
        result = await (asyncio.wait_for(call, timeout_s) if timeout_s else call)
    except asyncio.TimeoutError:
        raise OIPError(f"model {entry['name']!r} took longer than request_timeout_s="
                       f"{timeout_s}; the call was cancelled", 504, "DEADLINE_EXCEEDED") from None
    except BackPressureError as exc:
        raise OIPError(str(exc), 503, "RESOURCE_EXHAUSTED") from None
    except (ReplicaDiedError, FleetError) as exc:
        raise OIPError(str(exc), 503, "UNAVAILABLE") from None
    except asyncio.CancelledError:
        raise
    except KeyError as exc:
        if model_id:            # the loader does not know this model
            raise OIPError(f"unknown model {entry['name']!r}: {exc}", 404,
                           "NOT_FOUND") from None
        raise OIPError(f"model {entry['name']!r} raised KeyError: {exc}", 500,
                       "INTERNAL") from None
    except Exception as exc:
        raise OIPError(f"model {entry['name']!r} raised {type(exc).__name__}: {exc}", 500,
                       "INTERNAL") from None
    if not isinstance(result, dict):
        raise OIPError(f"model {entry['name']!r} returned {type(result).__name__}; __call__ "
                       "must return {output name: array}", 500, "INTERNAL")
    out = []
    for spec in outputs:
        if spec["name"] not in result:
            raise OIPError(f"model {entry['name']!r} returned no output {spec['name']!r} "
                           f"(it returned {sorted(result)})", 500, "INTERNAL")
        out.append((spec, output(spec, result[spec["name"]], entry["name"])))
    return out

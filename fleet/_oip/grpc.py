"""``inference.GRPCInferenceService`` on fleet's gRPC proxy (fleet/protos/oip.proto).

Only the gRPC proxy process imports this module: the generated messages live in the
``inference`` protobuf package, which a client library in the same process may define
too.
"""

from __future__ import annotations

import importlib
from typing import Any

import grpc
import numpy as np

from fleet._oip import core
from fleet._oip.codec import OIPError, from_raw, to_raw
from fleet._runtime import Runtime
from fleet._version import __version__
from fleet.generated import oip_pb2_grpc as pb_grpc

pb: Any = importlib.import_module("fleet.generated.oip_pb2")    # generated, untyped

SERVICE = "inference.GRPCInferenceService"

# The typed `contents` field each datatype travels in (FP16 only raw).
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
             "BYTES": "bytes_contents"}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's six RPCs over the proxy's runtime and tables."""

    def __init__(self, runtime: Runtime, timeout_s: float | None) -> None:
        self.runtime = runtime
        self.timeout = timeout_s

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=core.server_ready(self.runtime))

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        entry = await self._find(context, request.name, request.version)
        return pb.ModelReadyResponse(ready=core.ready(self.runtime, entry))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name=core.SERVER_NAME, version=__version__,
                                         extensions=core.EXTENSIONS)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        entry = await self._find(context, request.name, request.version)
        meta = core.metadata(entry)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        entry = await self._find(context, request.model_name, request.model_version)
        try:
            inputs = _inputs(entry, request)
            specs = core.wanted_outputs(entry, [o.name for o in request.outputs])
            results = await core.infer(self.runtime, entry, inputs, specs, self.timeout)
        except OIPError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            raise AssertionError("unreachable") from None
        reply = pb.ModelInferResponse(model_name=entry["name"],
                                      model_version=entry["version"], id=request.id)
        for spec, arr in results:
            reply.outputs.add(name=spec["name"], datatype=spec["datatype"],
                              shape=list(arr.shape))
            reply.raw_output_contents.append(to_raw(arr, spec["datatype"]))
        return reply

    async def _find(self, context: Any, name: str, version: str) -> dict[str, Any]:
        try:
            return core.find(self.runtime, name, version)
        except OIPError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            raise AssertionError("unreachable") from None


def _inputs(entry: dict[str, Any], request: Any) -> dict[str, np.ndarray]:
    model = entry["name"]
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise OIPError(f"raw_input_contents has {len(raw)} entries for "
                       f"{len(request.inputs)} inputs; give one per input, in order")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        spec = core.input_spec(entry, tensor.name)
        shape = list(tensor.shape)
        if raw:
            inputs[spec["name"]] = from_raw(spec, tensor.datatype, shape, raw[i], "input",
                                            model)
            continue
        datatype = tensor.datatype
        if datatype == "FP16":
            raise OIPError(f"input {spec['name']!r} of model {model!r} is FP16, which "
                           "travels only in raw_input_contents")
        field = _CONTENTS.get(datatype)
        values = list(getattr(tensor.contents, field)) if field else []
        # check() (in from_raw) names a wrong datatype or shape; the values go raw
        try:
            arr = np.asarray(values, dtype=object if datatype == "BYTES" else
                             np.dtype(_numpy_name(spec["datatype"])))
        except (OverflowError, ValueError, TypeError) as exc:
            raise OIPError(f"input {spec['name']!r} of model {model!r}: {exc}") from None
        inputs[spec["name"]] = from_raw(spec, datatype, shape, to_raw(arr, spec["datatype"])
                                        if datatype == spec["datatype"] else b"", "input",
                                        model)
    return inputs


def _numpy_name(datatype: str) -> str:
    from fleet.oip import DATATYPES
    return DATATYPES[datatype]


def add_service(server: Any, runtime: Runtime, timeout_s: float | None) -> None:
    """Serve ``inference.GRPCInferenceService`` on server (before the proxy's catch-all)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(runtime, timeout_s), server)

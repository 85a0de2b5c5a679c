"""Predict messages and service for the Ray Serve and baseline gRPC servers.

The schema matches the Predict API that fleet ships (``map<string, bytes> input = 2``
in, ``bytes prediction = 1`` out), so the same request bytes work against every
system.  It is built here from a descriptor instead of generated code so that the
benchmark needs no protoc step and never imports fleet from a Ray process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.internal import builder

PACKAGE = "fleetbench"
SERVICE_NAME = f"{PACKAGE}.PredictAPIsService"
PREDICT_METHOD = f"/{SERVICE_NAME}/Predict"

_F = descriptor_pb2.FieldDescriptorProto


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """Describe ``fleetbench/predict.proto``."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="fleetbench/predict.proto", package=PACKAGE, syntax="proto3"
    )
    req = fdp.message_type.add(name="PredictRequest")
    entry = req.nested_type.add(name="InputEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL, type=_F.TYPE_BYTES)
    req.field.add(
        name="input",
        number=2,
        label=_F.LABEL_REPEATED,
        type=_F.TYPE_MESSAGE,
        type_name=f".{PACKAGE}.PredictRequest.InputEntry",
    )
    resp = fdp.message_type.add(name="PredictResponse")
    resp.field.add(name="prediction", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_BYTES)
    svc = fdp.service.add(name="PredictAPIsService")
    svc.method.add(
        name="Predict",
        input_type=f".{PACKAGE}.PredictRequest",
        output_type=f".{PACKAGE}.PredictResponse",
    )
    return fdp


DESCRIPTOR = descriptor_pool.Default().AddSerializedFile(
    _file_descriptor().SerializeToString()
)
_globals: dict[str, Any] = {}
builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, _globals)
builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _globals)
PredictRequest: Any = _globals["PredictRequest"]
PredictResponse: Any = _globals["PredictResponse"]


def add_PredictAPIsServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """Register ``servicer.Predict`` on a gRPC server, as generated code would."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                servicer.Predict,
                request_deserializer=PredictRequest.FromString,
                response_serializer=PredictResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


def sample_request(order: dict[str, bytes]) -> bytes:
    """Serialized PredictRequest for ``order``."""
    return PredictRequest(input=order).SerializeToString()


def decode_prediction(raw: bytes) -> bytes:
    """The ``prediction`` field of a serialized PredictResponse."""
    return PredictResponse.FromString(raw).prediction


ServicerAdder = Callable[[Any, Any], None]

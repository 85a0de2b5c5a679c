"""Serve a deployment under the Open Inference Protocol (KServe v2).

Mark a deployment's class with :func:`model`; its ``async def __call__(self, inputs)``
takes ``{input name: numpy array}`` and returns ``{output name: numpy array}``. The HTTP
proxy then answers the protocol's REST routes at its root (``/v2/...``, whatever the
application's route prefix) and the gRPC proxy serves ``inference.GRPCInferenceService``
(start it with ``grpc_options``). Models are found by name across every application,
so several models, each its own application, sit behind one server.

Example::

    @fleet.deployment
    @fleet.oip.model(name="digits", version="1",
                     inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, 64]}],
                     outputs=[{"name": "digit", "datatype": "INT64", "shape": [-1]}])
    class Digits:
        async def __call__(self, inputs):
            return {"digit": self.model.predict(inputs["image"])}

Tensors are checked against the declared metadata before the replica sees them: the
datatype must match and every dimension must equal the declared one (``-1`` accepts
any size). Needs NumPy (``pip install 'fleet[examples]'``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DATATYPES", "model"]

T = TypeVar("T")

# The protocol's tensor datatypes and the NumPy dtype each travels as.
DATATYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _tensors(specs: Any, what: str, model_name: str) -> list[dict[str, Any]]:
    where = f"fleet.oip.model(name={model_name!r}) {what}"
    if not isinstance(specs, list | tuple) or not specs:
        raise ValueError(f"{where} must be a non-empty list of "
                         "{'name': ..., 'datatype': ..., 'shape': [...]}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or set(spec) - {"name", "datatype", "shape"}:
            raise ValueError(f"{where}[{i}] must be a dict with the keys name, datatype and "
                             f"shape, got {spec!r}")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not name or name in seen:
            raise ValueError(f"{where}[{i}]: name must be a unique non-empty string, "
                             f"got {name!r}")
        if datatype not in DATATYPES:
            raise ValueError(f"{where}[{i}] ({name!r}): datatype {datatype!r} is not one of "
                             f"{', '.join(DATATYPES)}")
        if not isinstance(shape, list | tuple) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
            raise ValueError(f"{where}[{i}] ({name!r}): shape must be a list of sizes "
                             f"(-1 for any size), got {shape!r}")
        seen.add(name)
        out.append({"name": name, "datatype": datatype, "shape": [int(d) for d in shape]})
    return out


class _Joiner:
    """How ``@fleet.batch`` on an OIP model's ``__call__`` makes one call of many: each
    input's arrays joined along the first dimension, each output split back by the rows
    each request sent (the first dimension of its first input)."""

    @staticmethod
    def join(items: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
        import numpy as np
        sizes = [len(next(iter(item.values()))) if item else 0 for item in items]
        joined: dict[str, Any] = {}
        for name in items[0]:
            try:
                joined[name] = np.concatenate([item[name] for item in items])
            except (ValueError, KeyError) as exc:
                raise ValueError(f"the batch's requests cannot be joined along the first "
                                 f"dimension of input {name!r}: {exc}") from None
        return joined, sizes

    @staticmethod
    def split(result: Any, sizes: list[int]) -> list[dict[str, Any]]:
        import numpy as np
        if not isinstance(result, dict):
            raise TypeError(f"a batched model's __call__ must return {{output name: array}}, "
                            f"got {type(result).__name__}")
        bounds = np.cumsum(sizes)[:-1]
        out: list[dict[str, Any]] = [{} for _ in sizes]
        for name, value in result.items():
            arr = np.asarray(value)
            if arr.ndim == 0 or len(arr) != sum(sizes):
                raise ValueError(f"output {name!r} of a batched model has "
                                 f"{len(arr) if arr.ndim else 0} rows for a batch of "
                                 f"{sum(sizes)} input rows; it must have one per input row")
            for i, part in enumerate(np.split(arr, bounds)):
                out[i][name] = part
        return out


def model(*, name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
          version: str = "1", platform: str = "fleet") -> Callable[[T], T]:
    """Declare a deployment class as an Open Inference Protocol model.

    ``name`` is the model's name in ``/v2/models/{name}``; ``inputs`` and ``outputs``
    list the tensors as ``{"name", "datatype", "shape"}`` (datatypes: BOOL, UINT8-64,
    INT8-64, FP16, FP32, FP64, BYTES; ``-1`` for a dimension of any size). Put it under
    ``@fleet.deployment``.

    With ``@fleet.batch`` on ``__call__``, concurrent requests are joined along the first
    dimension into one call (``__call__`` still takes and returns one dict) and each
    gets its own rows back.

    ``name="*"`` on a class with a ``@fleet.multiplexed`` loader serves every model name
    the loader accepts: the name in the path is the request's
    ``fleet.get_multiplexed_model_id()``, and a loader raising ``KeyError`` makes it 404.
    """
    if not isinstance(name, str) or not (name == "*" or _NAME.match(name)):
        raise ValueError(f"fleet.oip.model: name must be letters, digits, '_', '-' or '.', "
                         f"got {name!r}")
    if not isinstance(version, str) or not _NAME.match(version):
        raise ValueError(f"fleet.oip.model(name={name!r}): version must be a non-empty "
                         f"string like '1', got {version!r}")
    spec = {"name": name, "version": version, "platform": str(platform),
            "inputs": _tensors(inputs, "inputs", name),
            "outputs": _tensors(outputs, "outputs", name)}

    def mark(cls: T) -> T:
        if not isinstance(cls, type):
            raise TypeError(f"fleet.oip.model(name={name!r}) applies to a class with "
                            "`async def __call__(self, inputs)`, under @fleet.deployment")
        if not any("__call__" in vars(b) for b in cls.__mro__[:-1]):
            raise TypeError(f"fleet.oip.model(name={name!r}): class {cls.__name__} has no "
                            "__call__(self, inputs) method")
        cls._fleet_oip = spec  # type: ignore[attr-defined]
        cls._fleet_batch_joiner = _Joiner  # type: ignore[attr-defined]
        return cls

    return mark

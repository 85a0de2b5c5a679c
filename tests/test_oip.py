"""The Open Inference Protocol (KServe v2) against real proxies and replicas: the REST
routes with plain httpx and tritonclient.http (JSON and binary tensors), the gRPC
service with tritonclient.grpc (raw contents) and typed contents, every datatype,
shape and datatype checks, and the protocol's errors."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_pb_grpc
from tritonclient.utils import InferenceServerException

import fleet

TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
         "FP16", "FP32", "FP64", "BYTES"]


@fleet.deployment
@fleet.oip.model(name="digits", version="2",
                 inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, 64]}],
                 outputs=[{"name": "digit", "datatype": "INT64", "shape": [-1]},
                          {"name": "probability", "datatype": "FP32", "shape": [-1, 10]}])
class Digits:
    def __init__(self) -> None:
        images, labels = load_digits(return_X_y=True)
        self.model = LogisticRegression(max_iter=2000).fit(images[:1500], labels[:1500])

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image = inputs["image"]
        assert image.dtype == np.float32
        if image.shape[0] and image[0, 0] < 0:
            raise ValueError("negative pixels")
        probs = self.model.predict_proba(image)
        return {"digit": probs.argmax(axis=1), "probability": probs}


@fleet.deployment
@fleet.oip.model(name="types",
                 inputs=[{"name": t.lower(), "datatype": t, "shape": [-1]} for t in TYPES],
                 outputs=[{"name": f"out_{t.lower()}", "datatype": t, "shape": [-1]}
                          for t in TYPES])
class Types:
    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for t in TYPES:         # each arrives as the NumPy dtype of its datatype
            arr = inputs[t.lower()]
            assert arr.dtype == (object if t == "BYTES" else fleet.oip.DATATYPES[t]), t
        return {f"out_{k}": v for k, v in inputs.items()}


@fleet.deployment
class Plain:
    async def __call__(self, request: Any) -> str:
        return "plain"


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0},
                grpc_options={"port": 0})
    fleet.run(Digits.bind(), name="digits_app", route_prefix="/digits")
    fleet.run(Types.bind(), name="types_app", route_prefix=None)
    fleet.run(Plain.bind(), name="plain", route_prefix="/")    # /v2 still goes to OIP
    try:
        proxies = fleet.status()["proxies"]
        yield proxies["http"]["port"], proxies["grpc"]["port"]
    finally:
        fleet.shutdown()


@pytest.fixture
def http(ports: tuple[int, int]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", timeout=30) as client:
        yield client


def _values(t: str) -> np.ndarray:
    if t == "BYTES":
        return np.array([b"a", b"", "\u00e9t\u00e9".encode()], dtype=object)
    if t == "BOOL":
        return np.array([True, False, True])
    dtype = np.dtype(fleet.oip.DATATYPES[t])
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    return np.array([info.min, 0, info.max], dtype=dtype)


def test_rest_health_server_and_model_metadata(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    meta = http.get("/v2").json()
    assert meta["name"] == "fleet" and "binary_tensor_data" in meta["extensions"]
    for path in ("/v2/models/digits", "/v2/models/digits/versions/2"):
        got = http.get(path).json()
        assert got == {"name": "digits", "versions": ["2"], "platform": "fleet",
                       "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 64]}],
                       "outputs": [{"name": "digit", "datatype": "INT64", "shape": [-1]},
                                   {"name": "probability", "datatype": "FP32",
                                    "shape": [-1, 10]}]}
    assert http.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    assert http.get("/v2/models/digits/versions/2/ready").status_code == 200
    # the application at "/" still gets every other path
    assert http.get("/anything").text == "plain"


def test_rest_infer_with_json_tensors(http: httpx.Client) -> None:
    images, labels = load_digits(return_X_y=True)
    batch = images[1500:1700]
    r = http.post("/v2/models/digits/infer", json={
        "id": "req-1", "inputs": [{"name": "image", "datatype": "FP32",
                                   "shape": list(batch.shape), "data": batch.tolist()}],
        "outputs": [{"name": "digit"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("digits", "2", "req-1")
    [out] = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("digit", "INT64", [200])
    # the same model trained here gives the same answers
    local = LogisticRegression(max_iter=2000).fit(images[:1500], labels[:1500])
    assert out["data"] == local.predict(batch.astype(np.float32)).tolist()
    assert np.mean(np.asarray(out["data"]) == labels[1500:1700]) > 0.85


@pytest.mark.parametrize("path, payload, status, words", [
    ("/v2/models/nope/infer", {"inputs": []}, 404, ["unknown model 'nope'", "digits"]),
    ("/v2/models/digits/versions/9/infer", {"inputs": []}, 404, ["version '9'"]),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP64",
                                             "shape": [1, 64], "data": [0] * 64}]},
     400, ["datatype 'FP64'", "declares FP32"]),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP32",
                                             "shape": [1, 63], "data": [0] * 63}]},
     400, ["shape [1, 63]", "[-1, 64]"]),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP32",
                                             "shape": [2, 64], "data": [0] * 64}]},
     400, ["holds 64 values", "needs 128"]),
    ("/v2/models/digits/infer", {"inputs": [{"name": "pixels", "datatype": "FP32",
                                             "shape": [1, 64], "data": [0] * 64}]},
     400, ["no input 'pixels'", "image"]),
    ("/v2/models/digits/infer", {"inputs": []}, 400, ["needs the inputs ['image']"]),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP32",
                                             "shape": [1, 64], "data": ["x"] * 64}]},
     400, ["FP32 values must be numbers"]),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP32",
                                             "shape": [1, 64], "data": [0] * 64}],
                                 "outputs": [{"name": "nope"}]}, 400, ["no output 'nope'"]),
    ("/v2/models/digits/infer", {"inputs": [{"name": "image", "datatype": "FP32",
                                             "shape": [1, 64], "data": [-1] * 64}]},
     500, ["raised ValueError: negative pixels"]),
    ("/v2/models/digits/oops", {}, 404, ["no Open Inference Protocol route"]),
])
def test_rest_errors_name_what_was_expected(http: httpx.Client, path: str, payload: Any,
                                            status: int, words: list[str]) -> None:
    r = http.post(path, json=payload)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    for w in words:
        assert w in r.json()["error"]


def test_rest_refuses_bad_json_and_wrong_methods(http: httpx.Client) -> None:
    r = http.post("/v2/models/digits/infer", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert http.get("/v2/models/digits/infer").status_code == 405
    # the model that raised still serves
    r = http.post("/v2/models/digits/infer", json={"inputs": [
        {"name": "image", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]})
    assert r.status_code == 200


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_every_datatype(ports: tuple[int, int], binary: bool) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("types")
    inputs, outputs = [], []
    for t in TYPES:
        if t == "FP16" and not binary:
            continue
        values = _values(t)
        inp = triton_http.InferInput(t.lower(), list(values.shape), t)
        inp.set_data_from_numpy(values, binary_data=binary)
        inputs.append(inp)
        outputs.append(triton_http.InferRequestedOutput(f"out_{t.lower()}",
                                                        binary_data=binary))
    if not binary:      # FP16 still needs to be sent: binary, as JSON cannot carry it
        fp16 = triton_http.InferInput("fp16", [3], "FP16")
        fp16.set_data_from_numpy(_values("FP16"), binary_data=True)
        inputs.append(fp16)
    result = client.infer("types", inputs, outputs=outputs)
    for t in TYPES:
        if t == "FP16" and not binary:
            continue
        got = result.as_numpy(f"out_{t.lower()}")
        want = _values(t)
        if t == "BYTES" and not binary:    # JSON carries BYTES as text
            got = np.array([v.encode() if isinstance(v, str) else v for v in got],
                           dtype=object)
        assert got.tolist() == want.tolist(), t
    client.close()


def test_tritonclient_grpc_metadata_and_every_datatype(ports: tuple[int, int]) -> None:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{ports[1]}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert (meta.name, list(meta.versions)) == ("digits", ["2"])
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
        ("image", "FP32", [-1, 64])]
    assert client.get_server_metadata().name == "fleet"
    inputs = []
    for t in TYPES:
        inp = triton_grpc.InferInput(t.lower(), [3], t)
        inp.set_data_from_numpy(_values(t))
        inputs.append(inp)
    result = client.infer("types", inputs)
    for t in TYPES:
        assert result.as_numpy(f"out_{t.lower()}").tolist() == _values(t).tolist(), t
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", inputs)
    bad = triton_grpc.InferInput("image", [1, 64], "FP64")
    bad.set_data_from_numpy(np.zeros((1, 64)))
    with pytest.raises(InferenceServerException, match="declares FP32") as info:
        client.infer("digits", [bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    client.close()


def test_grpc_typed_contents_and_status_codes(ports: tuple[int, int]) -> None:
    images, labels = load_digits(return_X_y=True)
    with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
        stub = triton_pb_grpc.GRPCInferenceServiceStub(channel)
        req = triton_pb.ModelInferRequest(model_name="digits", id="x")
        tensor = req.inputs.add(name="image", datatype="FP32", shape=[10, 64])
        tensor.contents.fp32_contents.extend(images[1500:1510].ravel().tolist())
        reply = stub.ModelInfer(req, timeout=30)
        assert (reply.model_name, reply.id) == ("digits", "x")
        names = [o.name for o in reply.outputs]
        digits = np.frombuffer(reply.raw_output_contents[names.index("digit")], "<i8")
        assert np.mean(digits == labels[1500:1510]) >= 0.8
        # BYTES in typed contents
        req = triton_pb.ModelInferRequest(model_name="types")
        for t in TYPES:
            values = _values(t)
            raw = b"".join(struct.pack("<I", len(v)) + v for v in values) if t == "BYTES" \
                else values.astype(values.dtype.newbyteorder("<")).tobytes()
            req.inputs.add(name=t.lower(), datatype=t, shape=[3])
            req.raw_input_contents.append(raw)
        reply = stub.ModelInfer(req, timeout=30)
        assert len(reply.raw_output_contents) == len(TYPES)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(triton_pb.ModelInferRequest(model_name="digits", inputs=[
                triton_pb.ModelInferRequest.InferInputTensor(
                    name="image", datatype="FP32", shape=[1, 63])]), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "[-1, 64]" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(triton_pb.ModelMetadataRequest(name="digits", version="7"),
                               timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_declaration_errors() -> None:
    with pytest.raises(ValueError, match="datatype 'FLOAT' is not one of"):
        fleet.oip.model(name="m", inputs=[{"name": "x", "datatype": "FLOAT", "shape": [1]}],
                        outputs=[{"name": "y", "datatype": "FP32", "shape": [1]}])
    with pytest.raises(ValueError, match="shape must be a list"):
        fleet.oip.model(name="m", inputs=[{"name": "x", "datatype": "FP32", "shape": [-2]}],
                        outputs=[{"name": "y", "datatype": "FP32", "shape": [1]}])
    with pytest.raises(ValueError, match="name must be"):
        fleet.oip.model(name="a/b", inputs=[], outputs=[])
    with pytest.raises(TypeError, match="under @fleet.deployment"):
        fleet.oip.model(name="m", inputs=[{"name": "x", "datatype": "FP32", "shape": [1]}],
                        outputs=[{"name": "y", "datatype": "FP32", "shape": [1]}])(Digits)


def test_grpc_proxy_without_numpy_says_how_to_serve_the_protocol(monkeypatch, caplog) -> None:
    # fleet itself needs no NumPy; without it the gRPC proxy serves everything but
    # inference.GRPCInferenceService, and its one line says how to get that too
    import logging
    import sys

    from fleet._proxy import grpc as grpc_proxy
    monkeypatch.setitem(sys.modules, "fleet._oip.grpc", None)    # import fails as without NumPy
    with caplog.at_level(logging.INFO, logger=grpc_proxy.log.name):
        grpc_proxy._add_oip(None, None, None, None)
    lines = [r.getMessage() for r in caplog.records if r.name == grpc_proxy.log.name]
    assert len(lines) == 1
    assert lines[0].startswith("inference.GRPCInferenceService (the Open Inference Protocol) "
                               "is not served: ")
    assert lines[0].endswith("; pip install 'fleet[examples]' to serve it")

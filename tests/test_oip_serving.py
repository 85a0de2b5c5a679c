"""Open Inference Protocol models with fleet's serving features: @fleet.batch joining
requests along the first dimension, and name="*" over a multiplexed loader."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

import fleet

X = [{"name": "x", "datatype": "FP32", "shape": [-1]}]


@fleet.deployment(max_ongoing_requests=8)
@fleet.oip.model(name="rows", inputs=X,
                 outputs=[{"name": "y", "datatype": "FP32", "shape": [-1]},
                          {"name": "rows", "datatype": "INT64", "shape": [-1]}])
class Rows:
    # A batch runs only when 4 requests wait: the test knows what was joined.
    @fleet.batch(max_batch_size=4, batch_wait_timeout_s=30)
    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        return {"y": x * 2, "rows": np.full(len(x), len(x))}


FACTORS = {"double": 2.0, "triple": 3.0}


@fleet.deployment
@fleet.oip.model(name="*", inputs=X, outputs=[{"name": "y", "datatype": "FP32",
                                               "shape": [-1]}])
class Scalers:
    @fleet.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> float:
        return FACTORS[model_id]        # KeyError: no such model (404)

    async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        factor = await self.get_model(fleet.get_multiplexed_model_id())
        return {"y": inputs["x"] * factor}


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0}, grpc_options={"port": 0})
    fleet.run(Rows.bind(), name="rows", route_prefix=None)
    fleet.run(Scalers.bind(), name="scalers", route_prefix=None)
    try:
        proxies = fleet.status()["proxies"]
        yield proxies["http"]["port"], proxies["grpc"]["port"]
    finally:
        fleet.shutdown()


def _infer(model: str, x: list[float]) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(x)], "data": x}]}


def test_batched_requests_are_joined_along_the_first_dimension(ports: tuple[int, int]
                                                               ) -> None:
    sent = [[1.0], [2.0, 3.0], [4.0, 5.0, 6.0], [7.0]]

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}",
                                     timeout=30) as client:
            return await asyncio.gather(*[client.post("/v2/models/rows/infer",
                                                      json=_infer("rows", x)) for x in sent])
    for x, r in zip(sent, asyncio.run(go()), strict=True):
        assert r.status_code == 200, r.text
        outs = {o["name"]: o for o in r.json()["outputs"]}
        assert outs["y"]["data"] == [v * 2 for v in x]
        assert outs["y"]["shape"] == [len(x)]
        assert outs["rows"]["data"] == [7] * len(x)     # one call saw all 7 rows


def test_wildcard_name_serves_what_the_multiplexed_loader_knows(ports: tuple[int, int]
                                                                ) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", timeout=30) as client:
        for name, factor in FACTORS.items():
            r = client.post(f"/v2/models/{name}/infer", json=_infer(name, [1.0, 2.0]))
            assert r.status_code == 200, r.text
            assert r.json()["model_name"] == name
            assert r.json()["outputs"][0]["data"] == [factor, 2 * factor]
        assert client.get("/v2/models/double").json()["name"] == "double"
        r = client.post("/v2/models/quadruple/infer", json=_infer("quadruple", [1.0]))
        assert r.status_code == 404
        assert set(r.json()) == {"error"} and "quadruple" in r.json()["error"]
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{ports[1]}")
    inp = triton_grpc.InferInput("x", [2], "FP32")
    inp.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    assert grpc_client.infer("triple", [inp]).as_numpy("y").tolist() == [3.0, 6.0]
    grpc_client.close()
    # the replica holds the models it loaded, as multiplexing shows them
    held = fleet.status()["applications"]["scalers"]["deployments"]["Scalers"]["replicas"]
    assert {m["model_id"] for m in held[0].get("models", [])} <= {"double", "triple"}


def test_a_model_name_is_served_by_one_application_only(ports: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="model 'rows', which application 'rows' already"):
        fleet.run(Rows.bind(), name="rows_again", route_prefix=None)
    # redeploying the same application is fine
    fleet.run(Rows.bind(), name="rows", route_prefix=None)


def test_repository_extension_unloads_and_loads_by_deleting_and_deploying(
        ports: tuple[int, int]) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["rows"]["state"] == "READY" and index["rows"]["version"] == "1"
    client.unload_model("rows")
    assert "rows" not in fleet.status()["applications"]        # its application is gone
    # no "rows" now: the name falls to the "*" model, whose loader does not know it
    r = httpx.post(f"http://127.0.0.1:{ports[0]}/v2/models/rows/infer",
                   json=_infer("rows", [1.0]), timeout=30)
    assert r.status_code == 404 and "rows" in r.json()["error"]
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert (index["rows"]["state"], index["rows"]["reason"]) == ("UNAVAILABLE", "unloaded")
    with pytest.raises(InferenceServerException, match="no model 'nothing' to load"):
        client.load_model("nothing")
    client.load_model("rows")                                  # deployed again, ready
    assert client.is_model_ready("rows")
    assert fleet.status()["applications"]["rows"]["status"] == "RUNNING"
    client.close()


def test_an_oip_model_starts_the_grpc_proxy() -> None:
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0},
                grpc_options={"enabled": False, "port": 0})
    try:
        assert "grpc" not in fleet.status()["proxies"]
        fleet.run(Rows.bind(), name="rows", route_prefix=None)
        port = fleet.status()["proxies"]["grpc"]["port"]
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_model_ready("rows")
        client.close()
    finally:
        fleet.shutdown()

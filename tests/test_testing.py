"""fleet.testing: a whole application in the test's own process, on the memory backend,
with the HTTP proxy's own app driven in process."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import psutil
import pytest
from fastapi import FastAPI, Header, HTTPException

import fleet
import fleet.testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def test_the_example_tests_pass():
    from examples import test_in_memory
    for name in dir(test_in_memory):
        if name.startswith("test_"):
            getattr(test_in_memory, name)()


def test_no_process_is_started_and_nothing_is_left():
    from examples.quickstart import app
    me = psutil.Process()
    threads_before = threading.active_count()
    with fleet.testing.TestClient(app) as client:
        assert client.get("/", params={"x": 0}).json() == {"x": 0, "total": 3}
        assert me.children(recursive=True) == []
        pids = {r["pid"] for d in _status(client)["deployments"].values()
                for r in d["replicas"]}
        assert pids == {os.getpid()}
    assert me.children(recursive=True) == []
    assert_threads_end(threads_before)


def assert_threads_end(before: int) -> None:
    """The replicas' thread pools were shut down: their threads end promptly."""
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before, threading.enumerate()


def _status(client: fleet.testing.TestClient) -> dict:
    inst = client._session.instance
    assert inst is not None and inst.runtime is not None
    return inst.call(inst.runtime.call_controller("status"))["applications"]["default"]


@fleet.deployment
class Echo:
    def __call__(self, value):
        return value


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable cannot be pickled")


def test_arguments_are_pickled_as_between_processes():
    with fleet.testing.TestClient(Echo.bind()) as client:
        handle = client.get_handle()
        data = {"list": [1, 2, 3]}
        echoed = handle.remote(data).result()
        assert echoed == data and echoed is not data
        with pytest.raises(TypeError, match="Unpicklable"):
            handle.remote(Unpicklable()).result()


api = FastAPI()


@fleet.deployment
@fleet.ingress(api)
class Guarded:
    @api.get("/items/{item}")
    def item(self, item: int, token: str = Header("")) -> dict:
        if token != "secret":
            raise HTTPException(403, "bad token")
        return {"item": item}


def test_fastapi_validation_and_dependencies_run_in_memory():
    with fleet.testing.TestClient(Guarded.bind(), route_prefix="/api") as client:
        assert client.get("/api/items/3", headers={"token": "secret"}).json() == {"item": 3}
        assert client.get("/api/items/3").status_code == 403
        assert client.get("/api/items/three", headers={"token": "secret"}).status_code == 422
        assert client.get("/elsewhere").status_code == 404


class AddHeader:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"x-added", b"yes")]
            await send(message)
        await self.app(scope, receive, wrapped)


def test_http_options_middlewares_apply():
    with fleet.testing.TestClient(Echo.bind(), http_options={"middlewares": [AddHeader]}) \
            as client:
        response = client.post("/", content=b"hi")
        assert response.headers["x-added"] == "yes"


@fleet.deployment(max_ongoing_requests=32)
class Batched:
    # eight calls fill a batch, which then runs at once: the wait only has to outlast a
    # pause of the caller on a loaded machine
    @fleet.batch(max_batch_size=8, batch_wait_timeout_s=1.0)
    async def __call__(self, values: list[int]) -> list[int]:
        return [len(values)] * len(values)


def test_batching_groups_concurrent_handle_calls():
    async def main():
        async with fleet.testing.AsyncTestClient(Batched.bind()) as client:
            handle = client.get_handle()
            sizes = await asyncio.gather(*[handle.remote(i) for i in range(8)])
            assert max(sizes) > 1

    asyncio.run(main())


@fleet.deployment
class Broken:
    def __init__(self):
        raise RuntimeError("no weights here")


def test_a_failing_constructor_raises_on_enter_and_cleans_up():
    threads_before = threading.active_count()
    with pytest.raises(fleet.DeploymentFailedError, match="no weights here"):
        with fleet.testing.TestClient(Broken.bind()):
            pass
    assert_threads_end(threads_before)


def test_user_exceptions_keep_their_type_through_handles():
    @fleet.deployment
    class Fails:
        def __call__(self):
            raise KeyError("missing")

    with fleet.testing.TestClient(Fails.bind()) as client:
        with pytest.raises(KeyError, match="missing"):
            client.get_handle().remote().result()
        assert client.get("/").status_code == 500

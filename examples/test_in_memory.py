# examples/test_in_memory.py
"""Unit tests of the quick start's application, in memory: no processes, no ports."""

import asyncio

import fleet.testing
from examples.quickstart import Adder, app


def test_the_ensemble_sums_both_adders():
    with fleet.testing.TestClient(app) as client:
        response = client.get("/", params={"x": 1})
        assert response.status_code == 200
        assert response.json() == {"x": 1, "total": 5}
        # Handles reach any deployment of the application by name.
        assert client.get_handle("Adder2").remote(1).result() == 3


def test_one_deployment_alone():
    with fleet.testing.TestClient(Adder.bind(10)) as client:
        assert client.get_handle().remote(5).result() == 15


def test_async_tests_use_the_async_client():
    async def main():
        async with fleet.testing.AsyncTestClient(app) as client:
            response = await client.get("/", params={"x": 2})
            assert response.json()["total"] == 7
            assert await client.get_handle("Adder").remote(2) == 3

    asyncio.run(main())

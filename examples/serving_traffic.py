# examples/serving_traffic.py
"""Traffic policies: split a route 90/10 across two versions, shadow a copy to a third."""

import collections

import httpx

import fleet


@fleet.deployment
class Greeter:
    def __init__(self, version: str) -> None:
        self.version = version

    async def __call__(self, request) -> str:
        return f"hello from {self.version}"


if __name__ == "__main__":
    fleet.start(http_options={"port": 0})
    fleet.run(Greeter.bind("v1"), name="app_v1", route_prefix="/hello")
    fleet.run(Greeter.bind("v2"), name="app_v2", route_prefix=None)
    fleet.run(Greeter.bind("v3"), name="app_v3", route_prefix=None)
    fleet.set_traffic("/hello", {"app_v1": 0.9, "app_v2": 0.1})
    fleet.shadow_traffic("/hello", "app_v3", 0.2)    # its answers are dropped
    port = fleet.status()["proxies"]["http"]["port"]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        counts = collections.Counter(client.get("/hello").text for _ in range(200))
    print(dict(counts))
    print("policy:", fleet.status()["traffic"]["/hello"])
    fleet.shutdown()

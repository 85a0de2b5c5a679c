# examples/faq_serve_request.py
"""FAQ: ServeHandle and ServeRequest: the same method serves HTTP and Python callers.

Each pair below reaches ``__call__`` once over HTTP and once through a handle, and the
method reads both the same way.
"""

import httpx
import starlette.requests

import fleet
from fleet import ServeRequest


@fleet.deployment
class Model:
    async def __call__(self, request: starlette.requests.Request):
        if isinstance(request, starlette.requests.Request):
            print("Request coming from web!")
        elif isinstance(request, ServeRequest):
            print("Request coming from Python!")
        seen = {"header": request.headers.get("k"), "a": request.query_params.get("a"),
                "body": (await request.body()).decode()}
        kind = request.headers.get("content-type", "")
        if kind == "application/json":
            seen["json"] = await request.json()
        if kind.startswith("application/x-www-form-urlencoded") or (
                isinstance(request, ServeRequest) and isinstance(request.data, dict)):
            seen["form"] = dict(await request.form())
        return seen

    async def data(self, request: starlette.requests.Request):
        return sorted(request.data)            # any Python object: here a set


@fleet.deployment
class Front:
    def __init__(self, model):
        self.model = model

    async def __call__(self, request: starlette.requests.Request):
        # One special case: a web request passed to a handle arrives as it is.
        await request.body()
        return await self.model.remote(request)


def main() -> None:
    fleet.start(http_options={"port": 0})
    handle = fleet.run(Model.bind(), name="model", route_prefix="/model")
    fleet.run(Front.bind(Model.bind()), name="front", route_prefix="/front")
    url = f"http://127.0.0.1:{fleet.status()['proxies']['http']['port']}/model"

    pairs = [
        (httpx.get(url, headers={"k": "v"}), handle.options(http_headers={"k": "v"}).remote()),
        (httpx.post(url, json={"k": 1}), handle.remote({"k": 1})),
        (httpx.post(url, data={"k": "1"}), handle.remote({"k": "1"})),
        (httpx.get(url, params={"a": "b"}), handle.remote(a="b")),
        (httpx.post(url, content="long string"), handle.remote("long string")),
    ]
    for web, python in pairs:
        web_seen, python_seen = web.json(), python.result()
        for key in ("header", "a", "json", "form"):
            if key in web_seen:
                assert web_seen[key] == python_seen[key], (key, web_seen, python_seen)
        if web_seen["body"] == "long string":
            assert python_seen["body"] == "long string"
    print("HTTP and handle calls read alike")
    print(handle.data.remote({3, 1, 2}).result())           # [1, 2, 3]: no HTTP limits
    forwarded = httpx.post(url.replace("/model", "/front"), json={"via": "front"}).json()
    print(forwarded["json"])                                 # {'via': 'front'}
    fleet.shutdown()


if __name__ == "__main__":
    main()

# examples/faq_cors.py
"""FAQ: CORS (and any Starlette middleware) through ``http_options``."""

import httpx
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

import fleet


@fleet.deployment
def hello(request) -> str:
    return "hello"


def main() -> None:
    fleet.start(http_options={"port": 0, "middlewares": [
        Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"])]})
    fleet.run(hello.bind(), name="hello", route_prefix="/hello")
    url = f"http://127.0.0.1:{fleet.status()['proxies']['http']['port']}/hello"
    preflight = httpx.options(url, headers={"Origin": "https://example.com",
                                            "Access-Control-Request-Method": "PUT"})
    print(preflight.status_code, preflight.headers["access-control-allow-origin"])  # 200 *
    print(httpx.get(url, headers={"Origin": "https://example.com"}).text)          # hello
    fleet.shutdown()


if __name__ == "__main__":
    main()

# examples/faq_status_code.py
"""FAQ: custom status codes: return any Starlette Response from a deployment."""

import http.client

from starlette.responses import Response

import fleet


def f(starlette_request):
    return Response('Hello, world!', status_code=123, media_type='text/plain')


def main() -> None:
    fleet.start(http_options={"port": 0})
    fleet.run(fleet.deployment(f, name="hello").bind(), name="hello", route_prefix="/hello")
    conn = http.client.HTTPConnection("127.0.0.1", fleet.status()["proxies"]["http"]["port"])
    conn.request("GET", "/hello")
    r = conn.getresponse()
    print(r.status, r.read().decode())                          # 123 Hello, world!
    conn.close()
    fleet.shutdown()


if __name__ == "__main__":
    main()

# examples/faq_call_method.py
"""FAQ: calling a method of a replica other than ``__call__``.

``StatefulProcessor`` is the FAQ's class, plus ``add_from_query``: over HTTP a method
receives the request, so the one called with ``X-SERVE-CALL-METHOD`` reads it.
"""

import httpx

import fleet


@fleet.deployment
class StatefulProcessor:
    def __init__(self):
        self.count = 1

    def __call__(self, request):
        return {"current": self.count}

    def other_method(self, inc):
        self.count += inc
        return True

    def add_from_query(self, request):
        return self.other_method(int(request.query_params["inc"]))


def main() -> None:
    fleet.start(http_options={"port": 0})
    fleet.run(StatefulProcessor.bind(), name="endpoint_name", route_prefix="/counter")
    url = f"http://127.0.0.1:{fleet.status()['proxies']['http']['port']}/counter"

    # The FAQ's client.get_handle("endpoint_name"): a handle by application name.
    handle = fleet.get_app_handle("endpoint_name")

    # From Python: the handle's method_name option (or handle.other_method.remote(5)).
    assert handle.options(method_name="other_method").remote(5).result() is True
    print(httpx.get(url).json())                                    # {'current': 6}

    # Over HTTP: the X-SERVE-CALL-METHOD header names the method.
    r = httpx.get(url, params={"inc": 4}, headers={"X-SERVE-CALL-METHOD": "add_from_query"})
    assert r.json() is True
    print(httpx.get(url).json())                                    # {'current': 10}

    # An unknown method is a 404 naming the deployment and the method.
    missing = httpx.get(url, headers={"X-SERVE-CALL-METHOD": "nope"})
    print(missing.status_code, missing.json()["method"])            # 404 nope
    fleet.shutdown()


if __name__ == "__main__":
    main()

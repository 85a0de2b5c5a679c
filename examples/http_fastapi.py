# examples/http_fastapi.py
"""A FastAPI app inside a deployment: routes see ``self``; validation, response
models, websockets and the OpenAPI docs work under the route prefix."""

import httpx
from fastapi import FastAPI, WebSocket
from pydantic import BaseModel
from websockets.sync.client import connect

import fleet

app = FastAPI()


class Total(BaseModel):
    count: int


@fleet.deployment
@fleet.ingress(app)
class Counter:
    def __init__(self, start: int) -> None:
        self.count = start

    @app.post("/add/{n}", response_model=Total)
    def add(self, n: int) -> dict:
        self.count += n
        return {"count": self.count, "internal": "not in the response"}

    @app.websocket("/watch")
    async def watch(self, ws: WebSocket) -> None:
        await ws.accept()
        async for text in ws.iter_text():
            await ws.send_text(f"{text}: {self.count}")


def main() -> None:
    fleet.start(http_options={"port": 0})
    fleet.run(Counter.bind(10), name="counter", route_prefix="/counter")
    base = f"127.0.0.1:{fleet.status()['proxies']['http']['port']}/counter"
    print(httpx.post(f"http://{base}/add/5").json())                # {'count': 15}
    print(httpx.post(f"http://{base}/add/five").status_code)        # 422
    print(httpx.get(f"http://{base}/openapi.json").json()["paths"].keys())
    with connect(f"ws://{base}/watch") as ws:
        ws.send("count")
        print(ws.recv())                                            # count: 15
    fleet.shutdown()


if __name__ == "__main__":
    main()

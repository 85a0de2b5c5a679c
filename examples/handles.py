# examples/handles.py
"""Python handles: call deployments from a driver script, stream, and handle errors."""

import asyncio

import fleet


@fleet.deployment(num_replicas=2, max_ongoing_requests=10)
class Model:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    async def __call__(self, x: float) -> float:
        return x * self.scale

    def tokens(self, text: str):
        yield from text.split()

    def explode(self) -> None:
        raise ValueError("bad input")


def main() -> None:
    fleet.start(http_options={"port": 0})   # this example needs no fixed HTTP port
    handle = fleet.run(Model.bind(2.0), name="model", route_prefix="/model")
    assert handle.remote(21).result() == 42.0              # sync code
    assert handle.remote(handle.remote(1)).result() == 4.0  # responses chain

    async def many() -> list[float]:
        return await asyncio.gather(*[handle.remote(i) for i in range(100)])

    assert asyncio.run(many())[99] == 198.0                 # async code
    words = list(handle.options(stream=True).tokens.remote("to be or not"))
    assert words == ["to", "be", "or", "not"]               # streaming
    try:
        handle.explode.remote().result()
    except ValueError as exc:                               # same type, remote traceback
        assert "in explode of deployment 'Model'" in str(exc.__cause__)
    print(fleet.status()["applications"]["model"]["status"])
    fleet.shutdown()


if __name__ == "__main__":
    main()

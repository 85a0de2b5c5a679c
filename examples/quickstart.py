# examples/quickstart.py
"""The quick start: two deployments composed into one application.

Run it with ``fleet run examples.quickstart:app`` and call it with
``curl "http://127.0.0.1:8000/?x=1"``.
"""

from starlette.requests import Request

import fleet


@fleet.deployment(num_replicas=2)
class Adder:
    """Adds a fixed increment."""

    def __init__(self, increment: int) -> None:
        self.increment = increment

    def __call__(self, x: int) -> int:
        return x + self.increment


@fleet.deployment
class Ensemble:
    """Sums the answers of two Adders; the HTTP ingress."""

    def __init__(self, a: fleet.DeploymentHandle, b: fleet.DeploymentHandle) -> None:
        self.a, self.b = a, b

    async def __call__(self, request: Request) -> dict[str, int]:
        x = int(request.query_params.get("x", "0"))
        total = await self.a.remote(x) + await self.b.remote(x)
        return {"x": x, "total": total}


app = Ensemble.bind(Adder.bind(1), Adder.options(name="Adder2").bind(2))

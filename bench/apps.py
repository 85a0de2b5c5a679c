"""fleet applications used by the benchmark (``fleet run bench.apps:noop`` works too).

Each module-level name is a bound application.  ``model_batched`` is only built when
``fleet.batch`` exists and ``grpc_app`` only when ``fleet.dag``/``fleet.drivers``
import; otherwise they are None and the matching ``*_UNAVAILABLE`` string says why.
"""

from __future__ import annotations

import inspect
from typing import Any

import fleet
from bench import models

#: Concurrency allowed per replica in every benchmark deployment.
MAX_ONGOING = 100


@fleet.deployment(max_ongoing_requests=MAX_ONGOING)
class Noop:
    """HTTP and handle no-op."""

    async def __call__(self, request: Any = None) -> str:
        return models.noop()


class _CpuModel:
    """About 5 ms of pure-Python CPU work per request."""

    async def __call__(self, request: Any = None) -> str:
        return models.cpu_work()


@fleet.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class Cpu1(_CpuModel):
    """CPU-bound model on one replica."""


@fleet.deployment(num_replicas=2, max_ongoing_requests=MAX_ONGOING)
class Cpu2(_CpuModel):
    """CPU-bound model on two replicas."""


@fleet.deployment(max_ongoing_requests=MAX_ONGOING)
class ModelUnbatched:
    """One model call per request: 5.1 ms that hold the replica."""

    async def __call__(self, request: Any = None) -> str:
        return models.run_model([request])[0]


@fleet.deployment(max_ongoing_requests=MAX_ONGOING)
class MlpUnbatched:
    """The real network, one forward pass per request."""

    def __init__(self) -> None:
        self.net = models.DigitNet()

    async def __call__(self, request: Any = None) -> str:
        return self.net.predict([request])[0]


noop = Noop.bind()
noop2 = Noop.options(num_replicas=2).bind()     # the multiproxy scenario
cpu1 = Cpu1.bind()
cpu2 = Cpu2.bind()
model_unbatched = ModelUnbatched.bind()

model_batched: Any = None
mlp_batched: Any = None
mlp_unbatched = MlpUnbatched.bind()
BATCH_UNAVAILABLE = ""
if hasattr(fleet, "batch"):

    @fleet.deployment(max_ongoing_requests=MAX_ONGOING)
    class ModelBatched:
        """Requests grouped by ``@fleet.batch`` into one model call."""

        @fleet.batch(
            max_batch_size=models.MAX_BATCH_SIZE,
            batch_wait_timeout_s=models.BATCH_WAIT_TIMEOUT_S,
        )
        async def predict(self, items: list[Any]) -> list[str]:
            return models.run_model(items)

        async def __call__(self, request: Any = None) -> str:
            return await self.predict(None)

    model_batched = ModelBatched.bind()

    @fleet.deployment(max_ongoing_requests=MAX_ONGOING)
    class MlpBatched:
        """The real network, one forward pass per batch of requests."""

        def __init__(self) -> None:
            self.net = models.DigitNet()

        @fleet.batch(
            max_batch_size=models.MAX_BATCH_SIZE,
            batch_wait_timeout_s=models.BATCH_WAIT_TIMEOUT_S,
        )
        async def predict(self, items: list[Any]) -> list[str]:
            return self.net.predict(items)

        async def __call__(self, request: Any = None) -> str:
            return await self.predict(None)

    mlp_batched = MlpBatched.bind()
else:
    BATCH_UNAVAILABLE = "fleet.batch not available"


@fleet.deployment(max_ongoing_requests=MAX_ONGOING)
class OrangeStand:
    """Prices oranges."""

    async def check_price(self, amount: int) -> float:
        return models.stand_price("ORANGE", amount)


@fleet.deployment(max_ongoing_requests=MAX_ONGOING)
class AppleStand:
    """Prices apples."""

    async def check_price(self, amount: int) -> float:
        return models.stand_price("APPLE", amount)


@fleet.deployment(max_ongoing_requests=MAX_ONGOING)
class FruitMarket:
    """Routes an order to the stand that sells the fruit (one more handle hop)."""

    def __init__(self, orange_stand: Any, apple_stand: Any) -> None:
        self.directory = {"ORANGE": orange_stand, "APPLE": apple_stand}

    async def check_price(self, order: Any) -> bytes:
        fruit, amount = models.parse_order(order)
        ref = await self.directory[fruit].check_price.remote(amount)
        # Handles inside a graph follow the two-step form: awaiting the call gives a
        # reference, awaiting that gives the value.
        price = await ref if inspect.isawaitable(ref) else ref
        return models.encode_price(price)


@fleet.deployment(max_ongoing_requests=MAX_ONGOING)
class PredictJSON:
    """The ``protocols`` scenario over HTTP: JSON ``{"input": {...}}`` in, JSON out."""

    async def __call__(self, request: Any) -> dict[str, str]:
        body = await request.json()
        return {"prediction": models.predict(body["input"]).decode()}


predict_http = PredictJSON.bind()

grpc_app: Any = None
predict_grpc: Any = None
GRPC_UNAVAILABLE = ""
try:
    from fleet.dag import InputNode
    from fleet.drivers import DefaultgRPCDriver
    from fleet.generated import serve_pb2  # noqa: F401
except ImportError as exc:
    GRPC_UNAVAILABLE = f"fleet gRPC not available ({exc})"
else:
    with InputNode() as inp:
        _market = FruitMarket.bind(OrangeStand.bind(), AppleStand.bind())
        _node = _market.check_price.bind(inp)
    grpc_app = DefaultgRPCDriver.bind(_node)

    from fleet.drivers import gRPCIngress
    from fleet.generated import serve_pb2_grpc

    @fleet.deployment(is_driver_deployment=True, max_ongoing_requests=MAX_ONGOING)
    class PredictGRPC(serve_pb2_grpc.PredictAPIsServiceServicer, gRPCIngress):
        """The ``protocols`` scenario over gRPC: Predict served by one deployment."""

        async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802
            return serve_pb2.PredictResponse(prediction=models.predict(request.input))

    predict_grpc = PredictGRPC.bind()

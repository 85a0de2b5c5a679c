"""Ray Serve versions of the benchmark apps (``serve run bench.ray_apps:noop`` works).

Only imported in Ray subprocesses, never next to fleet.  Replicas ask for no CPU
(``num_cpus=0``) so that every graph fits on a small machine; Ray does not pin
processes to cores, so this only affects scheduling, not speed.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from bench import models, predict_pb

MAX_ONGOING = 100
_ACTOR = {"num_cpus": 0}


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class Noop:
    """HTTP and handle no-op."""

    async def __call__(self, request: Any = None) -> str:
        return models.noop()


class _CpuModel:
    """About 5 ms of pure-Python CPU work per request."""

    async def __call__(self, request: Any = None) -> str:
        return models.cpu_work()


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class Cpu1(_CpuModel):
    """CPU-bound model on one replica."""


@serve.deployment(num_replicas=2, max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class Cpu2(_CpuModel):
    """CPU-bound model on two replicas."""


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class ModelUnbatched:
    """One model call per request: 5.1 ms that hold the replica."""

    async def __call__(self, request: Any = None) -> str:
        return models.run_model([request])[0]


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class ModelBatched:
    """Requests grouped by ``@serve.batch`` into one model call."""

    @serve.batch(
        max_batch_size=models.MAX_BATCH_SIZE, batch_wait_timeout_s=models.BATCH_WAIT_TIMEOUT_S
    )
    async def predict(self, items: list[Any]) -> list[str]:
        return models.run_model(items)

    async def __call__(self, request: Any = None) -> str:
        return await self.predict(None)


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class MlpUnbatched:
    """The real network, one forward pass per request."""

    def __init__(self) -> None:
        self.net = models.DigitNet()

    async def __call__(self, request: Any = None) -> str:
        return self.net.predict([request])[0]


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class MlpBatched:
    """The real network, one forward pass per ``@serve.batch`` batch."""

    def __init__(self) -> None:
        self.net = models.DigitNet()

    @serve.batch(
        max_batch_size=models.MAX_BATCH_SIZE, batch_wait_timeout_s=models.BATCH_WAIT_TIMEOUT_S
    )
    async def predict(self, items: list[Any]) -> list[str]:
        return self.net.predict(items)

    async def __call__(self, request: Any = None) -> str:
        return await self.predict(None)


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class OrangeStand:
    """Prices oranges."""

    async def check_price(self, amount: int) -> float:
        return models.stand_price("ORANGE", amount)


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class AppleStand:
    """Prices apples."""

    async def check_price(self, amount: int) -> float:
        return models.stand_price("APPLE", amount)


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class FruitMarket:
    """Routes an order to the stand that sells the fruit."""

    def __init__(self, orange_stand: Any, apple_stand: Any) -> None:
        self.directory = {"ORANGE": orange_stand, "APPLE": apple_stand}

    async def check_price(self, order: Any) -> bytes:
        fruit, amount = models.parse_order(order)
        price = await self.directory[fruit].check_price.remote(amount)
        return models.encode_price(price)


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options=_ACTOR)
class PredictIngress:
    """gRPC ingress: the ``Predict`` method answers ``PredictAPIsService/Predict``."""

    def __init__(self, market: Any) -> None:
        self.market = market

    async def Predict(self, request: Any) -> Any:  # noqa: N802
        prediction = await self.market.check_price.remote(dict(request.input))
        return predict_pb.PredictResponse(prediction=prediction)


noop = Noop.bind()
cpu1 = Cpu1.bind()
cpu2 = Cpu2.bind()
model_unbatched = ModelUnbatched.bind()
model_batched = ModelBatched.bind()
mlp_unbatched = MlpUnbatched.bind()
mlp_batched = MlpBatched.bind()
grpc_app = PredictIngress.bind(FruitMarket.bind(OrangeStand.bind(), AppleStand.bind()))

#: Import path Ray's gRPC proxy loads to register the Predict service.
SERVICER_FUNCTIONS = ["bench.predict_pb.add_PredictAPIsServiceServicer_to_server"]

# examples/grpc_fruit_market.py
"""The FruitMarket deployment graph behind fleet's built-in gRPC schema.

Run it with ``fleet run examples.grpc_fruit_market:my_deployment`` (or ``python -m
examples.grpc_fruit_market``), then ``python -m examples.grpc_fruit_market_client``
prints ``(29.0,)``. Only the imports differ from the Ray Serve 2.1 example, renamed as
the README's "From Ray Serve" table says.
"""

import struct
from typing import Dict  # noqa: UP035 - kept as the example was written

import fleet as serve
from fleet.deployment_graph import InputNode
from fleet.drivers import DefaultgRPCDriver
from fleet.handle import RayServeDeploymentHandle


@serve.deployment
class FruitMarket:
    def __init__(
        self,
        orange_stand: RayServeDeploymentHandle,
        apple_stand: RayServeDeploymentHandle,
    ):
        self.directory = {
            "ORANGE": orange_stand,
            "APPLE": apple_stand,
        }

    async def check_price(self, inputs: Dict[str, bytes]) -> float:  # noqa: UP006
        costs = 0
        for fruit, amount in inputs.items():
            if fruit not in self.directory:
                return
            fruit_stand = self.directory[fruit]
            ref: ray.ObjectRef = await fruit_stand.remote(int(amount))  # noqa: F821
            result = await ref
            costs += result
        return bytearray(struct.pack("f", costs))


@serve.deployment
class OrangeStand:
    def __init__(self):
        self.price = 2.0

    def __call__(self, num_oranges: int):
        return num_oranges * self.price


@serve.deployment
class AppleStand:
    def __init__(self):
        self.price = 3.0

    def __call__(self, num_oranges: int):
        return num_oranges * self.price


with InputNode() as input:  # noqa: A001
    orange_stand = OrangeStand.bind()
    apple_stand = AppleStand.bind()
    fruit_market = FruitMarket.bind(orange_stand, apple_stand)
    my_deployment = DefaultgRPCDriver.bind(fruit_market.check_price.bind(input))


if __name__ == "__main__":
    serve.run(my_deployment, blocking=True)

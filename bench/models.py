"""Framework-free model code shared by every system under test.

The fleet apps (:mod:`bench.apps`), the Ray Serve apps (:mod:`bench.ray_apps`)
and the no-framework baseline (:mod:`bench.baseline`) all call into this module,
so that each system runs exactly the same handler work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

#: Fixed cost of one model call in the ``batch`` scenario, in seconds.
BATCH_CALL_COST_S = 0.005
#: Extra cost of each item in one model call in the ``batch`` scenario, in seconds.
BATCH_ITEM_COST_S = 0.0001
#: Largest batch the batched variants build.
MAX_BATCH_SIZE = 32
#: How long a batch waits to fill up.
BATCH_WAIT_TIMEOUT_S = 0.005

#: Environment variable through which the harness passes the calibrated loop size.
CPU_ITERS_ENV = "FLEET_BENCH_CPU_ITERS"
#: Target cost of one call of the CPU-bound model in the ``scaling`` scenario.
CPU_TARGET_S = 0.005
_DEFAULT_CPU_ITERS = 60_000

#: Prices used by the FruitMarket graph of the ``grpc`` scenario.
FRUIT_PRICES = {"ORANGE": 0.5, "APPLE": 0.3}


def noop() -> str:
    """The no-op handler body: returns a tiny text payload."""
    return "ok"


#: The input of the ``protocols`` scenario, as JSON (HTTP) and as Predict's map (gRPC).
PREDICT_INPUT = {"ORANGE": "10", "APPLE": "3"}


def predict(inputs: Mapping[str, Any]) -> bytes:
    """The ``protocols`` scenario's handler: reads the input, answers a tiny payload."""
    return b"ok" if len(inputs) == len(PREDICT_INPUT) else b"bad input"


def spin(iterations: int) -> int:
    """Burn CPU in pure Python for ``iterations`` loop turns; returns a checksum."""
    acc = 0
    for i in range(iterations):
        acc = (acc + i * i) & 0xFFFF
    return acc


def cpu_iterations() -> int:
    """Loop size of the CPU-bound model, as calibrated by the harness."""
    try:
        return int(os.environ.get(CPU_ITERS_ENV, _DEFAULT_CPU_ITERS))
    except ValueError:
        return _DEFAULT_CPU_ITERS


def calibrate_cpu_iterations(target_s: float = CPU_TARGET_S) -> int:
    """Find how many :func:`spin` turns take ``target_s`` seconds of CPU here."""
    n = 20_000
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        spin(n)
        best = min(best, time.process_time() - t0)
    if best <= 0:
        return _DEFAULT_CPU_ITERS
    return max(1000, int(n * target_s / best))


def cpu_work() -> str:
    """The CPU-bound handler body (about :data:`CPU_TARGET_S` of pure Python)."""
    return str(spin(cpu_iterations()))


def model_cost(batch_size: int) -> float:
    """Seconds that one model call over ``batch_size`` items costs."""
    return BATCH_CALL_COST_S + BATCH_ITEM_COST_S * batch_size


def run_model(items: list[Any]) -> list[str]:
    """Run the simulated model on a batch; blocks the caller like a device call."""
    time.sleep(model_cost(len(items)))
    return ["ok" for _ in items]


class DigitNet:
    """The ``mlp`` scenario's real model: scikit-learn's MLPClassifier (two hidden layers
    of 256) trained on the bundled digits data when built (about a second; no download).
    Each request asks for one image's digit; a batch is one forward pass."""

    def __init__(self) -> None:
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier

        images, labels = load_digits(return_X_y=True)
        self.images = np.asarray(images / 16, dtype=np.float64)
        self.net = MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=30,
                                 random_state=0).fit(self.images, labels)
        self.next = 0

    def predict(self, items: list[Any]) -> list[str]:
        """The digits of ``len(items)`` images, in one forward pass."""
        n = len(items)
        start = self.next
        self.next = (start + n) % (len(self.images) - MAX_BATCH_SIZE)
        return [str(d) for d in self.net.predict(self.images[start:start + n])]


def _fruit_and_amount(order: Any) -> tuple[str, int]:
    """Read (fruit, amount) from a FruitMarket order in any of its wire forms."""
    if hasattr(order, "input") and not isinstance(order, Mapping):
        order = order.input
    if isinstance(order, Mapping):
        for key, value in order.items():
            raw = value.decode() if isinstance(value, bytes | bytearray) else str(value)
            return str(key).upper(), int(raw or 0)
        return "ORANGE", 0
    if isinstance(order, bytes | bytearray):
        order = order.decode()
    if isinstance(order, str) and ":" in order:
        fruit, amount = order.split(":", 1)
        return fruit.upper(), int(amount)
    if isinstance(order, list | tuple) and len(order) == 2:
        return str(order[0]).upper(), int(order[1])
    raise ValueError(f"unreadable order: {order!r}")


def parse_order(order: Any) -> tuple[str, int]:
    """Public wrapper of the order parser used by every FruitMarket."""
    return _fruit_and_amount(order)


def stand_price(fruit: str, amount: int) -> float:
    """Price asked by one fruit stand."""
    return FRUIT_PRICES.get(fruit, 0.0) * amount


def encode_price(price: float) -> bytes:
    """Wire form of a price in a Predict response."""
    return f"{price:.2f}".encode()


#: The order every gRPC client sends: three oranges.
GRPC_ORDER = {"ORANGE": b"3"}

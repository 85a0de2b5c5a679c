# examples/models_batching.py
"""A small neural network (scikit-learn's MLPClassifier) with fleet.batch: concurrent
requests become one matrix product, and throughput rises with the batch size."""

import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

import fleet


@fleet.deployment(max_ongoing_requests=64)
class DigitNet:
    def __init__(self) -> None:
        images, labels = load_digits(return_X_y=True)
        self.net = MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=60,
                                 random_state=0).fit(images / 16, labels)

    @fleet.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def __call__(self, images: list[np.ndarray]) -> list[int]:
        # One forward pass for the whole batch, one answer per caller.
        return [int(d) for d in self.net.predict(np.stack(images) / 16)]

    async def unbatched(self, image: np.ndarray) -> int:
        return int(self.net.predict(image.reshape(1, 64) / 16)[0])


def throughput(handle, images: np.ndarray) -> tuple[float, list[int]]:
    started = time.perf_counter()
    digits = [r.result() for r in [handle.remote(x) for x in images]]
    return len(images) / (time.perf_counter() - started), digits


if __name__ == "__main__":
    fleet.start(http_options={"port": 0})
    handle = fleet.run(DigitNet.bind(), name="digitnet", route_prefix=None)
    images, labels = load_digits(return_X_y=True)
    batched, digits = throughput(handle, images[:512])
    unbatched, same = throughput(handle.options(method_name="unbatched"), images[:512])
    assert digits == same
    sizes = fleet.status()["applications"]["digitnet"]["deployments"]["DigitNet"]
    print(f"accuracy {np.mean(np.asarray(digits) == labels[:512]):.3f}")
    print(f"batched {batched:.0f} calls/s, unbatched {unbatched:.0f} calls/s, "
          f"gain {batched / unbatched:.1f}x")
    fleet.shutdown()

# examples/serving_autoscaling.py
"""Autoscaling with scale to zero: the first call waits while a replica starts."""

import fleet


@fleet.deployment(autoscaling_config={
    "min_replicas": 0, "max_replicas": 4, "initial_replicas": 0,
    "target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": 0.5,
    "look_back_period_s": 0.5})
class Model:
    async def __call__(self, x: int) -> int:
        return x * 2


if __name__ == "__main__":
    fleet.start(http_options={"port": 0})
    handle = fleet.run(Model.bind(), name="model", route_prefix=None)
    print("replicas at start:", len(fleet.status()["applications"]["model"]
                                    ["deployments"]["Model"]["replicas"]))
    print("answer:", handle.options(timeout_s=30).remote(21).result())
    for entry in fleet.status()["applications"]["model"]["deployments"]["Model"]["scaling_log"]:
        print(f"scaled {entry['from']} -> {entry['to']}: {entry['reason']}")
    fleet.shutdown()

# examples/ray_detached.py
"""Deploy on a Ray cluster and leave it serving: RAY_ADDRESS=<head node>:6379 python
examples/ray_detached.py. Stop it with `fleet shutdown --ray-address <head node>:6379`,
or fleet.shutdown() from any process that joined the cluster."""

import fleet


@fleet.deployment(ray_actor_options={"num_cpus": 0.5})
def kept(request=None) -> str:
    return "still serving"


app = kept.bind()

if __name__ == "__main__":
    # the controller: a detached actor of the cluster at RAY_ADDRESS (0: any free port)
    fleet.start(backend="ray", detached=True, http_options={"host": "127.0.0.1", "port": 0})
    fleet.run(app, name="kept", route_prefix="/kept")
    print(f"serving on port {fleet.status()['proxies']['http']['port']}; this script "
          "exits, the application stays")

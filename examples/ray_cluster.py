# examples/ray_cluster.py
"""Serve on a Ray cluster: RAY_ADDRESS=<head node>:6379 python examples/ray_cluster.py"""

import fleet


@fleet.deployment(num_replicas=2, max_replicas_per_node=1,
                  ray_actor_options={"num_cpus": 0.5})
class Where:
    def __call__(self, request=None) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()


app = Where.bind()

if __name__ == "__main__":
    # the cluster at RAY_ADDRESS; a proxy on every node, all on one port (0: any free one)
    fleet.start(backend="ray", http_options={"host": "127.0.0.1", "port": 0})
    handle = fleet.run(app)
    status = fleet.status()
    nodes = {r["node_id"] for r in status["applications"]["default"]["deployments"]
             ["Where"]["replicas"]}
    print(f"2 replicas on {len(nodes)} nodes, proxies on {len(status['proxies_by_node'])}; "
          f"a call answered from node {handle.remote().result()[:8]}")
    fleet.shutdown()

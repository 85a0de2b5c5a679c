"""Subprocess entry serving one Ray Serve app: ``python -m bench._serve_ray --app NAME``.

Starts a private local Ray instance on loopback (no dashboard), Serve's HTTP proxy on
127.0.0.1:``--port`` and, with ``--grpc-port``, its gRPC proxy; runs
``bench.ray_apps.<NAME>``, prints ``READY <json>`` and serves until SIGTERM/SIGINT.
With ``--handle-bench`` it measures handle calls instead and exits when done.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from bench import handlebench


def main(argv: list[str] | None = None) -> None:
    """Serve (or benchmark handles of) one Ray Serve app until told to stop."""
    args, stop, serving = handlebench.server_setup(__doc__, argv)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from bench import ray_apps

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        grpc_options = None
        if args.grpc_port:
            grpc_options = gRPCOptions(
                port=args.grpc_port, grpc_servicer_functions=ray_apps.SERVICER_FUNCTIONS
            )
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port}, grpc_options=grpc_options
        )
        handle = serve.run(getattr(ray_apps, args.app), name="default", route_prefix="/")
        info: dict[str, Any] = {"port": args.port}
        if args.grpc_port:
            from bench import predict_pb
            from bench.models import GRPC_ORDER

            info.update(
                grpc_port=args.grpc_port,
                grpc_method=predict_pb.PREDICT_METHOD,
                grpc_request_hex=predict_pb.sample_request(GRPC_ORDER).hex(),
                grpc_metadata=[["application", "default"]],
            )
        serving.set()
        print("READY " + json.dumps(info), flush=True)
        if args.handle_bench:

            async def acall() -> Any:
                return await handle.remote()

            handlebench.run(args, acall, lambda: handle.remote().result())
        else:
            while not stop.wait(0.5):
                pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
    sys.exit(0)

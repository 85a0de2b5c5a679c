"""Subprocess entry serving one fleet app: ``python -m bench._serve_fleet --app NAME``.

Starts fleet on 127.0.0.1 (HTTP on ``--port``, gRPC on ``--grpc-port`` when given),
runs ``bench.apps.<NAME>``, prints ``READY <json>`` and serves until SIGTERM/SIGINT,
then shuts fleet down.  With ``--handle-bench`` it measures handle calls instead
and exits when done.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

from bench import handlebench


def _grpc_info(port: int) -> dict[str, Any]:
    """How a client calls fleet's Predict API: method path and sample request."""
    from bench.models import GRPC_ORDER
    from fleet.generated import serve_pb2

    service = serve_pb2.DESCRIPTOR.services_by_name["PredictAPIsService"]
    request = serve_pb2.PredictRequest(input=GRPC_ORDER).SerializeToString()
    return {
        "grpc_port": port,
        "grpc_method": f"/{service.full_name}/Predict",
        "grpc_request_hex": request.hex(),
        "grpc_metadata": [],
    }


def _predict_request() -> bytes:
    from bench.models import PREDICT_INPUT
    from fleet.generated import serve_pb2

    inputs = {k: v.encode() for k, v in PREDICT_INPUT.items()}
    return bytes(serve_pb2.PredictRequest(input=inputs).SerializeToString())


def _load_app(name: str) -> Any:
    """The bound application ``bench.apps.<name>``."""
    apps = importlib.import_module("bench.apps")
    app = getattr(apps, name)
    if app is None:
        reason = apps.GRPC_UNAVAILABLE if name in ("grpc_app", "predict_grpc") \
            else apps.BATCH_UNAVAILABLE
        raise SystemExit(f"UNAVAILABLE {reason}")
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve (or benchmark handles of) one app until told to stop."""
    args, stop, serving = handlebench.server_setup(__doc__, argv)

    import fleet

    app = _load_app(args.app)
    options: dict[str, Any] = {"http_options": {"host": "127.0.0.1", "port": args.port,
                                                "num_proxies": args.num_proxies}}
    if args.grpc_port:
        options["grpc_options"] = {"host": "127.0.0.1", "port": args.grpc_port}
    if args.backend == "ray":
        # a private one-node Ray on loopback, as the Ray Serve driver starts
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        options["backend"] = "ray"
        options["http_options"].pop("num_proxies")
    fleet.start(**options)
    try:
        handle = fleet.run(app, name="default", route_prefix="/")
        info: dict[str, Any] = {"port": args.port}
        if args.grpc_port:
            info.update(_grpc_info(args.grpc_port))
        if args.app == "predict_grpc":
            # The grpcnoop scenario: the Predict no-op alone, one deployment.
            info["grpc_request_hex"] = _predict_request().hex()
        if args.app == "predict_http" and args.grpc_port:
            # The protocols scenario: the same handler as a gRPC Predict deployment.
            fleet.run(_load_app("predict_grpc"), name="grpc", route_prefix="/grpc")
            info["grpc_metadata"] = [["application", "grpc"]]
            info["grpc_request_hex"] = _predict_request().hex()
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
        fleet.shutdown()
        if args.backend == "ray":
            import ray
            ray.shutdown()


if __name__ == "__main__":
    main()
    sys.exit(0)

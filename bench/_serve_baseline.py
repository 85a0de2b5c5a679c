"""Subprocess entry for the no-framework baseline servers.

``python -m bench._serve_baseline --app noop --port P [--workers N]`` serves a raw
ASGI app on uvicorn (httptools + uvloop); ``--grpc-port G`` serves the FruitMarket
Predict API on grpc.aio (with ``--app predict``: the no-op Predict, as the
``grpcnoop`` scenario's fleet deployment answers it); ``--handle-bench`` measures
framed-RPC calls to a worker process.  Each prints ``READY <json>`` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys

from bench import handlebench
from bench.procs import free_port, kill_tree


def _ready(**info: object) -> None:
    print("READY " + json.dumps(info), flush=True)


def _serve_http(app: str, port: int, workers: int) -> None:
    import uvicorn

    _ready(port=port)
    uvicorn.run(
        f"bench.baseline:{app}",
        host="127.0.0.1",
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )


def _serve_grpc(port: int, app: str) -> None:
    from bench import baseline, predict_pb
    from bench.models import GRPC_ORDER, PREDICT_INPUT

    noop = app == "predict"
    request = {k: v.encode() for k, v in PREDICT_INPUT.items()} if noop else GRPC_ORDER

    def ready() -> None:
        _ready(
            grpc_port=port,
            grpc_method=predict_pb.PREDICT_METHOD,
            grpc_request_hex=predict_pb.sample_request(request).hex(),
            grpc_metadata=[],
        )

    import uvloop

    servicer = baseline.PredictServicer() if noop else baseline.FruitMarketServicer()
    uvloop.run(baseline.serve_grpc(port, ready, servicer))


def _handle_bench(args: argparse.Namespace) -> None:
    import uvloop

    from bench.baseline import RawHandle

    port = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "bench._serve_baseline", "--worker", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        if not worker.stdout.readline().startswith("READY"):
            raise RuntimeError("handle worker did not start")
        loop = uvloop.new_event_loop()
        handle = RawHandle(port)
        loop.run_until_complete(handle.connect())
        _ready(port=port)
        handlebench.run(
            args,
            async_call=handle.remote,
            sync_call=lambda: loop.run_until_complete(handle.remote()),
            run_async=loop.run_until_complete,
        )
    finally:
        kill_tree(worker.pid, grace_s=2)


def main(argv: list[str] | None = None) -> None:
    """Parse options and serve until terminated."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--app", default="noop")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help="run a handle worker")
    handlebench.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        import uvloop

        from bench.baseline import worker_main

        uvloop.run(worker_main(args.port, lambda: _ready(port=args.port)))
    elif args.handle_bench:
        _handle_bench(args)
    elif args.grpc_port:
        _serve_grpc(args.grpc_port, args.app)
    else:
        _serve_http(args.app, args.port, args.workers)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
    except asyncio.CancelledError:
        sys.exit(0)

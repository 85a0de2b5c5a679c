"""``fleet run`` with a YAML config serves HTTP and gRPC in one process and prints both."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import time
from typing import Any

import grpc
import httpx
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc

from fleet.generated import serve_pb2, serve_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
http_options: {host: 127.0.0.1, port: 0}
grpc_options:
  port: 0
  grpc_servicer_functions: [protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server]
applications:
  - name: fruit
    route_prefix: /fruit
    import_path: examples.grpc_fruit_market:my_deployment
    deployments:
      - name: OrangeStand
        num_replicas: 2
  - name: hello
    route_prefix: /hello
    import_path: test_grpc_cli:hello_app
  - name: echo
    route_prefix: /echo
    import_path: test_grpc_cli:echo_app
"""


def _hello() -> Any:
    import fleet

    @fleet.deployment
    def hello(request: Any) -> str:
        return "hello"
    return hello.bind()


hello_app = _hello()


def _echo() -> Any:
    from protos import fleet_echo_pb2 as pb

    import fleet

    @fleet.deployment
    class Echo:
        """Served through the YAML's grpc_servicer_functions: methods named after RPCs."""

        async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.EchoReply(text=f"yaml {request.text}")
    return Echo.bind()


echo_app = _echo()


def test_fleet_run_serves_http_and_grpc_and_prints_both_addresses(tmp_path: Any) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(CONFIG)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)]))
    proc = subprocess.Popen([sys.executable, "-c", "from fleet._cli import main; main()",
                             "run", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any("press Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        out = "".join(lines)
        http = re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", out)
        grpc_addr = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", out)
        assert http and grpc_addr, out
        assert httpx.get(f"http://127.0.0.1:{http.group(1)}/hello", timeout=10).text == "hello"
        with grpc.insecure_channel(f"127.0.0.1:{grpc_addr.group(1)}") as channel:
            stub = serve_pb2_grpc.PredictAPIsServiceStub(channel)
            reply = stub.Predict(serve_pb2.PredictRequest(input={"ORANGE": b"10",
                                                                 "APPLE": b"3"}),
                                 metadata=(("application", "fruit"),), timeout=10)
            echo = pb_grpc.EchoServiceStub(channel).Say(pb.EchoRequest(text="hi"),
                                                        metadata=(("application", "echo"),),
                                                        timeout=10)
        assert struct.unpack("f", reply.prediction) == (29.0,)
        assert echo.text == "yaml hi"
        assert re.search(r"application 'fruit' RUNNING on gRPC 127\.0\.0\.1:\d+ \(.*"
                         r"OrangeStand x2", out), out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

"""Every code example of Ray Serve's gRPC ingress page and its FAQ runs on fleet after
only the renames of the README's "From Ray Serve" table, applied mechanically here.

Each program below is the example as the page shows it. The pages' text lost some lines
(decorators, closing brackets, a method body) and leaves out what a whole program needs
(running the application, calling it, checking the answer); every such line ends with
``# added: why``. Where the pages' documents are on this machine (``../shared/seeds``
beside the checkout), every other line is checked to appear in them, in order.
Each program runs as its own script in a fresh process, with its own instance.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(os.path.dirname(ROOT), "shared", "seeds")
ADDED = "# added:"

# Ports: the pages use 8000 and 9000 (tests/test_grpc_seed.py holds those defaults);
# here every program gets free ones, substituted for these two names.
START = ('serve.start(http_options={"port": 0}, '  # the programs' first fleet call
         'grpc_options={"port": GRPC_PORT})')


# -- the gRPC ingress page ------------------------------------------------------------

FRUIT_MARKET = '''
import ray
from ray import serve
from ray.serve.drivers import DefaultgRPCDriver
from ray.serve.handle import RayServeDeploymentHandle
from ray.serve.deployment_graph import InputNode
from typing import Dict
import struct

@serve.deployment  # added: the page's text lost the decorators
class FruitMarket:
    def __init__(
        self,  # added: lost from the page's text
        orange_stand: RayServeDeploymentHandle,
        apple_stand: RayServeDeploymentHandle,
    ):  # added: lost from the page's text
        self.directory = {
            "ORANGE": orange_stand,
            "APPLE": apple_stand,
        }  # added: lost from the page's text

    async def check_price(self, inputs: Dict[str, bytes]) -> float:
        costs = 0
        for fruit, amount in inputs.items():
            if fruit not in self.directory:
                return  # added: lost from the page's text
            fruit_stand = self.directory[fruit]
            ref: ray.ObjectRef = await fruit_stand.remote(int(amount))
            result = await ref
            costs += result
        return bytearray(struct.pack("f", costs))

@serve.deployment  # added: the page's text lost the decorators
class OrangeStand:
    def __init__(self):
        self.price = 2.0

    def __call__(self, num_oranges: int):
        return num_oranges * self.price

@serve.deployment  # added: the page's text lost the decorators
class AppleStand:
    def __init__(self):
        self.price = 3.0

    def __call__(self, num_oranges: int):
        return num_oranges * self.price

with InputNode() as input:
    orange_stand = OrangeStand.bind()
    apple_stand = AppleStand.bind()
    fruit_market = FruitMarket.bind(orange_stand, apple_stand)
    my_deployment = DefaultgRPCDriver.bind(fruit_market.check_price.bind(input))
'''

PREDICT_CLIENT = '''
import grpc
from ray.serve.generated import serve_pb2, serve_pb2_grpc
import asyncio
import struct

async def send_request():
    async with grpc.aio.insecure_channel("localhost:9000") as channel:
        stub = serve_pb2_grpc.PredictAPIsServiceStub(channel)
        response = await stub.Predict(
            serve_pb2.PredictRequest(  # added: lost from the page's text
                input={"ORANGE": bytes("10", "utf-8"), "APPLE": bytes("3", "utf-8")}
            )  # added: lost from the page's text
        )  # added: lost from the page's text
    return response

async def main():
    resp = await send_request()
    print(struct.unpack("f", resp.prediction))

# for python>=3.7, please use asyncio.run(main())
'''

RUN_AND_CALL = '''
START  # added: free ports for the test
serve.run(my_deployment)  # added: the page deploys it without saying how
asyncio.run(main())  # added: as the page's comment says
serve.shutdown()  # added: end the program
'''

MY_DRIVER = '''
from ray import serve
from ray.serve.drivers import gRPCIngress
import test_service_pb2_grpc, test_service_pb2

@serve.deployment(is_driver_deployment=True)  # added: the decorator the page says to add
class MyDriver(test_service_pb2_grpc.TestServiceServicer, gRPCIngress):
    def __init__(self):
        super().__init__()  # added: the body the page's text lost

    async def Ping(self, request, context):
        # play with your dag and then reply
        return test_service_pb2.PingReply()

my_deployment = MyDriver.bind()
'''

PING_CLIENT = '''
import grpc
import test_service_pb2_grpc, test_service_pb2

async def ping():  # added: grpc.aio calls are awaited in a coroutine
    channel = grpc.aio.insecure_channel("localhost:9000")
    stub = test_service_pb2_grpc.TestServiceStub(channel)
    response = stub.Ping(test_service_pb2.PingRequest())
    print(type(await response).__name__)  # added: await the call and show its reply
    try:  # added: the unimplemented RPC answers as from grpcio
        await stub.PingTimeout(test_service_pb2.PingTimeoutRequest())  # added: see above
    except grpc.aio.AioRpcError as exc:  # added: see above
        print(exc.code().name)  # added: see above
    await channel.close()  # added: close the channel

serve.start(http_options={"port": 0})  # added: a free HTTP port; gRPC on GRPC_PORT below
serve.run(my_deployment)  # added: the page deploys it without saying how
import asyncio  # added: to run the coroutine
asyncio.run(ping())  # added: run the client
serve.shutdown()  # added: end the program
'''

# -- the FAQ ----------------------------------------------------------------------------

FAQ_HANDLE = '''
import ray  # added: the FAQ's programs start like this
from ray import serve  # added: see above
client = serve.start(http_options={"port": 0})  # added: Ray 1.x's start, a free port

@serve.deployment  # added: something to call
def echo(request):  # added: see above
    return "echoed"  # added: see above
client.create_backend("api_endpoint", echo)  # added: see above

handle = client.get_handle("api_endpoint")
ref = handle.remote(None)  # added: "use handle.remote to send requests"
ready, not_ready = ray.wait([ref], timeout=30)  # added: "waited for ... using ray.wait"
print(len(ready), len(not_ready), ray.get(ref))  # added: "retrieved using ray.get"
serve.shutdown()  # added: end the program
'''

FAQ_CALL_METHOD = '''
import ray  # added: the FAQ's programs start like this
from ray import serve  # added: see above
client = serve.start(http_options={"port": 0})  # added: Ray 1.x's start, a free port

class StatefulProcessor:
    def __init__(self):
        self.count = 1

    def __call__(self, request):
        return {"current": self.count}

    def other_method(self, inc):
        self.count += inc
        return True

client.create_backend("endpoint_name", StatefulProcessor)  # added: its deployment
handle = client.get_handle("endpoint_name")
print(ray.get(handle.options(method_name="other_method").remote(5)))  # added: the call
print(ray.get(handle.remote(None)))  # added: the state it changed
import httpx  # added: the same over HTTP, with the header
port = serve.status()["proxies"]["http"]["port"]  # added: see above
url = f"http://127.0.0.1:{port}/endpoint_name"  # added: see above
print(httpx.get(url, headers={"X-SERVE-CALL-METHOD": "__call__"}).json())  # added: see above
serve.shutdown()  # added: end the program
'''

FAQ_STATUS_CODE = '''
from ray import serve  # added: the FAQ's programs start like this
client = serve.start(http_options={"port": 0})  # added: Ray 1.x's start, a free port
from starlette.responses import Response

def f(starlette_request):
    return Response('Hello, world!', status_code=123, media_type='text/plain')

client.create_backend("hello", f)
import http.client  # added: call it (httpx takes any 1xx for an interim response)
port = serve.status()["proxies"]["http"]["port"]  # added: see above
conn = http.client.HTTPConnection("127.0.0.1", port)  # added: see above
conn.request("GET", "/hello")  # added: see above
r = conn.getresponse()  # added: see above
print(r.status, r.read().decode(), r.getheader("content-type"))  # added: see above
serve.shutdown()  # added: end the program
'''

FAQ_CORS = '''
from ray import serve  # added: the FAQ's programs start like this
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

client = serve.start(
    http_options={"middlewares": [
        Middleware(  # added: lost from the FAQ's text
            CORSMiddleware, allow_origins=["*"], allow_methods=["*"])
    ], "port": 0})  # added: lost closing brackets; a free port

@serve.deployment  # added: something to call
def hello(request):  # added: see above
    return "hi"  # added: see above
client.create_backend("hello", hello)  # added: see above
import httpx  # added: a preflight request from another origin
url = f"http://127.0.0.1:{serve.status()['proxies']['http']['port']}/hello"  # added: see above
r = httpx.options(url, headers={"Origin": "http://elsewhere.example",  # added: see above
                                "Access-Control-Request-Method": "POST"})  # added: see above
print(r.status_code, r.headers["access-control-allow-origin"])  # added: see above
serve.shutdown()  # added: end the program
'''

FAQ_SERVE_REQUEST = '''
from ray import serve  # added: the FAQ's programs start like this
from fleet import ServeRequest  # added: the FAQ uses it without an import
client = serve.start(http_options={"port": 0})  # added: Ray 1.x's start, a free port

import starlette.requests

# added: fleet gives handle calls a ServeRequest where the request is annotated so
def model(request: starlette.requests.Request):  # added: the FAQ's lines are its body
    if isinstance(request, starlette.requests.Request):
        print("Request coming from web!")
    elif isinstance(request, ServeRequest):
        print("Request coming from Python!")
    return "ok"  # added: an answer

client.create_backend("model", model)  # added: its deployment (the comment above too)
import httpx  # added: one call from the web, one from Python
httpx.get(f"http://127.0.0.1:{serve.status()['proxies']['http']['port']}/model")  # added: see above
serve.get_app_handle("model").remote("long string").result()  # added: see above
serve.shutdown()  # added: end the program
'''


# -- the harness ------------------------------------------------------------------------

def rename_table() -> list[tuple[str, str]]:
    """The README's "From Ray Serve" table, (Ray Serve, fleet) per row."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("\n## From Ray Serve\n")
    section = text[start:text.index("\n## ", start + 1)]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", section, re.M)
    assert len(rows) >= 8, "the rename table is missing"
    return rows


def rename(program: str) -> str:
    """Apply the table: ``<x>`` matches any text, the same on both sides."""
    for ray_form, fleet_form in rename_table():
        pattern = ""
        parts = re.split(r"(<\w+>)", ray_form)
        for i, part in enumerate(parts):
            if i % 2 == 0:
                pattern += re.escape(part)
            elif i == len(parts) - 2 and parts[-1] == "":    # at the end: the rest
                pattern += rf"(?P<{part[1:-1]}>[^\n]+?)"
            else:                                             # an argument
                pattern += rf"(?P<{part[1:-1]}>[^,()\n]+?)"
        if ray_form.startswith(("import ", "from ")):
            pattern = rf"(?m)^(?P<_indent>[ \t]*){pattern}(?=[ \t]*(#.*)?$)"
            replacement = r"\g<_indent>" + re.sub(r"<(\w+)>", r"\\g<\1>", fleet_form)
        else:
            replacement = re.sub(r"<(\w+)>", r"\\g<\1>", fleet_form)
        program = re.sub(pattern, replacement, program)
    return program


def seed_lines(program: str) -> list[str]:
    """The program's lines that come from the pages (not marked as added)."""
    return [ln.strip() for ln in program.splitlines()
            if ln.strip() and ADDED not in ln and ln.strip() != "START"]


def check_from_the_pages(program: str, page: str) -> None:
    path = os.path.join(SEEDS, page)
    if not os.path.exists(path):
        return      # the documents are not on this machine; the programs still run
    with open(path) as f:
        text = [ln.strip() for ln in f]
    at = 0
    for line in seed_lines(program):
        try:
            at = text.index(line, at) + 1
        except ValueError:
            raise AssertionError(f"{line!r} is not on the page {page} (in this order); "
                                 f"mark lines the test adds with {ADDED!r}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(program: str, tmp_path: Any, page: str, also: tuple[str, ...] | list[str] = ()
        ) -> list[str]:
    """Check, rename, give free ports and run the program (and rename ``also``, files the
    program runs); its output lines."""
    check_from_the_pages(program, page)
    grpc_port = _free_port()
    for name in also:
        path = tmp_path / name
        path.write_text(rename(path.read_text()).replace("localhost:9000",
                                                         f"localhost:{grpc_port}"))
    renamed = rename(program)
    left = re.findall(r"(?m)^\s*(?:from ray\b|import ray\b).*|(?<![\w.])client\.\w+\(",
                      renamed)
    assert not left, f"not renamed: {left}"
    renamed = renamed.replace("START", START).replace("GRPC_PORT", str(grpc_port))
    renamed = renamed.replace("localhost:9000", f"localhost:{grpc_port}")
    script = tmp_path / "program.py"
    script.write_text(renamed)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"{renamed}\n--- stderr:\n{out.stderr[-3000:]}"
    return out.stdout.splitlines()


GRPC_PAGE = "000_9f16070a319b7632.txt"
FAQ_PAGE = "004_d98bc1e89d23c729.txt"


def _protoc(proto_dir: str, proto: str, out: Any) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={proto_dir}",
                    f"--python_out={out}", f"--grpc_python_out={out}",
                    os.path.join(proto_dir, proto)], check=True)


def test_rename_table_maps_every_import_the_pages_use() -> None:
    for program in (FRUIT_MARKET, PREDICT_CLIENT, MY_DRIVER):
        renamed = rename(program)
        for line in renamed.splitlines():
            if line.startswith(("import ", "from ")):
                assert "ray" not in line.replace("as ray", ""), line
    import fleet
    from fleet.deployment_graph import InputNode
    from fleet.handle import RayServeDeploymentHandle
    assert RayServeDeploymentHandle is fleet.DeploymentHandle
    assert InputNode is fleet.dag.InputNode
    assert rename('client.create_backend("hello", f)') == \
        'serve.run(serve.deployment(f, name="hello").bind(), name="hello", ' \
        'route_prefix="/" + "hello")'


def test_fruit_market_and_its_client(tmp_path: Any) -> None:
    assert run(FRUIT_MARKET + PREDICT_CLIENT + RUN_AND_CALL, tmp_path, GRPC_PAGE) \
        == ["(29.0,)"]


def test_fruit_market_with_a_client_generated_from_rays_serve_proto(tmp_path: Any) -> None:
    # The page: copy Serve's serve.proto and generate the client from it. Ray's file,
    # package ray.serve, is fleet/protos/ray_serve.proto; copied under its Ray name, it
    # generates serve_pb2 and serve_pb2_grpc as the page says. The client runs in its own
    # process, as clients do: protobuf refuses a second definition of the ray.serve
    # messages in a process that imported fleet's drivers (which hold them).
    protos = tmp_path / "src" / "ray" / "protobuf"
    protos.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "fleet", "protos", "ray_serve.proto"),
                protos / "serve.proto")
    _protoc(str(protos), "serve.proto", tmp_path)
    client = PREDICT_CLIENT.replace(
        "from ray.serve.generated import serve_pb2, serve_pb2_grpc",
        "import serve_pb2, serve_pb2_grpc  # added: the generated files")
    client += ("assert serve_pb2.DESCRIPTOR.package == 'ray.serve'  # added: Ray's schema\n"
               "asyncio.run(main())  # added: as the page's comment says\n")
    check_from_the_pages(client, GRPC_PAGE)
    server = FRUIT_MARKET + """
START  # added: free ports for the test
serve.run(my_deployment)  # added: the page deploys it without saying how
import subprocess, sys  # added: run the client in its own process
subprocess.run([sys.executable, "client.py"], check=True)  # added: see above
serve.shutdown()  # added: end the program
"""
    (tmp_path / "client.py").write_text(client)
    assert run(server, tmp_path, GRPC_PAGE, also=["client.py"]) == ["(29.0,)"]


def test_bring_your_own_schema_driver_and_client(tmp_path: Any) -> None:
    _protoc(os.path.join(ROOT, "examples", "protos"), "test_service.proto", tmp_path)
    program = MY_DRIVER + PING_CLIENT.replace(
        'serve.start(http_options={"port": 0})',
        'serve.start(http_options={"port": 0}, grpc_options={"port": GRPC_PORT})')
    assert run(program, tmp_path, GRPC_PAGE) == ["PingReply", "UNIMPLEMENTED"]


def test_faq_handle_with_ray_get_and_ray_wait(tmp_path: Any) -> None:
    assert run(FAQ_HANDLE, tmp_path, FAQ_PAGE) == ["1 0 echoed"]


def test_faq_other_method_through_handle_options(tmp_path: Any) -> None:
    assert run(FAQ_CALL_METHOD, tmp_path, FAQ_PAGE) == [
        "True", "{'current': 6}", "{'current': 6}"]


def test_faq_custom_status_code(tmp_path: Any) -> None:
    assert run(FAQ_STATUS_CODE, tmp_path, FAQ_PAGE) == [
        "123 Hello, world! text/plain; charset=utf-8"]


def test_faq_cors_middleware(tmp_path: Any) -> None:
    assert run(FAQ_CORS, tmp_path, FAQ_PAGE) == ["200 *"]


def test_faq_web_or_python_request(tmp_path: Any) -> None:
    out = run(FAQ_SERVE_REQUEST, tmp_path, FAQ_PAGE)
    assert sorted(ln for ln in out if ln.startswith("Request coming")) == [
        "Request coming from Python!", "Request coming from web!"]


@pytest.mark.parametrize("program", [FRUIT_MARKET, PREDICT_CLIENT, MY_DRIVER, PING_CLIENT,
                                     FAQ_HANDLE, FAQ_CALL_METHOD, FAQ_STATUS_CODE, FAQ_CORS,
                                     FAQ_SERVE_REQUEST])
def test_every_line_added_to_a_page_is_marked(program: str) -> None:
    page = GRPC_PAGE if program in (FRUIT_MARKET, PREDICT_CLIENT, MY_DRIVER, PING_CLIENT) \
        else FAQ_PAGE
    if not os.path.exists(os.path.join(SEEDS, page)):
        pytest.skip(f"the page's document is not on this machine ({SEEDS})")
    check_from_the_pages(program, page)

"""HTTP/1.1 on a raw socket: keep-alive, pipelining, chunked request bodies and
``Expect: 100-continue``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import RawClient
from starlette.requests import Request

import fleet


@fleet.deployment
class Echo:
    async def __call__(self, request: Request) -> str:
        body = await request.body()
        return f"{request.url.path}:{body.decode()}"


@pytest.fixture(scope="module")
def port(shared_instance) -> Iterator[int]:
    fleet.run(Echo.bind(), name="echo", route_prefix="/echo")
    yield shared_instance.http_port


@pytest.fixture
def conn(port) -> Iterator[RawClient]:
    c = RawClient(port)
    yield c
    c.close()


def test_keep_alive_serves_many_requests_on_one_connection(conn):
    for i in range(5):
        conn.send(f"GET /echo/{i} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        status, headers, body = conn.response()
        assert status == 200 and body == f"/echo/{i}:".encode()
        assert headers.get("connection", "keep-alive") != "close"


def test_pipelined_requests_answer_in_order(conn):
    conn.send(b"".join(
        f"POST /echo/{i} HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nb{i}".encode()
        for i in range(3)))
    assert [conn.response()[2] for _ in range(3)] == [b"/echo/0:b0", b"/echo/1:b1",
                                                       b"/echo/2:b2"]


def test_chunked_request_body(conn):
    conn.send(b"POST /echo/c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, _, body = conn.response()
    assert status == 200 and body == b"/echo/c:hello world"


def test_expect_100_continue(conn):
    conn.send(b"POST /echo/e HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
              b"expect: 100-continue\r\n\r\n")
    status, _, _ = conn.response()
    assert status == 100
    conn.send(b"data")
    status, _, body = conn.response()
    assert status == 200 and body == b"/echo/e:data"

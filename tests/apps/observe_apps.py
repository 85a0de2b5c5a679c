"""Deployments of tests/test_observe.py: request ids across a handle call, log lines,
failures on demand."""

from __future__ import annotations

import logging

import fleet

log = logging.getLogger("observe_app")


@fleet.deployment
class Inner:
    def __call__(self, text: str) -> dict[str, str]:
        # a sync method: runs in the thread pool, in a copy of the call's context
        log.info("inner sees %s", text)
        return {"inner_id": fleet.get_request_id()}


@fleet.deployment
class Front:
    def __init__(self, inner: fleet.DeploymentHandle) -> None:
        self.inner = inner

    async def __call__(self, request):
        if request.query_params.get("fail"):
            raise ValueError("asked to fail")
        log.info("front serving %s", request.url.path)
        print("front printed a line")
        inner = await self.inner.remote(request.url.path)
        return {"front_id": fleet.get_request_id(), **inner}


@fleet.deployment
class Broken:
    def __init__(self, fail: bool) -> None:
        if fail:
            raise RuntimeError("this constructor was told to fail")

    def __call__(self, request) -> str:
        return "fixed"


front = Front.bind(Inner.bind())

"""An HTTP middleware for the proxy restart tests: it refuses to start (so the proxy
process cannot serve) while the environment the proxy was started with says so."""

from __future__ import annotations

import os
from typing import Any

REFUSE_ENV = "FLEET_TEST_PROXY_REFUSES"


class RefuseWhenAsked:
    def __init__(self, app: Any) -> None:
        if os.environ.get(REFUSE_ENV):
            raise RuntimeError("this proxy was asked to refuse to start")
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

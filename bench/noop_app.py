"""The no-op app alone, as a user's module would hold it: ``fleet run
bench.noop_app:noop`` (the coldstart scenario) loads nothing the other benchmark apps
need, such as gRPC drivers."""

from __future__ import annotations

from typing import Any

import fleet
from bench import models


@fleet.deployment(max_ongoing_requests=100)
class Noop:
    """HTTP no-op."""

    async def __call__(self, request: Any = None) -> str:
        return models.noop()


noop = Noop.bind()

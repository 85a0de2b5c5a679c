"""Applications the dashboard's tests deploy through the REST API, by import path: a shop
that logs under each request's id, and a version of it whose constructor raises."""

from __future__ import annotations

import logging
from typing import Any

import fleet

log = logging.getLogger("shop")


@fleet.deployment
class Shop:
    def __init__(self, greeting: str = "open") -> None:
        self.greeting = greeting

    async def __call__(self, request: Any) -> dict[str, Any]:
        log.info("shop served %s", request.url.path)
        return {"shop": self.greeting, "request_id": fleet.get_request_id()}


@fleet.deployment(name="Shop")
class BrokenShop:
    def __init__(self) -> None:
        raise ValueError("the shelves are empty: restock before opening")

    def __call__(self, request: Any) -> str:
        return "never"


good = Shop.bind()
broken = BrokenShop.bind()

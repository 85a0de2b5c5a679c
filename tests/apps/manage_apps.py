"""Applications the management API tests deploy through PUT /api/applications."""

from __future__ import annotations

import fleet


@fleet.deployment
class Back:
    def __call__(self, text: str) -> str:
        return text.upper()


@fleet.deployment
class Front:
    def __init__(self, back: fleet.DeploymentHandle) -> None:
        self.back = back

    async def __call__(self, request) -> str:
        return await self.back.remote("composed")


composed = Front.bind(Back.bind())


@fleet.deployment
class Greeter:
    def __init__(self, greeting: str, fail: bool) -> None:
        if fail:
            raise ValueError(f"cannot greet with {greeting!r}")
        self.greeting = greeting

    def __call__(self, request) -> str:
        return self.greeting


def greeter(args: dict) -> fleet.Application:
    return Greeter.bind(args.get("greeting", "hi"), bool(args.get("fail")))

"""A multiplexed deployment for `fleet run` and `fleet status` tests."""

from __future__ import annotations

from typing import Any

import fleet


@fleet.deployment
class Models:
    @fleet.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        return model_id.upper()

    async def __call__(self, request: Any) -> str:
        return await self.get_model(fleet.get_multiplexed_model_id())


app = Models.bind()

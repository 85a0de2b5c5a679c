"""The management API's request bodies (besides an application's config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ScaleBody(BaseModel):
    """``POST .../scale``."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(ge=0, le=10000)


class RollbackBody(BaseModel):
    """``POST .../rollback``: the revision to deploy again (default: the previous)."""

    model_config = ConfigDict(extra="forbid")
    to: int | None = Field(None, ge=1)

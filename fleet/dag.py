"""Deployment graphs: ``InputNode`` and method binding (the graph API)."""

from __future__ import annotations

from typing import Any


def prepare_app(app: Any) -> tuple[Any, str]:
    """Turn a graph driver into a plain application; returns (app, protocol)."""
    return app, "http"

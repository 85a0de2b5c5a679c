"""Route prefix matching: longest prefix wins, on path-segment boundaries."""

from __future__ import annotations

from typing import Any


class RouteTable:
    """Maps a request path to (route prefix, route info)."""

    def __init__(self, routes: dict[str, Any] | None = None) -> None:
        self.routes: dict[str, Any] = {}
        self._ordered: list[tuple[str, Any]] = []
        self._cache: dict[str, tuple[str, Any] | None] = {}
        if routes:
            self.update(routes)

    def update(self, routes: dict[str, Any]) -> None:
        self.routes = dict(routes)
        self._ordered = sorted(routes.items(), key=lambda kv: len(kv[0]), reverse=True)
        self._cache = {}

    def match(self, path: str) -> tuple[str, Any] | None:
        hit = self._cache.get(path, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        found: tuple[str, Any] | None = None
        for prefix, info in self._ordered:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                found = (prefix, info)
                break
        if len(self._cache) < 4096:
            self._cache[path] = found
        return found

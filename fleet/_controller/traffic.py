"""Traffic policies: validating them, and the table the proxies route by.

A policy belongs to a route prefix: ``weights`` split the route's requests across
applications, ``shadow`` copies a fraction of them to other applications whose answers
are dropped. The published table names each application's current ingress, so a
redeployed application is followed without a new policy.
"""

from __future__ import annotations

import math
from typing import Any

from fleet._controller.state import AppState
from fleet._types import TrafficPolicy


def _running(apps: dict[str, AppState]) -> dict[str, AppState]:
    return {n: a for n, a in apps.items() if not a.deleting}


def check_route(apps: dict[str, AppState], route_prefix: str) -> str:
    """The normalised prefix; ValueError unless an application serves it."""
    if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
        raise ValueError(f"route_prefix must be a string starting with '/', "
                         f"got {route_prefix!r}")
    prefix = route_prefix.rstrip("/") if len(route_prefix) > 1 else route_prefix
    routes = {a.route_prefix: n for n, a in _running(apps).items() if a.route_prefix}
    if prefix not in routes:
        raise ValueError(f"no application serves route_prefix {prefix!r}; routes: "
                         f"{sorted(routes) or 'none'}")
    return prefix


def _check_app(apps: dict[str, AppState], app: str) -> None:
    if app not in _running(apps):
        raise ValueError(f"traffic policy names application {app!r}, which is not running; "
                         f"running: {sorted(_running(apps)) or 'none'}")


def check_weights(apps: dict[str, AppState], weights: Any) -> dict[str, float]:
    """Weights by application: non-negative numbers, not all zero, every app running."""
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of application name to weight, "
                        f"got {type(weights).__name__}")
    out: dict[str, float] = {}
    for app, w in weights.items():
        _check_app(apps, app)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) \
                or w < 0:
            raise ValueError(f"the weight of application {app!r} must be a non-negative "
                             f"number, got {w!r}")
        out[app] = float(w)
    if not any(out.values()):
        raise ValueError("traffic weights must not all be zero")
    return out


def check_fraction(apps: dict[str, AppState], app: str, fraction: Any) -> float:
    _check_app(apps, app)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
            or not 0 <= fraction <= 1:
        raise ValueError(f"the shadow fraction must be a number from 0 to 1, got {fraction!r}")
    return float(fraction)


def set_weights(policies: dict[str, dict[str, Any]], apps: dict[str, AppState],
                route_prefix: str, weights: Any) -> str:
    """Set (or, for None or {}, clear) a route's split; returns the normalised prefix."""
    prefix = check_route(apps, route_prefix)
    checked = check_weights(apps, weights) if weights else None
    policy = policies.setdefault(prefix, {})
    if checked:
        policy["weights"] = checked
    else:
        policy.pop("weights", None)
    _prune(policies, prefix)
    return prefix


def set_shadow(policies: dict[str, dict[str, Any]], apps: dict[str, AppState],
               route_prefix: str, app: str, fraction: Any) -> str:
    """Set (or, for 0, stop) the fraction of a route copied to app; returns the prefix."""
    prefix = check_route(apps, route_prefix)
    fraction = check_fraction(apps, app, fraction)
    policy = policies.setdefault(prefix, {})
    shadow = dict(policy.get("shadow", {}))
    if fraction:
        shadow[app] = fraction
    else:
        shadow.pop(app, None)
    policy["shadow"] = shadow
    _prune(policies, prefix)
    return prefix


def _prune(policies: dict[str, dict[str, Any]], prefix: str) -> None:
    policy = policies.get(prefix, {})
    if not policy.get("weights") and not policy.get("shadow"):
        policies.pop(prefix, None)


def traffic_tables(policies: dict[str, dict[str, Any]], apps: dict[str, AppState]
                   ) -> dict[str, TrafficPolicy]:
    """``{prefix: {"split": [(app, ingress, cumulative share), ...],
    "shadow": [(app, ingress, fraction), ...]}}`` over the applications still running."""
    running = _running(apps)
    out: dict[str, TrafficPolicy] = {}
    for prefix, policy in policies.items():
        split: list[tuple[str, str, float]] = []
        total = 0.0
        for app, w in policy.get("weights", {}).items():
            if app in running and w > 0:
                total += w
                split.append((app, running[app].ingress, total))
        shadow = [(app, running[app].ingress, float(f))
                  for app, f in policy.get("shadow", {}).items() if app in running]
        if split or shadow:
            out[prefix] = {"split": [(a, i, c / total) for a, i, c in split],
                           "shadow": shadow}
    return out

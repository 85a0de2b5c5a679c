"""What the controller publishes and reports: the routing tables every subscriber
gets, and the status the driver and ``fleet status`` show. Pure reads of its records."""

from __future__ import annotations

import time
from typing import Any

from fleet._controller.state import AppState
from fleet._controller.traffic import traffic_tables
from fleet._types import (
    ApplicationStatus,
    DeploymentStatus,
    DeploymentTable,
    Tables,
    deployment_key,
)


def tables(apps: dict[str, AppState], traffic: dict[str, Any], version: int) -> Tables:
    """Routes, running replicas of every deployment, and traffic policies."""
    deployments: dict[str, DeploymentTable] = {}
    routes: dict[str, Any] = {}
    for app in apps.values():
        if app.route_prefix is not None and not app.deleting:
            routes[app.route_prefix] = {"app": app.name, "ingress": app.ingress,
                                        "protocol": app.protocol}
        for dep in app.deployments.values():
            cfg = dep.plan.config
            deployments[deployment_key(app.name, dep.name)] = {
                "replicas": [{"replica_id": r.replica_id, "address": r.address}
                             for r in dep.running()],
                "max_ongoing_requests": cfg.max_ongoing_requests,
                "max_queued_requests": cfg.max_queued_requests,
                "status": dep.status.value,
                "message": dep.message,
                "legacy_refs": dep.plan.legacy_refs,
                "autoscaling": dep.autoscaler is not None,
            }
    return {"version": version, "deployments": deployments, "routes": routes,
            "traffic": traffic_tables(traffic, apps)}


def status(apps: dict[str, AppState], proxies: dict[str, dict[str, Any]],
           traffic: dict[str, Any]) -> dict[str, Any]:
    """Applications -> deployments -> replicas, the proxies and the traffic policies."""
    out: dict[str, Any] = {}
    for app in apps.values():
        deps: dict[str, Any] = {}
        for dep in app.deployments.values():
            deps[dep.name] = {
                "status": dep.status.value,
                "message": dep.message,
                "target_replicas": dep.target,
                "replicas": [{"replica_id": r.replica_id, "state": r.state.value,
                              "pid": r.pid, "version": r.version, "message": r.message,
                              "ongoing": r.ongoing, "batches": r.batches}
                             for r in dep.replicas.values()],
                "scaling_log": list(dep.scaling_log[-10:]),
            }
            if dep.last_error is not None:
                deps[dep.name]["last_error"] = dict(dep.last_error)
            if dep.autoscaler is not None:
                deps[dep.name]["autoscaling"] = dep.autoscaler.describe(time.monotonic())
        out[app.name] = {"status": app_status(app).value, "route_prefix": app.route_prefix,
                         "ingress": app.ingress, "protocol": app.protocol,
                         "deployments": deps}
    return {"applications": out, "proxies": dict(proxies),
            "traffic": {p: dict(v) for p, v in traffic.items()}}


def app_status(app: AppState) -> ApplicationStatus:
    """An application's state: the worst of its deployments'."""
    if app.deleting:
        return ApplicationStatus.DELETING
    states = {d.status for d in app.deployments.values()}
    if DeploymentStatus.DEPLOY_FAILED in states:
        return ApplicationStatus.DEPLOY_FAILED
    if DeploymentStatus.UNHEALTHY in states:
        return ApplicationStatus.UNHEALTHY
    if states <= {DeploymentStatus.HEALTHY}:
        return ApplicationStatus.RUNNING
    return ApplicationStatus.DEPLOYING

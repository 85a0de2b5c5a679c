"""What the controller publishes and reports: the routing tables every subscriber
gets, and the status the driver and ``fleet status`` show. Pure reads of its records."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fleet._controller.state import AppState, DeploymentState, ReplicaRecord
from fleet._controller.traffic import traffic_tables
from fleet._types import (
    ApplicationStatus,
    DeploymentStatus,
    DeploymentTable,
    ReplicaInfo,
    ReplicaState,
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
                                        "protocol": app.protocol,
                                        "grpc_port": app.grpc_port}
        for dep in app.deployments.values():
            cfg = dep.plan.config
            deployments[deployment_key(app.name, dep.name)] = {
                "replicas": [_replica_info(r) for r in dep.running()],
                "max_ongoing_requests": cfg.max_ongoing_requests,
                "max_queued_requests": cfg.max_queued_requests,
                "status": dep.status.value,
                "message": dep.message,
                "legacy_refs": dep.plan.legacy_refs,
                "autoscaling": dep.autoscaler is not None,
            }
    return {"version": version, "deployments": deployments, "routes": routes,
            "traffic": traffic_tables(traffic, apps), "oip": oip_models(apps)}


def oip_index(apps: dict[str, AppState], unloaded: dict[str, Any]) -> list[dict[str, Any]]:
    """The repository index: loaded models READY (or UNAVAILABLE while they have no
    running replica), unloaded ones UNAVAILABLE."""
    out = []
    loaded = oip_models(apps)
    for name, entry in sorted(loaded.items()):
        dep = apps[entry["app"]].deployments[entry["deployment"]]
        ok = bool(dep.running())
        out.append({"name": name, "version": entry["version"],
                    "state": "READY" if ok else "UNAVAILABLE",
                    "reason": "" if ok else dep.message or "no replica is running"})
    for name, (_, _, plans, _) in sorted(unloaded.items()):
        if name not in loaded:
            spec = next(p.oip for p in plans if p.oip and p.oip["name"] == name)
            out.append({"name": name, "version": spec["version"], "state": "UNAVAILABLE",
                        "reason": "unloaded"})
    return out


def check_oip_names(apps: dict[str, AppState], app_name: str, plans: list[Any]) -> None:
    """Refuse an Open Inference Protocol model name that another application serves."""
    taken = {e["name"]: e["app"] for e in oip_models(apps).values() if e["app"] != app_name}
    seen: set[str] = set()
    for plan in plans:
        if plan.oip is None:
            continue
        model = plan.oip["name"]
        if model in taken or model in seen:
            where = f"application {taken[model]!r}" if model in taken else "this application"
            raise ValueError(f"deployment {plan.name!r} declares the Open Inference Protocol "
                             f"model {model!r}, which {where} already serves; model names "
                             "are unique across applications: rename it or delete the other")
        seen.add(model)


def oip_models(apps: dict[str, AppState]) -> dict[str, Any]:
    """Open Inference Protocol models by name, across every application."""
    out: dict[str, Any] = {}
    for app in apps.values():
        if app.deleting:
            continue
        for dep in app.deployments.values():
            spec = dep.plan.oip
            if spec is not None and spec["name"] not in out:
                out[spec["name"]] = {**spec, "app": app.name, "deployment": dep.name}
    return out


def _replica_info(rec: ReplicaRecord) -> ReplicaInfo:
    info: ReplicaInfo = {"replica_id": rec.replica_id, "address": rec.address}
    if rec.models:      # multiplexed models it holds, for callers that never called it
        info["models"] = [m["model_id"] for m in rec.models]
    return info


# A health check failure explains a deployment that is not converged for this long.
UNHEALTHY_REASON_S = 60.0
# Lines of a constructor's traceback that a status' reason shows.
TRACEBACK_LINES = 6

Stats = Callable[[str, "str | None"], dict[str, Any]]


def status(apps: dict[str, AppState], proxies: dict[str, dict[str, Any]],
           traffic: dict[str, Any], node_id: str = "local",
           stats: Stats | None = None) -> dict[str, Any]:
    """Applications -> deployments -> replicas, the proxies and the traffic policies.

    stats(app, deployment or None) gives the last minute's figures (requests/s,
    percentiles, error rate) from the metrics store, when there is one."""
    out: dict[str, Any] = {}
    now = time.monotonic()
    for app in apps.values():
        deps: dict[str, Any] = {}
        for dep in app.deployments.values():
            running = len(dep.running())
            desired = dep.autoscaler.desired(now) if dep.autoscaler is not None else dep.target
            deps[dep.name] = {
                "status": dep.status.value,
                "message": dep.message,
                "reason": reason(dep, now),
                "target_replicas": dep.target,
                "desired_replicas": desired,
                "running_replicas": running,
                "last_deployed_time_s": round(dep.last_deployed_at, 3),
                "replicas": [{"replica_id": r.replica_id, "state": _state(r),
                              "pid": r.pid, "version": r.version,
                              "node_id": (r.proc.node_id if r.proc is not None
                                          and r.proc.node_id else node_id),
                              "message": _pending(r) or r.message or _doing(r),
                              "uptime_s": round(now - r.started_at, 1),
                              "ongoing": r.ongoing, "batches": r.batches,
                              **({"models": list(r.models)} if r.models else {})}
                             for r in dep.replicas.values()],
                "scaling_log": list(dep.scaling_log[-10:]),
            }
            if stats is not None:
                deps[dep.name].update(stats(app.name, dep.name))
            if dep.last_error is not None:
                deps[dep.name]["last_error"] = dict(dep.last_error)
            if dep.autoscaler is not None:
                deps[dep.name]["autoscaling"] = dep.autoscaler.describe(time.monotonic())
        live = [d for d in deps.values()]
        out[app.name] = {"status": app_status(app).value, "route_prefix": app.route_prefix,
                         "ingress": app.ingress, "protocol": app.protocol,
                         "grpc_port": app.grpc_port,
                         "last_deployed_time_s": round(app.deployed_at, 3),
                         "target_replicas": sum(d["target_replicas"] for d in live),
                         "desired_replicas": sum(d["desired_replicas"] for d in live),
                         "running_replicas": sum(d["running_replicas"] for d in live),
                         "reason": next((f"{n}: {d['reason']}" for n, d in deps.items()
                                         if d["reason"]), ""),
                         "deployments": deps}
        if stats is not None and app.ingress in app.deployments:
            out[app.name].update(stats(app.name, app.ingress))
    return {"applications": out, "proxies": dict(proxies),
            "traffic": {p: dict(v) for p, v in traffic.items()}}


def reason(dep: DeploymentState, now: float) -> str:
    """Why a deployment is not converged (empty when it is): its constructor failed
    (with the traceback's last lines), a health check is failing, it is scaling up for
    load, or replicas wait for resources or their constructor."""
    from fleet._types import DeploymentStatus as S
    if dep.status == S.HEALTHY and not dep.deleting:
        return ""
    if dep.deleting:
        return "being deleted: waiting for its replicas to finish their calls and exit"
    if dep.status == S.DEPLOY_FAILED:
        text = f"constructor failed: {dep.message}" if dep.error_type else dep.message
        if dep.traceback:
            tail = [ln for ln in dep.traceback.rstrip().splitlines() if ln.strip()]
            text += "\n" + "\n".join(tail[-TRACEBACK_LINES:])
        return text
    parts: list[str] = []
    if dep.last_unhealthy is not None and now - dep.last_unhealthy[0] < UNHEALTHY_REASON_S:
        parts.append(f"health check failing: {dep.last_unhealthy[1]}")
    running = len(dep.running())
    if dep.autoscaler is not None and dep.scaling_log and running < dep.target:
        last = dep.scaling_log[-1]
        if last["to"] > last["from"]:
            parts.append(f"scaling up for load from {last['from']} to {last['to']}: "
                         f"{last['reason']}")
    starting = [r for r in dep.replicas.values() if r.state == ReplicaState.STARTING]
    waiting = [r for r in starting if r.message in ("", "process starting")]
    constructing = [r for r in starting if r not in waiting]
    if waiting:
        parts.append(f"waiting for resources: {len(waiting)} replica process(es) starting")
    if constructing:
        parts.append(f"{len(constructing)} replica(s) starting: "
                     f"{constructing[0].message}")
    old = [r for r in dep.live() if r.version != dep.plan.version]
    if old:
        parts.append(f"rolling update: {len(old)} replica(s) of the previous version left")
    if any(r.reconfiguring for r in dep.replicas.values()):
        parts.append("replicas are applying a new user_config")
    if not parts and running < dep.target:
        parts.append(f"{running} of {dep.target} replicas running")
    if dep.last_gone and running < dep.target:
        parts.append(f"last replaced: {dep.last_gone}")
    return "; ".join(parts)
def _pending(rec: ReplicaRecord) -> str | None:
    """Why a starting replica is not placed yet (the Ray backend waits for resources)."""
    if rec.state != ReplicaState.STARTING or rec.proc is None:
        return None
    return rec.proc.pending()


def _state(rec: ReplicaRecord) -> str:
    """A replica's state, PENDING while its backend has not placed it yet."""
    return "PENDING" if _pending(rec) else rec.state.value


def proxies_by_node(parts: dict[str, dict[int, dict[str, Any]]],
                    nodes: dict[tuple[str, int], str]) -> dict[str, dict[str, Any]]:
    """Each node's proxies: node id -> kind -> that proxy's info."""
    out: dict[str, dict[str, Any]] = {}
    for kind, by_index in parts.items():
        for index, info in sorted(by_index.items()):
            node = nodes.get((kind, index))
            if node and "error" not in info:
                mine = out.setdefault(node, {})
                if kind in mine:            # num_proxies > 1: one entry, every pid
                    mine[kind]["pids"].append(info.get("pid"))
                else:
                    mine[kind] = dict(info, pids=[info.get("pid")])
    return out


def _doing(rec: ReplicaRecord) -> str:
    """What a starting replica is doing, when it has no message of its own."""
    return "process starting" if rec.state == ReplicaState.STARTING else ""


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


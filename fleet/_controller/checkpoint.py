"""What a controller that restarts needs to carry on: its applications (each one's
plans, route, replica count and revision history) and the replicas that serve them.

A detached controller on Ray (ray_actors.ControllerActor) saves ``snapshot`` in
Ray's GCS key-value store whenever ``key`` changes, and a restarted one calls
``restore`` before it listens: applications come back as they were, and every replica
whose actor still lives is adopted as RUNNING at the address it served on, so the tables
route to it at once; it reconnects by itself (fleet/_runtime.py, ``_rejoin``). One that
does not rejoin within REJOIN_GRACE_S is replaced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleet._controller.state import AppState, ReplicaRecord
from fleet._types import DeploymentStatus, ReplicaState, deployment_key

if TYPE_CHECKING:
    from fleet._controller.controller import Controller

FORMAT = 1
# How long an adopted replica has to reconnect to the restarted controller.
REJOIN_GRACE_S = 30.0


def key(c: Controller) -> Any:
    """Changes whenever what ``snapshot`` records changes (cheap: no copies)."""
    return (c.version, tuple((a.name, a.revision, a.deleting,
                              tuple((d.name, d.target, d.deleting, d.status)
                                    for d in a.deployments.values()))
                             for a in c.apps.values()))


def snapshot(c: Controller) -> dict[str, Any]:
    """The controller's state that outlives it (pickled by the caller)."""
    apps = []
    for app in c.apps.values():
        if app.deleting:
            continue
        deps = []
        for dep in app.deployments.values():
            if dep.deleting:
                continue
            deps.append({"plan": dep.plan, "target": dep.target,
                         "status": dep.status, "message": dep.message,
                         "error_type": dep.error_type, "traceback": dep.traceback,
                         "replicas": [
                             {"replica_id": r.replica_id, "version": r.version,
                              "address": r.address, "pid": r.pid,
                              "user_config": r.user_config,
                              "reconfiguring": r.reconfiguring}
                             for r in dep.replicas.values()
                             if r.state == ReplicaState.RUNNING and r.address]})
        apps.append({"name": app.name, "route_prefix": app.route_prefix,
                     "ingress": app.ingress, "protocol": app.protocol,
                     "grpc_port": app.grpc_port, "sys_path": app.sys_path, "cwd": app.cwd,
                     "deployed_at": app.deployed_at, "revision": app.revision,
                     "deploy_key": app.deploy_key, "deployments": deps})
    return {"format": FORMAT, "version": c.version, "apps": apps, "traffic": c.traffic,
            "revisions": c.revisions}


def restore(c: Controller, state: dict[str, Any],
            adopt: Callable[[str, str], Any]) -> list[str]:
    """Bring back what snapshot saved; adopt(replica_id, deployment key) returns the live
    process of a replica (None when it is gone). Returns the replica ids adopted."""
    if state.get("format") != FORMAT:
        return []
    c.version = int(state.get("version", 0)) + 1
    c.traffic = dict(state.get("traffic") or {})
    if state.get("revisions") is not None:
        c.revisions = state["revisions"]
    adopted = []
    now = time.monotonic()
    for saved in state.get("apps", []):
        app = AppState(name=saved["name"], route_prefix=saved["route_prefix"],
                       ingress=saved["ingress"], protocol=saved["protocol"],
                       grpc_port=saved["grpc_port"], sys_path=list(saved["sys_path"]),
                       cwd=saved["cwd"], deployed_at=saved["deployed_at"],
                       revision=saved["revision"], deploy_key=saved["deploy_key"])
        c.apps[app.name] = app
        for d in saved["deployments"]:
            plan = d["plan"]
            c.restore_plan(app, plan, int(d["target"]))
            dep = app.deployments[plan.name]
            if d["status"] == DeploymentStatus.DEPLOY_FAILED:
                # as it was: the failed version is not tried again until the next deploy
                dep.status, dep.message = d["status"], d["message"]
                dep.error_type, dep.traceback = d["error_type"], d["traceback"]
            for r in d["replicas"]:
                proc = adopt(r["replica_id"], deployment_key(app.name, plan.name))
                if proc is None:
                    continue            # its actor is gone: reconcile starts another
                dep.replicas[r["replica_id"]] = ReplicaRecord(
                    replica_id=r["replica_id"], version=r["version"],
                    state=ReplicaState.RUNNING, proc=proc, address=r["address"],
                    pid=r["pid"], user_config=r["user_config"],
                    reconfiguring=r["reconfiguring"], rejoin_by=now + REJOIN_GRACE_S)
                adopted.append(r["replica_id"])
        c.events.add("recovered", app.name, "", "",
                     f"the controller restarted; revision {app.revision} recovered")
    return adopted

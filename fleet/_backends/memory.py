"""The memory backend: every replica is a task on the instance's own event loop.

The in-memory twin of the local backend, for tests (``fleet.testing``): the same
controller, replica and data plane run in one process, so arguments and results are
still pickled on the way, but nothing waits for a process to start.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fleet._types import ReplicaSpec


class MemoryReplica:
    """A replica running as a task of this process."""

    def __init__(self, replica_id: str, replica: Any, task: asyncio.Task[int]) -> None:
        self.replica_id = replica_id
        self.replica = replica
        self.task = task

    @property
    def pid(self) -> int:
        return os.getpid()

    def alive(self) -> bool:
        return not self.task.done()

    @property
    def node_id(self) -> str:
        return "memory"

    def pending(self) -> str | None:
        return None

    def exit_code(self) -> int | None:
        if not self.task.done():
            return None
        if self.task.cancelled():
            return -9
        return 1 if self.task.exception() is not None else self.task.result()


class MemoryBackend:
    """Starts replicas as tasks on the running loop; no processes, no proxies."""

    name = "memory"
    listen_host = ""

    def __init__(self) -> None:
        self.procs: dict[str, MemoryReplica] = {}

    async def start_replica(self, spec: ReplicaSpec) -> MemoryReplica:
        from fleet._replica.replica import Replica
        loop = asyncio.get_running_loop()
        replica = Replica(spec, loop, own_process=False)
        task = loop.create_task(replica.run(), name=f"fleet-replica-{spec.replica_id}")
        proc = MemoryReplica(spec.replica_id, replica, task)
        self.procs[spec.replica_id] = proc
        return proc

    async def stop_replica(self, proc: Any, timeout_s: float) -> None:
        assert isinstance(proc, MemoryReplica)
        done, _ = await asyncio.wait({proc.task}, timeout=timeout_s)
        if not done:
            self.kill(proc)
            await asyncio.wait({proc.task}, timeout=5)
        # In a process of its own the replica's threads end with it; here they must be
        # ended by hand, or every test leaves a pool behind.
        proc.replica.pool.shutdown(wait=False, cancel_futures=True)
        self.procs.pop(proc.replica_id, None)

    def terminate(self, proc: Any) -> None:
        proc.replica.request_stop()

    def kill(self, proc: Any) -> None:
        proc.task.cancel()

    def nodes(self) -> list[dict[str, Any]]:
        return [{"node_id": "memory", "address": "127.0.0.1", "cpus": os.cpu_count() or 1}]

    def alive(self, proc: Any) -> bool:
        return bool(proc.alive())

    def spawn(self, key: str, module: str, payload: Any, fds: tuple[int, ...] = ()) -> Any:
        raise RuntimeError("the memory backend runs no proxy processes; fleet.testing drives "
                           "the HTTP proxy's app in process")

    async def shutdown(self) -> None:
        for proc in list(self.procs.values()):
            self.terminate(proc)
        for proc in list(self.procs.values()):
            await self.stop_replica(proc, 5.0)
        self.procs.clear()

    def publish(self, info: dict[str, Any]) -> str | None:
        """Nothing to do: the instance file on this machine is how others find it."""
        return None

    def kill_all(self) -> None:
        """Nothing to do: the tasks end with the instance's loop."""

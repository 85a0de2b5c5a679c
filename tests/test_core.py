"""The core runtime: deployments, binding, handles, replicas in real processes."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import threading
import time

import pytest

import fleet

# -- deployments used by the tests (module level so replicas import them by name) ----


@fleet.deployment(num_replicas=2)
class Adder:
    def __init__(self, increment: int):
        self.increment = increment

    def __call__(self, x: int) -> int:
        return x + self.increment

    async def twice(self, x: int) -> int:
        return 2 * (x + self.increment)

    def pid(self) -> int:
        return os.getpid()


@fleet.deployment
class Ensemble:
    def __init__(self, a: fleet.DeploymentHandle, b: fleet.DeploymentHandle):
        self.a, self.b = a, b

    async def __call__(self, x: int) -> int:
        return await self.a.remote(x) + await self.b.remote(x)


@fleet.deployment
def double(x: int) -> int:
    return 2 * x


@fleet.deployment(name="tripler", num_replicas=1)
def triple(x: int, factor: int = 3) -> int:
    return factor * x


@fleet.deployment
class Nested:
    def __init__(self, handles: list, by_name: dict, pair: tuple):
        self.handles, self.by_name, self.pair = handles, by_name, pair

    async def __call__(self, x: int) -> list:
        out = [await h.remote(x) for h in self.handles]
        out.append(await self.by_name["d"].remote(x))
        out.append(await self.pair[0].remote(x))
        return out

    def kinds(self) -> list:
        return [type(h).__name__ for h in self.handles] + [type(self.pair[1]).__name__]


@fleet.deployment(max_ongoing_requests=20)
class Sleeper:
    def __init__(self) -> None:
        self.active = 0
        self.peak = 0

    async def nap(self, seconds: float) -> float:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.active -= 1
        return seconds

    def block(self, seconds: float) -> str:
        time.sleep(seconds)
        return "blocked"

    async def ping(self) -> str:
        return "pong"

    def get_peak(self) -> int:
        return self.peak

    def unrebuildable(self) -> Unrebuildable:
        return Unrebuildable()


@fleet.deployment
class Streamer:
    def count(self, n: int):
        yield from range(n)

    async def acount(self, n: int):
        for i in range(n):
            await asyncio.sleep(0)
            yield f"item{i}"


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")
        self.lock = threading.Lock()


@fleet.deployment
class Faulty:
    def fail(self, message: str) -> None:
        raise KeyError(message)

    def fail_unpicklable(self) -> None:
        raise Unpicklable(1, 2)

    def give_lock(self):
        return threading.Lock()

    def take(self, value) -> str:
        return type(value).__name__

    def ok(self) -> str:
        return "ok"


@fleet.deployment
class BrokenInit:
    def __init__(self) -> None:
        raise RuntimeError("the model file is missing")


@fleet.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Narrow:
    async def __call__(self, gate: float) -> str:
        await asyncio.sleep(gate)
        return "done"


@fleet.deployment(num_replicas=2, max_ongoing_requests=5)
class Victim:
    async def hang(self) -> None:
        await asyncio.sleep(60)

    def pid(self) -> int:
        return os.getpid()


@fleet.deployment(max_ongoing_requests=3)
class Counter:
    def __init__(self) -> None:
        self.active = 0
        self.peak = 0

    async def __call__(self) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.02)
        self.active -= 1
        return self.peak


@fleet.deployment
class Caller:
    def __init__(self, target: fleet.DeploymentHandle) -> None:
        self.target = target

    def sync_call(self, x: int) -> int:
        # a handle used from a sync method's worker thread
        return self.target.remote(x).result()

    async def chained(self, x: int) -> int:
        first = self.target.remote(x)
        return await self.target.remote(first)


class Unrebuildable:
    """Pickles in the replica, but unpickling it raises (as a class missing on the
    caller's side would)."""

    def __reduce__(self):
        return (_refuse_to_rebuild, ())


def _refuse_to_rebuild():
    raise RuntimeError("this value cannot be rebuilt here")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ of this exception fails")


@fleet.deployment(max_ongoing_requests=1)
class EdgeCases:
    """One call at a time: a call that never answers, or a slot never given back,
    would make the next call wait forever."""

    def __init__(self) -> None:
        self.closed = 0

    def stop_iteration(self) -> None:
        next(iter([]))      # a user bug: StopIteration out of a plain function

    def unprintable(self) -> None:
        raise Unprintable()

    async def endless(self):
        i = 0
        try:
            while True:
                yield i
                i += 1
                await asyncio.sleep(0)
        finally:
            self.closed += 1

    def endless_sync(self):
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            self.closed += 1

    def closed_streams(self) -> int:
        return self.closed

    async def ok(self) -> str:
        return "ok"


@fleet.deployment
class Blocker:
    async def work(self, seconds: float) -> float:
        time.sleep(seconds)        # CPU-style work that blocks the replica's loop
        return time.time()


@fleet.deployment
class Pair:
    def __init__(self, blocker: fleet.DeploymentHandle) -> None:
        self.blocker = blocker

    async def __call__(self) -> tuple[float, float]:
        await self.blocker.work.remote(0.01)     # the replica learns the method is slow
        # both frames leave in one write; a second apart, so a caller slowed by a loaded
        # machine still receives the first reply before the second call ends
        first = self.blocker.work.remote(1.0)
        second = self.blocker.work.remote(1.0)
        await first
        first_received = time.time()
        second_done = await second
        return first_received, second_done


# -- tests ------------------------------------------------------------------------


def wait_until(cond, timeout: float = 10.0) -> None:
    """Poll a condition on state fleet updates from another thread, with a deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def router_of(key: str):
    routers = fleet._runtime.current().routers
    wait_until(lambda: key in routers)
    return routers[key]



@pytest.mark.both_backends
def test_issue_example_composes_handles_across_processes(instance):
    app = Ensemble.bind(Adder.bind(1), Adder.options(name="Adder2").bind(2))
    handle = fleet.run(app)
    assert handle.remote(1).result() == 5
    st = fleet.status()["applications"]["default"]
    assert st["status"] == "RUNNING"
    assert set(st["deployments"]) == {"Ensemble", "Adder", "Adder2"}
    adders = st["deployments"]["Adder"]["replicas"]
    assert len(adders) == 2 and all(r["state"] == "RUNNING" for r in adders)
    for dep in st["deployments"].values():      # each with a state and a message
        assert dep["status"] == "HEALTHY" and dep["message"] == ""
        assert all(r["message"] == "" for r in dep["replicas"])
    assert os.getpid() not in {r["pid"] for r in adders}


@pytest.mark.both_backends
def test_other_methods_via_attribute_and_options(instance):
    fleet.run(Adder.bind(10), name="adder", route_prefix="/adder")
    h = fleet.get_deployment_handle("Adder", "adder")
    assert h.twice.remote(1).result() == 22
    assert h.options(method_name="twice").remote(2).result() == 24
    assert fleet.get_app_handle("adder").remote(5).result() == 15


def test_function_deployments_with_and_without_options(memory_instance):
    assert fleet.run(double.bind(), name="d", route_prefix="/d").remote(4).result() == 8
    h = fleet.run(triple.bind(factor=5), name="t", route_prefix="/t")
    assert h.remote(2).result() == 10
    assert "tripler" in fleet.status()["applications"]["t"]["deployments"]


def test_nested_bound_deployments_arrive_as_handles(memory_instance):
    app = Nested.bind([double.bind(), Adder.bind(1)], {"d": triple.bind()},
                      (Adder.options(name="A3").bind(3), double.options(name="d2").bind()))
    h = fleet.run(app)
    assert h.remote(2).result() == [4, 3, 6, 5]
    assert h.kinds.remote().result() == ["DeploymentHandle"] * 3


def test_response_passed_as_argument_is_resolved(memory_instance):
    h = fleet.run(Adder.bind(1))
    assert h.remote(h.remote(1)).result() == 3
    caller = fleet.run(Caller.bind(Adder.bind(100)), name="c", route_prefix="/c")
    assert caller.chained.remote(1).result() == 201


def test_handles_from_threads_from_sync_replica_code_and_pickled(memory_instance):
    h = fleet.run(Caller.bind(Adder.bind(1)))
    assert h.sync_call.remote(1).result() == 2
    results: list[int] = []

    def worker(i: int) -> None:
        results.append(h.sync_call.remote(i).result())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [i + 1 for i in range(8)]
    clone = pickle.loads(pickle.dumps(h))
    assert clone.sync_call.remote(41).result() == 42


def test_handles_in_async_driver_code(memory_instance):
    h = fleet.run(Adder.bind(1))

    async def main() -> list[int]:
        return list(await asyncio.gather(*[h.remote(i) for i in range(20)]))

    assert asyncio.run(main()) == [i + 1 for i in range(20)]


def test_async_methods_run_concurrently(memory_instance):
    h = fleet.run(Sleeper.bind())
    h.ping.remote().result()
    responses = [h.nap.remote(0.5) for _ in range(10)]
    assert [r.result() for r in responses] == [0.5] * 10
    # all ten were running at once (a bound on the elapsed time would be the machine's
    # speed, not fleet's)
    assert h.get_peak.remote().result() == 10


def test_sync_methods_do_not_block_the_replica_loop(memory_instance):
    h = fleet.run(Sleeper.bind())
    blocked = h.block.remote(3.0)
    assert h.ping.remote().result() == "pong"
    # answered while the sync method still runs: a blocked loop would answer after it
    assert not blocked._cfut.done()
    assert blocked.result() == "blocked"


def test_streaming_sync_and_async_generators(memory_instance):
    h = fleet.run(Streamer.bind())
    assert list(h.options(stream=True).count.remote(4)) == [0, 1, 2, 3]

    async def consume() -> list[str]:
        return [x async for x in h.options(stream=True, method_name="acount").remote(3)]

    assert asyncio.run(consume()) == ["item0", "item1", "item2"]
    with pytest.raises(TypeError, match="stream=True"):
        h.count.remote(2).result()


def test_router_never_exceeds_max_ongoing_requests(memory_instance):
    h = fleet.run(Counter.bind())
    peaks = [r.result() for r in [h.remote() for _ in range(30)]]
    assert max(peaks) <= 3
    assert max(peaks) == 3


def test_back_pressure_past_max_queued_requests(memory_instance):
    h = fleet.run(Narrow.bind())
    running = h.remote(1.0)   # occupies the only slot
    router = router_of("default#Narrow")
    wait_until(lambda: router.slots[0].inflight == 1)
    queued = h.remote(0.0)    # waits in the caller's queue
    wait_until(lambda: len(router.queue) == 1)
    with pytest.raises(fleet.BackPressureError, match="max_queued_requests=1"):
        h.remote(0.0).result()
    assert running.result() == "done"
    assert queued.result() == "done"


@pytest.mark.both_backends
def test_user_exception_keeps_its_type_and_remote_traceback(instance):
    h = fleet.run(Faulty.bind())
    with pytest.raises(KeyError, match="no such key") as info:
        h.fail.remote("no such key").result()
    assert isinstance(info.value.__cause__, fleet.exceptions.RemoteTraceback)
    assert "in fail of deployment 'Faulty'" in str(info.value.__cause__)
    assert "raise KeyError(message)" in str(info.value.__cause__)
    with pytest.raises(fleet.ReplicaError, match="Unpicklable: 1/2"):
        h.fail_unpicklable.remote().result()
    assert h.ok.remote().result() == "ok"


def test_unpicklable_arguments_and_results_name_the_type(memory_instance):
    h = fleet.run(Faulty.bind())
    with pytest.raises(TypeError, match="_thread.lock"):
        h.take.remote(threading.Lock()).result()
    with pytest.raises(TypeError, match="result could not be sent back.*lock"):
        h.give_lock.remote().result()
    assert h.ok.remote().result() == "ok"


def test_missing_method_names_deployment_and_method(memory_instance):
    h = fleet.run(Faulty.bind())
    with pytest.raises(fleet.MethodNotFoundError, match="'Faulty' has no method 'nope'"):
        h.nope.remote().result()
    with pytest.raises(AttributeError):
        h.options(method_name="missing").remote().result()


@pytest.mark.both_backends
def test_constructor_failure_raises_deployment_failed_error(instance):
    with pytest.raises(fleet.DeploymentFailedError) as info:
        fleet.run(BrokenInit.bind(), name="broken", route_prefix="/broken")
    err = info.value
    assert "RuntimeError" in str(err) and "the model file is missing" in str(err)
    assert err.deployment == "BrokenInit" and err.error_type == "RuntimeError"
    assert "raise RuntimeError" in err.remote_traceback
    st = fleet.status()["applications"]["broken"]
    assert st["status"] == "DEPLOY_FAILED"
    dep = st["deployments"]["BrokenInit"]
    assert dep["status"] == "DEPLOY_FAILED"
    assert "the model file is missing" in dep["message"]
    # it does not keep retrying: no replica is left starting
    deadline = time.monotonic() + 15
    while fleet.status()["applications"]["broken"]["deployments"]["BrokenInit"]["replicas"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.both_backends
def test_killed_replica_fails_its_calls_fast_and_is_replaced(instance):
    h = fleet.run(Victim.bind())
    pids = {r["pid"] for r in
            fleet.status()["applications"]["default"]["deployments"]["Victim"]["replicas"]}
    assert len(pids) == 2
    hanging = [h.hang.remote() for _ in range(6)]
    router = router_of("default#Victim")
    wait_until(lambda: sum(s.inflight for s in router.slots) == 6)
    reps = fleet.status()["applications"]["default"]["deployments"]["Victim"]["replicas"]
    victim_id, victim = reps[0]["replica_id"], reps[0]["pid"]
    on_victim = next(s.inflight for s in router.slots if s.replica_id == victim_id)
    assert on_victim >= 1
    os.kill(victim, signal.SIGKILL)
    # exactly the calls the victim held fail (they would hang for ever were its death not
    # noticed); the others still run
    wait_until(lambda: sum(r._cfut.done() for r in hanging) == on_victim, timeout=15.0)
    for resp in hanging:
        if resp._cfut.done():
            with pytest.raises(fleet.ReplicaDiedError,
                               match=f"replica {victim_id} of deployment 'Victim' "
                                     r"\(application 'default'\) died"):
                resp.result()
    assert sum(not r._cfut.done() for r in hanging) == 6 - on_victim
    # new calls go to the live replica
    assert all(h.pid.remote().result() != victim for _ in range(10))
    deadline = time.monotonic() + 20
    while True:
        reps = fleet.status()["applications"]["default"]["deployments"]["Victim"]["replicas"]
        running = {r["pid"] for r in reps if r["state"] == "RUNNING"}
        if len(running) == 2 and victim not in running:
            break
        assert time.monotonic() < deadline, reps
        time.sleep(0.05)
    for resp in hanging:
        resp.cancel()


def test_redeploy_keeps_unchanged_deployments_and_replaces_changed(memory_instance):
    fleet.run(Ensemble.bind(Adder.bind(1), Adder.options(name="Adder2").bind(2)))

    def pids(name: str) -> set[str]:
        reps = fleet.status()["applications"]["default"]["deployments"][name]["replicas"]
        return {r["replica_id"] for r in reps}

    before_a, before_b = pids("Adder"), pids("Adder2")
    h = fleet.run(Ensemble.bind(Adder.bind(1), Adder.options(name="Adder2").bind(5)))
    assert h.remote(1).result() == 2 + 6
    assert pids("Adder") == before_a
    deadline = time.monotonic() + 10
    while pids("Adder2") & before_b:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_delete_removes_application(memory_instance):
    fleet.run(double.bind(), name="gone", route_prefix="/gone")
    fleet.delete("gone")
    assert "gone" not in fleet.status()["applications"]
    with pytest.raises(fleet.FleetError, match="no application named 'gone'"):
        fleet.get_app_handle("gone")


def test_unknown_app_or_deployment_handle_errors(memory_instance):
    fleet.run(double.bind())
    with pytest.raises(fleet.FleetError, match="no deployment 'nope'"):
        fleet.get_deployment_handle("nope")
    with pytest.raises(fleet.FleetError, match="no application named 'x'"):
        fleet.DeploymentHandle("double", "x").remote(1).result()


def test_shutdown_leaves_no_process_behind():
    import psutil
    fleet.shutdown()
    # processes this session ran before (a Ray cluster of the Ray tests) are not fleet's
    before = set(psutil.Process().children(recursive=True))
    fleet.start(http_options={"port": 0})
    fleet.run(Adder.bind(1))
    children = [p for p in psutil.Process().children(recursive=True) if p not in before]
    assert len(children) >= 3       # proxy and two replicas
    fleet.shutdown()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive


def test_stop_iteration_from_a_sync_method_reaches_the_caller(memory_instance):
    h = fleet.run(EdgeCases.bind())
    with pytest.raises(RuntimeError, match="StopIteration") as info:
        h.stop_iteration.remote().result(timeout_s=5)
    assert "next(iter([]))" in str(info.value.__cause__)
    assert h.ok.remote().result(timeout_s=5) == "ok"


def test_result_the_caller_cannot_rebuild_fails_only_that_call(memory_instance):
    h = fleet.run(Sleeper.bind())
    napping = h.nap.remote(0.3)     # in flight on the same connection meanwhile
    router = router_of("default#Sleeper")
    wait_until(lambda: router.slots[0].inflight == 1)
    with pytest.raises(fleet.FleetError, match="could not be deserialized.*cannot be rebuilt"):
        h.unrebuildable.remote().result(timeout_s=5)
    assert napping.result(timeout_s=5) == 0.3
    assert h.ping.remote().result(timeout_s=5) == "pong"


def test_exception_whose_str_fails_still_reaches_the_caller(memory_instance):
    h = fleet.run(EdgeCases.bind())
    with pytest.raises(Exception) as info:
        h.unprintable.remote().result(timeout_s=5)
    assert type(info.value).__name__ == "Unprintable"
    assert "raise Unprintable()" in str(info.value.__cause__)
    assert h.ok.remote().result(timeout_s=5) == "ok"


def test_leaving_a_stream_early_cancels_it_and_frees_the_replica(memory_instance):
    h = fleet.run(EdgeCases.bind())
    for method in ("endless", "endless_sync", "endless"):
        for i, _ in enumerate(h.options(stream=True, method_name=method).remote()):
            if i == 2:
                break

    async def leave_async_for() -> None:
        async for i in h.options(stream=True).endless.remote():
            if i == 2:
                break

    asyncio.run(leave_async_for())
    # max_ongoing_requests=1: a stream still holding the replica would block this call
    wait_until(lambda: h.closed_streams.remote().result(timeout_s=5) == 4)


def test_result_timeout_names_the_call_which_goes_on(memory_instance):
    h = fleet.run(Sleeper.bind())
    resp = h.nap.remote(0.5)
    with pytest.raises(fleet.RequestTimeoutError,
                       match=r"Sleeper\.nap \(application 'default'\).*timeout_s=0\.05"):
        resp.result(timeout_s=0.05)
    assert resp.result(timeout_s=5) == 0.5


def test_shutdown_finishes_running_calls_and_fails_waiting_ones(memory_instance):
    h = fleet.run(Narrow.bind())
    running = h.remote(0.5)
    router = router_of("default#Narrow")
    wait_until(lambda: router.slots[0].inflight == 1)
    queued = h.remote(0.0)
    wait_until(lambda: len(router.queue) == 1)
    fleet.shutdown()
    assert running.result(timeout_s=5) == "done"      # drained
    with pytest.raises(fleet.FleetError, match="shut down before this call reached"):
        queued.result(timeout_s=5)


BLOCKING_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import fleet
from examples.quickstart import app
fleet.start(http_options={{"port": 0}})
print(fleet.status()["proxies"]["http"]["port"], flush=True)
fleet.run(app, blocking=True)
print("returned after shutdown", flush=True)
"""


def test_run_blocking_serves_until_sigterm_then_shuts_down():
    import subprocess
    import sys

    import httpx
    import psutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_SCRIPT.format(root=root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        port = int(proc.stdout.readline())
        # fleet.run does not return: it says on stderr once every replica is ready (a
        # signal before that interrupts the start instead)
        for line in proc.stderr:
            if "RUNNING at" in line:
                break
        r = httpx.get(f"http://127.0.0.1:{port}/?x=1")
        assert r.json() == {"x": 1, "total": 5}
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stdout.read() == "returned after shutdown\n"
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_reply_is_not_held_behind_the_next_blocking_call(instance):
    h = fleet.run(Pair.bind(Blocker.bind()))
    first_received, second_done = h.remote().result()
    assert first_received < second_done

"""Applications the CLI tests run with `fleet run`."""

from __future__ import annotations

import fleet


@fleet.deployment
class Hello:
    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def __call__(self, request) -> str:
        return f"{self.greeting} from fleet"


@fleet.deployment
class Broken:
    def __init__(self) -> None:
        raise ValueError("weights not found at /models/x.bin")


@fleet.deployment
class Env:
    """Answers with the value of the environment variable the request's path names."""

    def __call__(self, request) -> str:
        import os
        return os.environ.get(request.url.path.rsplit("/", 1)[-1], "unset")


app = Hello.bind()
env = Env.bind()
broken = Broken.bind()
not_an_app = Hello
number = 42


def build(args: dict) -> fleet.Application:
    return Hello.bind(args.get("greeting", "hi"))


def make() -> fleet.Application:
    return Hello.bind("made")


def failing_build(args: dict) -> fleet.Application:
    raise RuntimeError("no model configured")


@fleet.deployment(num_replicas=2)
class BrokenTwice:
    """With FLEET_TEST_BARRIER (a directory) set, each replica waits there for the other
    before it raises, so both fail together however unevenly a loaded machine starts
    them (the error then counts both)."""

    def __init__(self) -> None:
        import os
        import time
        barrier = os.environ.get("FLEET_TEST_BARRIER")
        if barrier:
            open(os.path.join(barrier, str(os.getpid())), "w").close()
            deadline = time.monotonic() + 60
            while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        raise ValueError("weights not found at /models/y.bin")


broken_twice = BrokenTwice.bind()


@fleet.deployment
class Gated:
    """Its constructor runs until the file named by FLEET_TEST_GATE exists."""

    def __init__(self) -> None:
        import os
        import time
        gate = os.environ["FLEET_TEST_GATE"]
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)

    def __call__(self, request) -> str:
        return "opened"


gated = Gated.bind()


@fleet.deployment
class Failing:
    def __call__(self, request) -> str:
        raise KeyError("row 42 of the secret table")


failing = Failing.bind()


@fleet.deployment
class Hanging:
    """A constructor that never returns and ignores SIGTERM; it writes its pid to the
    file named by FLEET_TEST_PIDFILE first, so tests know when it hangs."""

    def __init__(self) -> None:
        import os
        import signal
        import time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        path = os.environ.get("FLEET_TEST_PIDFILE")
        if path:
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(path + ".tmp", path)
        while True:
            time.sleep(1)


hanging = Hanging.options(startup_timeout_s=1).bind()
hanging_long = Hanging.bind()

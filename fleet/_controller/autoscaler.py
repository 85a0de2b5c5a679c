"""The autoscaler: a deployment's replica count from the in-flight and queued calls
its callers report.

Every caller (proxy, driver, replica holding a handle) reports its in-flight plus
queued calls to an autoscaling deployment about twice a second. The load is the sum over
callers of each caller's mean over ``look_back_period_s``; the wanted count is
``ceil(load / target_ongoing_requests)`` within ``[min_replicas, max_replicas]``. A
change is applied once it has been wanted for ``upscale_delay_s`` (more replicas) or
``downscale_delay_s`` (fewer), except that a deployment at zero replicas with a call
waiting scales up at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

from fleet._config import AutoscalingConfig

log = logging.getLogger("fleet.autoscaler")

MAX_LOG = 50


class Autoscaler:
    """Decides a deployment's replica count; the controller applies it."""

    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config
        self.samples: dict[str, deque[tuple[float, int]]] = {}
        self._up_since: float | None = None
        self._down_since: float | None = None

    def record(self, caller: str, load: int, now: float) -> None:
        """One caller's in-flight plus queued calls at time now."""
        window = self.samples.setdefault(caller, deque())
        window.append((now, load))
        cutoff = now - self.config.look_back_period_s
        while window and window[0][0] < cutoff:
            window.popleft()

    def latest(self) -> int:
        """The sum of every caller's latest report (for waking a deployment at zero)."""
        return sum(w[-1][1] for w in self.samples.values() if w)

    def load(self, now: float) -> float:
        """The summed mean load over the look-back window."""
        cutoff = now - self.config.look_back_period_s
        total = 0.0
        for caller, window in list(self.samples.items()):
            while window and window[0][0] < cutoff:
                window.popleft()
            if not window:
                del self.samples[caller]
                continue
            total += sum(v for _, v in window) / len(window)
        return total

    def desired(self, now: float) -> int:
        cfg = self.config
        want = math.ceil(self.load(now) / cfg.target_ongoing_requests - 1e-9)
        return max(cfg.min_replicas, min(cfg.max_replicas, want))

    def describe(self, now: float) -> dict[str, Any]:
        """The autoscaler's view, for status."""
        cfg = self.config
        return {"load": round(self.load(now), 2), "desired_replicas": self.desired(now),
                "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
                "callers": len(self.samples)}

    def clamp(self, target: int) -> int:
        return max(self.config.min_replicas, min(self.config.max_replicas, target))

    def tick(self, controller: Any, dep: Any, now: float) -> None:
        """Change dep.target once the new count was wanted for the configured delay."""
        cfg = self.config
        want = self.desired(now)
        if want > dep.target:
            self._down_since = None
            if self._up_since is None:
                self._up_since = now
            delay = 0.0 if dep.target == 0 else cfg.upscale_delay_s
            since = self._up_since
        elif want < dep.target:
            self._up_since = None
            if self._down_since is None:
                self._down_since = now
            delay = cfg.downscale_delay_s
            since = self._down_since
        else:
            self._up_since = self._down_since = None
            return
        if now - since < delay:
            return
        load = self.load(now)
        why = (f"load {load:.2f} (in-flight and queued calls, mean over "
               f"{cfg.look_back_period_s:g}s) / target_ongoing_requests "
               f"{cfg.target_ongoing_requests:g} wants {want}")
        if want == cfg.min_replicas and want > math.ceil(load / cfg.target_ongoing_requests):
            why += f" (min_replicas={cfg.min_replicas})"
        elif want == cfg.max_replicas:
            why += f" (max_replicas={cfg.max_replicas})"
        if delay:
            why += f"; wanted for {now - since:.1f}s >= " + (
                f"upscale_delay_s={cfg.upscale_delay_s:g}" if want > dep.target
                else f"downscale_delay_s={cfg.downscale_delay_s:g}")
        elif dep.target == 0:
            why += "; a call is waiting on a deployment scaled to zero"
        entry = {"time": time.time(), "from": dep.target, "to": want, "reason": why}
        log.info("scaling %s/%s from %d to %d replicas: %s", dep.app, dep.name, dep.target,
                 want, why)
        dep.scaling_log.append(entry)
        del dep.scaling_log[:-MAX_LOG]
        dep.target = want
        self._up_since = self._down_since = None

"""The autoscaler: replicas from the in-flight and queued calls callers report."""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

from fleet._config import AutoscalingConfig

log = logging.getLogger("fleet.autoscaler")


class Autoscaler:
    """Decides a deployment's replica count; the controller applies it."""

    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config
        self.samples: dict[str, deque[tuple[float, int]]] = {}
        self._want_since: tuple[int, float] | None = None

    def record(self, caller: str, load: int, now: float) -> None:
        """One caller's in-flight plus queued calls at time now."""
        window = self.samples.setdefault(caller, deque())
        window.append((now, load))
        cutoff = now - self.config.look_back_period_s
        while window and window[0][0] < cutoff:
            window.popleft()

    def load(self, now: float) -> float:
        """Average total load over the look-back window."""
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
        want = math.ceil(self.load(now) / cfg.target_ongoing_requests)
        return max(cfg.min_replicas, min(cfg.max_replicas, want))

    def tick(self, controller: Any, dep: Any, now: float) -> None:
        """Change dep.target once a new count was wanted for the configured delay."""
        want = self.desired(now)
        if want == dep.target:
            self._want_since = None
            return
        if dep.target == 0 and want > 0:
            delay = 0.0     # a call is waiting on a deployment scaled to zero
        else:
            delay = self.config.upscale_delay_s if want > dep.target \
                else self.config.downscale_delay_s
        if self._want_since is None or self._want_since[0] != want:
            self._want_since = (want, now)
        if now - self._want_since[1] >= delay:
            reason = (f"scaling {dep.app}/{dep.name} from {dep.target} to {want} replicas: "
                      f"load {self.load(now):.1f} over {self.config.look_back_period_s}s, target "
                      f"{self.config.target_ongoing_requests} per replica")
            log.info(reason)
            dep.scaling_log.append(reason)
            dep.target = want
            self._want_since = None

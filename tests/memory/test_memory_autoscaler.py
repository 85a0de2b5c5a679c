"""The autoscaler's decisions on their own: load reports in, replica counts out, on a
clock the test sets (no replicas, no waiting)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet._config import AutoscalingConfig
from fleet._controller.autoscaler import MAX_LOG, Autoscaler


@dataclass
class Dep:
    """What Autoscaler.tick reads and writes of a deployment."""

    target: int
    app: str = "app"
    name: str = "Model"
    scaling_log: list[dict[str, Any]] = field(default_factory=list)


def scaler(**options: Any) -> Autoscaler:
    base = {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 2,
            "upscale_delay_s": 3, "downscale_delay_s": 10, "look_back_period_s": 5}
    return Autoscaler(AutoscalingConfig(**{**base, **options}))


def test_desired_is_the_load_over_the_target_within_the_bounds() -> None:
    a = scaler()
    a.record("proxy", 5, now=0)
    assert a.desired(now=0) == 3                 # ceil(5 / 2)
    a.record("driver", 20, now=0)
    assert a.desired(now=0) == 5                 # max_replicas
    b = scaler()
    assert b.desired(now=0) == 1                 # min_replicas with no load at all


def test_load_is_the_sum_over_callers_of_each_ones_mean_over_the_window() -> None:
    a = scaler(look_back_period_s=5)
    for t, load in ((0, 2), (1, 4), (2, 6)):
        a.record("proxy", load, now=t)
    a.record("driver", 3, now=1)
    assert a.load(now=2) == 4 + 3
    # reports older than the look-back window no longer count; a silent caller goes
    assert a.load(now=6.5) == 6
    assert a.load(now=100) == 0 and a.samples == {}


def test_scaling_up_waits_for_upscale_delay() -> None:
    a, dep = scaler(upscale_delay_s=3, look_back_period_s=100), Dep(target=1)
    a.record("proxy", 8, now=0)
    a.tick(None, dep, now=0)
    a.tick(None, dep, now=2.9)
    assert dep.target == 1 and dep.scaling_log == []
    a.tick(None, dep, now=3)
    assert dep.target == 4
    entry = dep.scaling_log[-1]
    assert (entry["from"], entry["to"]) == (1, 4)
    assert "wants 4" in entry["reason"] and "upscale_delay_s=3" in entry["reason"]


def test_scaling_down_waits_for_downscale_delay_and_a_blip_resets_it() -> None:
    a, dep = scaler(downscale_delay_s=10, look_back_period_s=1), Dep(target=3)
    a.record("proxy", 2, now=0)
    a.tick(None, dep, now=0)                      # wants 1
    a.record("proxy", 6, now=5)
    a.tick(None, dep, now=5)                      # wants 3 again: the wait starts over
    a.record("proxy", 2, now=6.5)
    a.tick(None, dep, now=6.5)
    a.tick(None, dep, now=15)
    assert dep.target == 3
    a.tick(None, dep, now=16.5)
    assert dep.target == 1
    assert "downscale_delay_s=10" in dep.scaling_log[-1]["reason"]
    assert "(min_replicas=1)" in dep.scaling_log[-1]["reason"]


def test_a_call_waiting_on_zero_replicas_scales_up_at_once() -> None:
    a, dep = scaler(min_replicas=0, upscale_delay_s=60), Dep(target=0)
    a.record("proxy", 1, now=0)
    a.tick(None, dep, now=0)
    assert dep.target == 1
    assert "scaled to zero" in dep.scaling_log[-1]["reason"]


def test_the_scaling_log_is_bounded() -> None:
    a, dep = scaler(upscale_delay_s=0, downscale_delay_s=0, look_back_period_s=0.5), Dep(1)
    for i in range(3 * MAX_LOG):
        a.record("proxy", 10 if i % 2 == 0 else 0, now=i)
        a.tick(None, dep, now=i)
    assert len(dep.scaling_log) == MAX_LOG
    assert dep.target == 1                        # the last tick saw no load

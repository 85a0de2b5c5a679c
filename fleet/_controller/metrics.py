"""The controller's metrics store: every process's figures merged, their history, and
the readings made of them (Prometheus text, time series, a window's rates and
percentiles).

Processes send what they counted each second (``metrics`` control messages, see
``fleet/_metrics.py``); counters and histograms are added up here, gauges are kept per
sending process and summed (a process that disconnects takes its gauges with it).
Once a second the store samples every series into two rings: 1 s resolution for
15 minutes, and every tenth sample for 24 hours. Each series' ring is a flat array of
doubles filled as time passes, so a series costs at most 900 + 8640 doubles (76 KiB),
and the store holds at most MAX_SERIES series (new ones past that are not kept, and
the store says so once in the log).
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("fleet.controller")

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]

FINE_STEP_S, FINE_SIZE = 1.0, 900            # 15 minutes
COARSE_STEP_S, COARSE_SIZE = 10.0, 8640      # 24 hours
MAX_SERIES = 2000
NAN = float("nan")

# name -> (type, help): fleet's metrics, as /metrics describes them.
METRICS: dict[str, tuple[str, str]] = {
    "fleet_http_requests_total": ("counter", "HTTP requests answered by the proxies"),
    "fleet_grpc_requests_total": ("counter", "gRPC calls answered by the proxies"),
    "fleet_http_request_duration_seconds": (
        "histogram", "Time from a request's arrival at the HTTP proxy to its response"),
    "fleet_grpc_request_duration_seconds": (
        "histogram", "Time from a call's arrival at the gRPC proxy to its answer"),
    "fleet_replica_processing_seconds": (
        "histogram", "Time a replica spent running a call (queue time apart)"),
    "fleet_replica_queue_seconds": (
        "histogram", "Time a call waited in its replica between arrival and start"),
    "fleet_replica_requests_total": ("counter", "Calls a replica finished"),
    "fleet_replica_errors_total": ("counter", "Calls a replica finished with an exception"),
    "fleet_ongoing_requests": ("gauge", "Calls running in a replica now"),
    "fleet_queued_requests": ("gauge", "Calls waiting in callers' queues for a replica"),
    "fleet_replicas": ("gauge", "Replicas of a deployment, by state"),
    "fleet_replica_starts_total": ("counter", "Replica processes started"),
    "fleet_replica_failures_total": (
        "counter", "Replicas that failed: constructor raised, exited or timed out"),
    "fleet_health_check_failures_total": ("counter", "Failed or late health checks"),
    "fleet_autoscaling_target_replicas": (
        "gauge", "The replica count a deployment converges to now"),
    "fleet_autoscaling_desired_replicas": (
        "gauge", "The autoscaler's latest wish before its delays"),
    "fleet_batch_size": ("histogram", "Calls per batch a batched method ran"),
    "fleet_batch_wait_seconds": ("histogram", "Time a batch's oldest call waited for it"),
    "fleet_handle_requests_total": ("counter", "Calls made through deployment handles"),
}


class Tier:
    """Samples at one resolution: a ring of times and one aligned ring per series."""

    def __init__(self, step: float, size: int) -> None:
        self.step = step
        self.size = size
        self.times = array("d")
        self.cols: dict[Key, array[float]] = {}
        self.pos = 0            # the oldest slot once the ring is full

    def add(self, t: float, values: dict[Key, float]) -> None:
        n = len(self.times)
        if n < self.size:
            self.times.append(t)
            for key, value in values.items():
                col = self.cols.get(key)
                if col is None:
                    col = self.cols[key] = array("d", [NAN] * n)
                col.append(value)
            for col in self.cols.values():
                if len(col) == n:
                    col.append(NAN)
            return
        i = self.pos
        self.times[i] = t
        for key, col in self.cols.items():
            col[i] = values.get(key, NAN)
        for key, value in values.items():
            if key not in self.cols:
                col = self.cols[key] = array("d", [NAN] * self.size)
                col[i] = value
        self.pos = (i + 1) % self.size

    def order(self, since: float) -> list[int]:
        """Slot indexes of samples at or after since, oldest first."""
        n = len(self.times)
        idx = list(range(self.pos, n)) + list(range(0, self.pos)) if n == self.size \
            else list(range(n))
        return [i for i in idx if self.times[i] >= since]

    def forget(self, keep: Iterable[Key]) -> None:
        """Drop series with no value in the ring (gone processes' gauges)."""
        alive = set(keep)
        for key in [k for k, col in self.cols.items()
                    if k not in alive and all(math.isnan(v) for v in col)]:
            del self.cols[key]


class Store:
    """Merged figures of every process of one instance, and their history."""

    def __init__(self) -> None:
        self.counters: dict[Key, float] = {}
        self.hists: dict[Key, list[float]] = {}
        self.buckets: dict[str, tuple[float, ...]] = {}
        self.gauges: dict[str, dict[Key, float]] = {}      # source -> its gauges
        self.own: dict[Key, float] = {}                     # the controller's gauges
        self.fine = Tier(FINE_STEP_S, FINE_SIZE)
        self.coarse = Tier(COARSE_STEP_S, COARSE_SIZE)
        self._samples = 0
        self._full_warned = False

    # -- input ----------------------------------------------------------------------
    def _room(self, key: Key, table: dict[Key, Any]) -> bool:
        if key in table:
            return True
        if len(self.counters) + len(self.hists) < MAX_SERIES:
            return True
        if not self._full_warned:
            self._full_warned = True
            log.warning("the metrics store holds %d series, its limit: new series are not "
                        "kept (too many replicas, routes or label values?)", MAX_SERIES)
        return False

    def inc(self, name: str, labels: Labels, n: float = 1) -> None:
        key = (name, labels)
        if self._room(key, self.counters):
            self.counters[key] = self.counters.get(key, 0) + n

    def merge(self, source: str, msg: Any) -> None:
        """Add one process's ``metrics`` message."""
        for name, labels, value in msg.get("counters", ()):
            self.inc(str(name), tuple(labels), float(value))
        for name, labels, cells, buckets in msg.get("hists", ()):
            key = (str(name), tuple(labels))
            have = self.hists.get(key)
            if have is None:
                if not self._room(key, self.hists):
                    continue
                self.buckets.setdefault(key[0], tuple(buckets))
                if tuple(buckets) != self.buckets[key[0]]:
                    continue
                have = self.hists[key] = [0.0] * len(cells)
            if len(have) != len(cells):
                continue
            for i, v in enumerate(cells):
                have[i] += v
        self.gauges[source] = {(str(n), tuple(lb)): float(v)
                               for n, lb, v in msg.get("gauges", ())}

    def drop(self, source: str) -> None:
        """A process is gone: its gauges no longer count."""
        self.gauges.pop(source, None)

    def forget(self, label: str, value: str) -> None:
        """Drop the counters and histograms of one label value (a replica that is gone:
        its series leave /metrics, as a stopped process' do, and make room for its
        successors'; their history stays until it ages out of the rings)."""
        pair = (label, value)
        for table in (self.counters, self.hists):
            for key in [k for k in table if pair in k[1]]:
                del table[key]

    def set_own(self, values: dict[Key, float]) -> None:
        """The controller's own gauges (replicas by state, autoscaling), all at once."""
        self.own = values

    def gauge_values(self) -> dict[Key, float]:
        out: dict[Key, float] = dict(self.own)
        for values in self.gauges.values():
            for key, v in values.items():
                out[key] = out.get(key, 0.0) + v
        return out

    # -- history ----------------------------------------------------------------------
    def flat(self) -> dict[Key, float]:
        """Every series' value now; a histogram as its _bucket (cumulative, with le),
        _sum and _count series."""
        out: dict[Key, float] = dict(self.counters)
        out.update(self.gauge_values())
        for (name, labels), cells in self.hists.items():
            total = 0.0
            for le, v in zip(self._les(name), cells[:-1], strict=False):
                total += v
                out[(name + "_bucket", labels + (("le", le),))] = total
            out[(name + "_count", labels)] = total
            out[(name + "_sum", labels)] = cells[-1]
        return out

    def sample(self, now: float | None = None) -> None:
        """Take this second's sample (the controller calls it once a second)."""
        now = time.time() if now is None else now
        values = self.flat()
        self.fine.add(now, values)
        if self._samples % int(COARSE_STEP_S / FINE_STEP_S) == 0:
            self.coarse.add(now, values)
            self.coarse.forget(values)
        self.fine.forget(values)
        self._samples += 1

    def _les(self, name: str) -> list[str]:
        return [_num(b) for b in self.buckets.get(name, ())] + ["+Inf"]

    # -- readings ---------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every metric name with a value, fleet's known ones first."""
        seen = {n for n, _ in self.counters} | {n for n, _ in self.hists} \
            | {n for n, _ in self.gauge_values()}
        return sorted(seen)

    def prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        by_name: dict[str, list[tuple[Labels, Any]]] = {}
        for (name, labels), v in self.counters.items():
            by_name.setdefault(name, []).append((labels, v))
        for (name, labels), v in self.gauge_values().items():
            by_name.setdefault(name, []).append((labels, v))
        for (name, labels), cells in self.hists.items():
            by_name.setdefault(name, []).append((labels, cells))
        for name in sorted(by_name):
            kind, help_text = METRICS.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(by_name[name], key=lambda e: e[0]):
                if isinstance(value, list):
                    total = 0.0
                    for le, v in zip(self._les(name), value[:-1], strict=False):
                        total += v
                        lines.append(f"{name}_bucket{_text(labels + (('le', le),))} "
                                     f"{_num(total)}")
                    lines.append(f"{name}_sum{_text(labels)} {_num(value[-1])}")
                    lines.append(f"{name}_count{_text(labels)} {_num(total)}")
                else:
                    lines.append(f"{name}{_text(labels)} {_num(value)}")
        return "\n".join(lines) + "\n"

    def _tier(self, window: float) -> Tier:
        return self.fine if window <= FINE_STEP_S * FINE_SIZE else self.coarse

    def series(self, name: str, match: dict[str, str], window: float = 900.0,
               rate: bool = False, quantile: float | None = None) -> dict[str, Any]:
        """The history of every series of a metric whose labels include match.

        rate: per-second increase of a counter (or of a histogram's count) between
        samples; quantile: a histogram's q-quantile of what was observed between
        samples (seconds). Points are ``[unix time, value]``; a gap is left out."""
        tier = self._tier(window)
        now = time.time()
        order = tier.order(now - window)
        kind = METRICS.get(name, ("untyped", ""))[0]
        if name in self.buckets or kind == "histogram":
            if quantile is not None:
                return {"name": name, "resolution_s": tier.step, "quantile": quantile,
                        "series": self._quantile_series(tier, order, name, match, quantile)}
            col_name = name + "_count"
        else:
            col_name = name
        out = []
        for (n, labels), col in sorted(tier.cols.items()):
            if n != col_name or not _matches(labels, match):
                continue
            points: list[list[float]] = []
            prev: tuple[float, float] | None = None
            for i in order:
                v = col[i]
                if math.isnan(v):
                    prev = None
                    continue
                t = tier.times[i]
                if rate:
                    if prev is not None and t > prev[0]:
                        points.append([round(t, 3), max(0.0, v - prev[1]) / (t - prev[0])])
                    prev = (t, v)
                else:
                    points.append([round(t, 3), v])
            out.append({"labels": dict(labels), "points": points})
        return {"name": name, "resolution_s": tier.step, "series": out}

    def _quantile_series(self, tier: Tier, order: list[int], name: str,
                         match: dict[str, str], q: float) -> list[dict[str, Any]]:
        groups: dict[Labels, dict[float, array[float]]] = {}
        for (n, labels), col in tier.cols.items():
            if n != name + "_bucket":
                continue
            base = tuple(p for p in labels if p[0] != "le")
            if not _matches(base, match):
                continue
            bound = dict(labels)["le"]
            groups.setdefault(base, {})[math.inf if bound == "+Inf" else float(bound)] = col
        out = []
        for base, cols in sorted(groups.items()):
            les = sorted(cols)
            points: list[list[float]] = []
            for a, b in zip(order, order[1:], strict=False):
                deltas = []
                for upper in les:
                    va, vb = cols[upper][a], cols[upper][b]
                    deltas.append(0.0 if math.isnan(vb) else vb - (0.0 if math.isnan(va)
                                                                  else va))
                value = _bucket_quantile(q, les, deltas)
                if value is not None:
                    points.append([round(tier.times[b], 3), value])
            out.append({"labels": dict(base), "points": points})
        return out

    def window(self, name: str, match: dict[str, str], window: float = 60.0
               ) -> tuple[float, list[float], list[float]]:
        """A histogram's increase over the last window, summed over the series whose
        labels include match: (seconds actually covered, bucket upper bounds with +Inf,
        cumulative counts per bound)."""
        tier = self._tier(window)
        order = tier.order(time.time() - window - tier.step / 2)
        les = [*self.buckets.get(name, ()), math.inf]
        deltas = [0.0] * len(les)
        if len(order) < 2:
            return 0.0, les, deltas
        first, last = order[0], order[-1]
        lookup = {le: i for i, le in enumerate(self._les(name))}
        for (n, labels), col in tier.cols.items():
            if n != name + "_bucket":
                continue
            base = tuple(p for p in labels if p[0] != "le")
            if not _matches(base, match):
                continue
            i = lookup.get(dict(labels)["le"])
            if i is None:
                continue
            vb = col[last]
            if math.isnan(vb):
                continue
            va = col[first]
            deltas[i] += vb - (0.0 if math.isnan(va) else va)
        return tier.times[last] - tier.times[first], les, deltas

    def increase(self, name: str, match: dict[str, str], window: float = 60.0,
                 where: Any = None) -> tuple[float, float]:
        """A counter's increase over the last window summed over matching series (and
        where(labels) when given): (increase, seconds covered)."""
        tier = self._tier(window)
        order = tier.order(time.time() - window - tier.step / 2)
        if len(order) < 2:
            return 0.0, 0.0
        first, last = order[0], order[-1]
        total = 0.0
        for (n, labels), col in tier.cols.items():
            if n != name or not _matches(labels, match) or (where and not where(labels)):
                continue
            vb = col[last]
            if not math.isnan(vb):
                va = col[first]
                total += vb - (0.0 if math.isnan(va) else va)
        return total, tier.times[last] - tier.times[first]


def summary(store: Store, app: str, deployment: str | None, window: float = 60.0
            ) -> dict[str, Any]:
    """A deployment's (or, with deployment None, an application's ingress-side) last
    window: requests/s, p50/p90/p99 in seconds and error rate, from its replicas'
    figures."""
    match = {"application": app}
    if deployment is not None:
        match["deployment"] = deployment
    span, les, counts = store.window("fleet_replica_processing_seconds", match, window)
    total = counts[-1]
    errors, _ = store.increase("fleet_replica_errors_total", match, window)
    out: dict[str, Any] = {"requests_per_s": round(total / span, 3) if span else 0.0}
    for label, q in (("p50_s", 0.5), ("p90_s", 0.9), ("p99_s", 0.99)):
        value = _bucket_quantile(q, les, counts)
        out[label] = None if value is None else round(value, 6)
    out["error_rate"] = round(errors / total, 4) if total else 0.0
    out["window_s"] = round(span, 1)
    return out


def _bucket_quantile(q: float, les: list[float], cumulative: list[float]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    lower, below = 0.0, 0.0
    for le, count in zip(les, cumulative, strict=False):
        if count >= rank:
            if math.isinf(le):
                return lower            # past the last bound: its lower edge
            in_bucket = count - below
            return lower + (le - lower) * ((rank - below) / in_bucket if in_bucket else 1.0)
        lower, below = le, count
    return lower


def _matches(labels: Labels, match: dict[str, str]) -> bool:
    if not match:
        return True
    have = dict(labels)
    return all(have.get(k) == v for k, v in match.items())


def _num(v: float) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v) if isinstance(v, float) else str(v)


def _text(labels: Labels) -> str:
    if not labels:
        return ""
    parts = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + parts + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

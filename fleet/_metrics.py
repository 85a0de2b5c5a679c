"""Metrics kept in every fleet process: plain ints and bucket arrays, no lock.

Each process (proxy, replica, driver) counts into one :class:`Recorder` owned by its
event loop; once a second its runtime sends what changed to the controller as one
``metrics`` control message (``Recorder.take``), where the controller's store merges
every process's figures (``fleet/_controller/metrics.py``). A request costs a tuple,
a dict lookup, a ``bisect`` and two list updates; nothing waits, nothing is written.

``FLEET_METRICS=0`` in the environment (inherited by every process the instance
starts) turns recording off: the recorders are not made, and the request paths test
one attribute.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Any

# Upper bounds (seconds) of the latency histograms' buckets, the last one +Inf.
TIME_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Batch sizes.
SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# How often a process sends its figures to the controller.
PUSH_S = 1.0
# At most this many label sets per metric in one process: a client cannot grow a
# proxy's memory by sending new paths or methods (routes are the configured prefixes,
# methods and status codes come from small sets, but bounded all the same).
MAX_KEYS = 4096

Labels = tuple[tuple[str, str], ...]


def enabled() -> bool:
    """Whether this process records metrics (``FLEET_METRICS`` is not 0/false/off)."""
    return os.environ.get("FLEET_METRICS", "1").strip().lower() not in ("0", "false", "off",
                                                                         "no")


def new_hist(buckets: tuple[float, ...] = TIME_BUCKETS) -> list[float]:
    """A histogram's cells: one count per bucket, one for +Inf, then the sum."""
    return [0] * (len(buckets) + 1) + [0.0]


def observe(hist: list[float], value: float, buckets: tuple[float, ...] = TIME_BUCKETS
            ) -> None:
    """Count value in hist (from :func:`new_hist`)."""
    hist[bisect_left(buckets, value)] += 1
    hist[-1] += value


class Family:
    """One metric's series in one process, by the values of its labels (in order).

    A counter's cells are ``[n]``; a histogram's are :func:`new_hist`'s. The request
    paths keep the family and update its cells themselves."""

    __slots__ = ("name", "kind", "label_names", "buckets", "series", "count_name")

    def __init__(self, name: str, kind: str, label_names: tuple[str, ...],
                 buckets: tuple[float, ...] = TIME_BUCKETS, count_name: str = "") -> None:
        self.name = name
        self.kind = kind                    # "counter" or "histogram"
        self.label_names = label_names
        self.buckets = buckets
        self.series: dict[tuple[Any, ...], list[float]] = {}
        # a histogram whose count is also published as this counter (requests_total)
        self.count_name = count_name

    def cells(self, values: tuple[Any, ...]) -> list[float]:
        """The cells of one series, made on first use (at most MAX_KEYS series: past
        that, figures of new label sets are counted into throw-away cells)."""
        cells = self.series.get(values)
        if cells is None:
            cells = [0] if self.kind == "counter" else new_hist(self.buckets)
            if len(self.series) < MAX_KEYS:
                self.series[values] = cells
        return cells

    def inc(self, values: tuple[Any, ...], n: float = 1) -> None:
        self.cells(values)[0] += n

    def observe(self, values: tuple[Any, ...], value: float) -> None:
        cells = self.cells(values)
        cells[bisect_left(self.buckets, value)] += 1
        cells[-1] += value


class Recorder:
    """One process's metric families and gauges.

    Counters and histograms hold what happened since the last :meth:`take`; gauges
    hold the latest value and are sent whole every time."""

    __slots__ = ("families", "gauges", "gauge_fns")

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}
        self.gauges: dict[tuple[str, Labels], float] = {}
        # called before each take, to set gauges read from live objects
        self.gauge_fns: list[Any] = []

    def family(self, name: str, kind: str, label_names: tuple[str, ...],
               buckets: tuple[float, ...] = TIME_BUCKETS, count_name: str = "") -> Family:
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = Family(name, kind, label_names, buckets, count_name)
        return fam

    def counter(self, name: str, label_names: tuple[str, ...]) -> Family:
        return self.family(name, "counter", label_names)

    def histogram(self, name: str, label_names: tuple[str, ...],
                  buckets: tuple[float, ...] = TIME_BUCKETS, count_name: str = "") -> Family:
        return self.family(name, "histogram", label_names, buckets, count_name)

    def set(self, name: str, labels: Labels, value: float) -> None:
        self.gauges[(name, labels)] = value

    def take(self) -> dict[str, Any]:
        """What changed since the last take (counters and histograms, then reset to
        zero) and every gauge: the payload of one ``metrics`` message. Labels go out
        as sorted (name, value) pairs of strings."""
        for fn in self.gauge_fns:
            fn(self)
        counters: list[tuple[str, Labels, float]] = []
        hists: list[tuple[str, Labels, list[float], tuple[float, ...]]] = []
        for fam in self.families.values():
            names = fam.label_names
            for values, cells in fam.series.items():
                if fam.kind == "counter":
                    if cells[0]:
                        counters.append((fam.name, _pairs(names, values), cells[0]))
                        cells[0] = 0
                    continue
                count = sum(cells[:-1])
                if not count:
                    continue
                lb = _pairs(names, values)
                hists.append((fam.name, lb, list(cells), fam.buckets))
                if fam.count_name:
                    counters.append((fam.count_name, lb, count))
                for i in range(len(cells)):
                    cells[i] = 0
        gauges = [(n, lb, v) for (n, lb), v in self.gauges.items()]
        return {"counters": counters, "hists": hists, "gauges": gauges}


def _pairs(names: tuple[str, ...], values: tuple[Any, ...]) -> Labels:
    return tuple(sorted(zip(names, (str(v) for v in values), strict=False)))


def labels(**kw: Any) -> Labels:
    """Labels as the sorted tuple recorders key on."""
    return tuple(sorted((k, str(v)) for k, v in kw.items()))

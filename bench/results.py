"""Result rows, ratios to fleet, and the markdown / JSON reports."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SYSTEMS = ("fleet", "fleet-ray", "ray", "baseline")
SYSTEM_TITLES = {"fleet": "fleet", "fleet-ray": "fleet on Ray", "ray": "Ray Serve",
                 "baseline": "baseline"}


@dataclass
class Metric:
    """What a scenario reports: name, unit and which direction is better."""

    name: str
    unit: str
    better: str = "higher"


@dataclass
class Row:
    """One metric of one scenario for one system (median over runs)."""

    scenario: str
    metric: str
    unit: str
    system: str
    better: str = "higher"
    status: str = "ok"
    value: float | None = None
    runs: list[float] = field(default_factory=list)
    note: str = ""
    ratio_to_fleet: float | None = None
    background_cpu_pct: float | None = None

    @classmethod
    def measured(cls, scenario: str, metric: Metric, system: str, runs: list[float],
                 note: str = "") -> Row:
        """Row holding the median of ``runs`` (NaN runs are dropped)."""
        clean = [float(v) for v in runs if v is not None and not math.isnan(v)]
        value = statistics.median(clean) if clean else None
        status = "ok" if clean else "error"
        return cls(scenario, metric.name, metric.unit, system, metric.better, status, value,
                   clean, note if clean else (note or "no successful run"))

    @classmethod
    def unavailable(cls, scenario: str, metric: Metric, system: str, status: str,
                    note: str) -> Row:
        """Row for a system that could not be measured in this scenario."""
        return cls(scenario, metric.name, metric.unit, system, metric.better, status, None, [],
                   note)


def add_ratios(rows: list[Row]) -> None:
    """Fill ``ratio_to_fleet`` = value / fleet's value for the same scenario and metric."""
    fleet = {(r.scenario, r.metric): r.value for r in rows if r.system == "fleet"}
    for row in rows:
        base = fleet.get((row.scenario, row.metric))
        if row.value is not None and base:
            row.ratio_to_fleet = row.value / base
        else:
            row.ratio_to_fleet = None


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 1000:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    if row.status == "ok" and row.value is not None:
        return f"{row.value:.0f}" if row.unit == "count" else _fmt(row.value)
    return f"{row.status}: {row.note}".replace("|", "/").strip(": ")


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """A markdown report: one line per scenario metric, one column per system."""
    systems = [s for s in SYSTEMS if any(r.system == s for r in rows)]
    others = [s for s in systems if s != "fleet"]
    head = ["Scenario", "Metric", "Unit", *(SYSTEM_TITLES[s] for s in systems)]
    head += [f"{SYSTEM_TITLES[s]} / fleet" for s in others if "fleet" in systems]
    lines = [
        "# fleet benchmark results",
        "",
        f"- load generator: {meta.get('load_generator')}",
        f"- runs: {meta.get('runs')} × {meta.get('duration_s')} s after "
        f"{meta.get('warmup_s')} s warm-up; figures are medians over runs",
        f"- machine: {meta.get('machine')}; load average at start "
        f"{meta.get('load_average_at_start')}, at end {meta.get('load_average_at_end', '?')}",
        f"- versions: {meta.get('versions')}",
        "- CPU µs/request: user+system CPU of every process of the system under test "
        "during the measured window, divided by the successful requests",
        "- ratio columns: the system's value divided by fleet's (check the metric's "
        "direction: higher is better for rates, lower for latency, CPU and memory)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    seen: list[tuple[str, str]] = []
    for row in rows:
        if (row.scenario, row.metric) not in seen:
            seen.append((row.scenario, row.metric))
    for scenario, metric in seen:
        group = {r.system: r for r in rows if (r.scenario, r.metric) == (scenario, metric)}
        first = next(iter(group.values()))
        arrow = "↑" if first.better == "higher" else "↓"
        cells = [scenario, metric, f"{first.unit} {arrow}"]
        cells += [_cell(group.get(s)) for s in systems]
        if "fleet" in systems:
            for s in others:
                ratio = group[s].ratio_to_fleet if s in group else None
                cells.append(f"{ratio:.2f}×" if ratio is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    busy = [r.background_cpu_pct for r in rows if r.background_cpu_pct is not None]
    if busy and max(busy) > 10:
        lines += ["", f"Warning: other processes used up to {max(busy):.0f}% of the machine's "
                  "CPU just before some measurements; those figures are noisy."]
    notes = [r for r in rows if r.status == "ok" and r.note]
    if notes:
        lines += ["", "Notes:", ""]
        lines += sorted({f"- {r.scenario} / {SYSTEM_TITLES[r.system]}: {r.note}" for r in notes})
    return "\n".join(lines) + "\n"


def write(rows: list[Row], meta: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` under ``out_dir``; return both paths."""
    add_ratios(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    md_path = out_dir / "results.md"
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")
    md_path.write_text(markdown(rows, meta))
    return json_path, md_path

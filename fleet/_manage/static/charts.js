// Live charts over the management API's metric history (/api/metrics/series), drawn
// with uPlot. A chart is a list of lines; each line is one query whose series are summed,
// or split into one line per value of a label (errors by status code).

import { get, q } from "./api.js";
import { esc, clock } from "./ui.js";

export const WINDOWS = [["15 min", 900], ["1 h", 3600], ["6 h", 21600], ["24 h", 86400]];
const COLOURS = ["#2f5bd3", "#d9730d", "#1d7f45", "#b3261e", "#7b3fb4", "#0f7b8a", "#8a6d0f"];
const FORMATS = {
  "/s": (v) => v == null ? "\u2013" : `${+v.toFixed(v < 10 ? 2 : 0)}/s`,
  s: (v) => v == null ? "\u2013" : (v < 1 ? `${+(v * 1000).toFixed(v < 0.01 ? 2 : 0)} ms` : `${+v.toFixed(2)} s`),
  "": (v) => v == null ? "\u2013" : `${+v.toFixed(2)}`,
};

async function series(query, scope, window, appOnly) {
  const params = { ...query, window };
  if (scope.application) params.application = scope.application;
  if (scope.deployment && !appOnly) params.deployment = scope.deployment;
  const data = await get("/api/metrics/series" + q(params));
  return data.series || [];
}

// Lines of one spec entry: [{label, points: Map(t -> v)}].
function reduce(line, found) {
  const groups = new Map();
  for (const s of found) {
    const labels = s.labels || {};
    if (line.where && !Object.entries(line.where).every(([k, v]) => String(labels[k]) === String(v))) continue;
    if (line.filter && !line.filter(labels)) continue;
    const key = line.split ? `${line.label} ${labels[line.split] ?? "?"}` : line.label;
    if (!groups.has(key)) groups.set(key, new Map());
    const acc = groups.get(key);
    for (const [t, v] of s.points || []) {
      if (v === null || v === undefined || Number.isNaN(v)) continue;
      acc.set(t, line.max ? Math.max(acc.get(t) ?? -Infinity, v) : (acc.get(t) ?? 0) + v);
    }
  }
  return [...groups.entries()].map(([label, points]) => ({ label, points }));
}

export class Chart {
  // spec: {title, unit: "/s" | "s" | "", lines: [{label, query | queries, split?, where?, filter?, max?, appOnly?}]}
  constructor(el, spec, small = false) {
    this.el = el;
    this.spec = spec;
    this.small = small;
    this.plot = null;
    this.labels = "";
    this.marks = [];
    el.classList.add("chart-box");
    el.innerHTML = `${small ? "" : `<div class="chart-title">${esc(spec.title)}</div>`}<div class="chart"></div>`;
    this.box = el.querySelector(".chart");
    this.box.dataset.chart = spec.id || spec.title;
    this.resize = new ResizeObserver(() => {
      if (this.plot) this.plot.setSize(this.size());
    });
    this.resize.observe(this.box);
  }

  size() {
    const width = Math.max(120, this.box.clientWidth || 300);
    return { width, height: this.small ? 60 : 170 };
  }

  // scope: {application, deployment}; marks: [{time, text}] drawn as hoverable lines
  async refresh(scope, window, marks = []) {
    const lines = [];
    const found = await Promise.all(this.spec.lines.map(async (l) =>
      (await Promise.all((l.queries || [l.query]).map((qq) => series(qq, scope, window, l.appOnly)))).flat()));
    this.spec.lines.forEach((line, i) => lines.push(...reduce(line, found[i])));
    const times = [...new Set(lines.flatMap((l) => [...l.points.keys()]))].sort((a, b) => a - b);
    const last = lines.map((l) => l.points.get(times[times.length - 1]));
    this.box.dataset.window = String(window);
    this.box.dataset.points = String(times.length);
    this.box.dataset.last = JSON.stringify(last);
    this.box.dataset.max = String(Math.max(0, ...lines.flatMap((l) => [...l.points.values()])));
    if (!times.length) {
      this.destroy();
      this.box.innerHTML = `<div class="empty">No data in the last ${window >= 3600 ? window / 3600 + " h" : window / 60 + " min"} yet</div>`;
      return;
    }
    const data = [times, ...lines.map((l) => times.map((t) => l.points.has(t) ? l.points.get(t) : null))];
    const labels = lines.map((l) => l.label).join("|");
    this.marks = marks;
    if (!this.plot || labels !== this.labels) {
      this.destroy();
      this.box.innerHTML = "";
      this.labels = labels;
      this.plot = new uPlot(this.options(lines), data, this.box);
    } else {
      this.plot.setData(data);
    }
  }

  options(lines) {
    const fmt = FORMATS[this.spec.unit] || FORMATS[""];
    const self = this;
    return {
      ...this.size(),
      legend: { show: !this.small },
      cursor: { show: !this.small, points: { show: false } },
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(hi * 1.1, this.spec.unit === "/s" ? 1 : hi || 1)] } },
      axes: this.small ? [{ show: false }, { show: false }] : [
        { values: (u, ticks) => ticks.map((t) => (ticks[ticks.length - 1] - ticks[0] < 600 ? clock(t) : clock(t).slice(0, 5))),
          size: 28, font: "11px system-ui" },
        { values: (u, ticks) => ticks.map(fmt), size: 64, font: "11px system-ui" },
      ],
      series: [{ value: (u, t) => t == null ? "\u2013" : clock(t) },
        ...lines.map((l, i) => ({
          label: l.label, stroke: COLOURS[i % COLOURS.length], width: 1.5, spanGaps: true,
          dash: i % 2 ? [6, 3] : undefined, value: (u, v) => fmt(v),
        }))],
      hooks: { draw: [(u) => self.drawMarks(u)] },
    };
  }

  // Autoscaling decisions: a dashed line each, and a marker whose title gives the reason.
  drawMarks(u) {
    u.over.querySelectorAll(".mark").forEach((m) => m.remove());
    for (const m of this.marks) {
      const x = u.valToPos(m.time, "x");
      if (x < 0 || x > u.over.clientWidth) continue;
      const el = document.createElement("div");
      el.className = "mark";
      el.style.cssText = `position:absolute;left:${x - 1}px;top:0;bottom:0;width:3px;border-left:2px dashed #7b3fb4;pointer-events:auto;cursor:help`;
      el.title = `${clock(m.time)}: ${m.text}`;
      el.setAttribute("aria-label", el.title);
      u.over.appendChild(el);
    }
  }

  destroy() {
    if (this.plot) { this.plot.destroy(); this.plot = null; this.labels = ""; }
  }
}

export function windowPicker(current, onChange) {
  const wrap = document.createElement("span");
  wrap.className = "row";
  wrap.innerHTML = `<label for="window">Charts show</label><select id="window">${WINDOWS.map(([l, s]) =>
    `<option value="${s}"${s === current ? " selected" : ""}>last ${l}</option>`).join("")}</select>`;
  wrap.querySelector("select").addEventListener("change", (e) => onChange(Number(e.target.value)));
  return wrap;
}

// What the charts ask for: fleet's metric names (see the README's metrics list).
export const SPECS = {
  rps: { id: "rps", title: "Requests/s", unit: "/s",
    lines: [{ label: "requests/s", queries: [{ name: "fleet_http_requests_total", rate: 1 },
      { name: "fleet_grpc_requests_total", rate: 1 }] }] },
  latency: { id: "latency", title: "Latency (p50 / p90 / p99)", unit: "s",
    lines: [0.5, 0.9, 0.99].map((qq) => ({ label: `p${Math.round(qq * 100)}`, max: true,
      query: { name: "fleet_http_request_duration_seconds", quantile: qq } })) },
  queue: { id: "queue", title: "Queue time against processing time (p50)", unit: "s",
    lines: [{ label: "queue", max: true, query: { name: "fleet_replica_queue_seconds", quantile: 0.5 } },
      { label: "processing", max: true, query: { name: "fleet_replica_processing_seconds", quantile: 0.5 } }] },
  errors: { id: "errors", title: "Errors/s by status code", unit: "/s",
    lines: [{ label: "HTTP", split: "status_code", query: { name: "fleet_http_requests_total", rate: 1 },
      filter: (labels) => Number(labels.status_code) >= 400 }] },
  // a deployment's own: what its replicas ran (the proxies count per application)
  depRps: { id: "rps", title: "Requests/s (calls its replicas finished)", unit: "/s",
    lines: [{ label: "requests/s", query: { name: "fleet_replica_requests_total", rate: 1 } }] },
  depLatency: { id: "latency", title: "Processing time in its replicas (p50 / p90 / p99)", unit: "s",
    lines: [0.5, 0.9, 0.99].map((qq) => ({ label: `p${Math.round(qq * 100)}`, max: true,
      query: { name: "fleet_replica_processing_seconds", quantile: qq } })) },
  depErrors: { id: "errors", title: "Errors/s: exceptions, and the application's HTTP errors by status code", unit: "/s",
    lines: [{ label: "exceptions", query: { name: "fleet_replica_errors_total", rate: 1 } },
      { label: "HTTP", split: "status_code", appOnly: true, query: { name: "fleet_http_requests_total", rate: 1 },
        filter: (labels) => Number(labels.status_code) >= 400 }] },
  batch: { id: "batch", title: "Batch size (p50 / max)", unit: "",
    lines: [{ label: "p50", max: true, query: { name: "fleet_batch_size", quantile: 0.5 } },
      { label: "max", max: true, query: { name: "fleet_batch_size", quantile: 1 } }] },
  replicas: { id: "replicas", title: "Replicas: target / desired / running", unit: "",
    lines: [{ label: "target", query: { name: "fleet_autoscaling_target_replicas" } },
      { label: "desired", query: { name: "fleet_autoscaling_desired_replicas" } },
      { label: "running", query: { name: "fleet_replicas" }, where: { state: "RUNNING" } }] },
};

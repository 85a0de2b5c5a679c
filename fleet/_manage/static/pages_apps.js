// Overview, Application and Deployment pages.

import { get, post, call, enc, q } from "./api.js";
import { Chart, SPECS, windowPicker } from "./charts.js";
import { drawGraph } from "./graph.js";
import {
  esc, badge, num, ms, pct, bytes, duration, when, clock, pick, act, confirmAction,
  requestLink,
} from "./ui.js";

const NARROW = () => window.matchMedia("(max-width: 700px)").matches;
let chartWindow = Number(localStorage.getItem("fleet.window")) || 900;

function setWindow(w) {
  chartWindow = w;
  localStorage.setItem("fleet.window", String(w));
  window.dispatchEvent(new Event("fleet:refresh"));
}

function refreshSoon() {
  window.dispatchEvent(new Event("fleet:refresh"));
}

// The last minute's figures an application's or a deployment's status carries.
function figures(st) {
  return { rps: pick(st, "requests_per_s"), p50: pick(st, "p50_s"), p90: pick(st, "p90_s"),
    p99: pick(st, "p99_s"), errors: pick(st, "error_rate") };
}

function problems(app, name) {
  let html = "";
  for (const [dname, d] of Object.entries(app.deployments || {})) {
    const text = d.reason || d.message;
    if (!text && !["DEPLOY_FAILED", "UNHEALTHY"].includes(d.status)) continue;
    const failed = ["DEPLOY_FAILED", "UNHEALTHY"].includes(d.status);
    html += `<div class="${failed ? "error-box" : "panel"}" data-problem="${esc(dname)}">
      <b>${esc(dname)}</b> ${badge(d.status)}
      <pre>${esc(text || "")}</pre>
      ${d.traceback ? `<details><summary>Traceback</summary><pre>${esc(d.traceback)}</pre></details>` : ""}
      ${failed ? `<p class="muted">What was serving before keeps serving. Fix the code or config and apply again, or
        <a href="#/config/${enc(name)}">roll back to an earlier revision</a>.</p>` : ""}</div>`;
  }
  return html;
}

// ---------------------------------------------------------------- overview
export function overview(root) {
  root.innerHTML = `<h1>Overview</h1>
    <div class="toolbar" id="ov-tools"></div>
    <div id="ov-apps" class="grid"></div>
    <div class="grid two" style="margin-top:14px">
      <section class="panel"><h2>Instance</h2><div id="ov-instance" class="muted">Loading&hellip;</div></section>
      <section class="panel"><div class="panel-head"><h2>Last events</h2><a href="#/events">All events</a></div>
        <div id="ov-events" class="muted">Loading&hellip;</div></section>
    </div>`;
  root.querySelector("#ov-tools").append(windowPicker(chartWindow, setWindow));
  const charts = new Map();
  return {
    async refresh() {
      const [apps, inst, ev] = await Promise.all([
        get("/api/applications"), get("/api/instance").catch(() => null),
        get("/api/events" + q({ since: Math.floor(Date.now() / 1000) - 3600 })).catch(() => ({ events: [] })),
      ]);
      const list = root.querySelector("#ov-apps");
      const names = Object.keys(apps.applications || {}).sort();
      if (!names.length) {
        list.innerHTML = `<div class="panel muted no-apps">No application is deployed. Deploy one with
          <code>fleet apply fleet.yaml</code> or <code>fleet run module:app</code>.</div>`;
      }
      for (const name of names) {
        const app = apps.applications[name];
        let card = list.querySelector(`[data-app="${CSS.escape(name)}"]`);
        if (!card) {
          list.querySelector(".no-apps")?.remove();
          card = document.createElement("section");
          card.className = "panel app-card";
          card.dataset.app = name;
          card.innerHTML = `<div class="panel-head"><h2><a href="#/app/${enc(name)}">${esc(name)}</a></h2><span class="st"></span></div>
            <div class="info muted"></div><div class="stats"></div><div class="spark"></div>`;
          list.append(card);
          charts.set(name, new Chart(card.querySelector(".spark"), SPECS.rps, true));
        }
        const f = figures(app);
        card.querySelector(".st").innerHTML = badge(app.status);
        card.querySelector(".info").innerHTML = `route <code>${esc(app.route_prefix ?? "none")}</code> &middot;
          ${Object.keys(app.deployments || {}).length} deployments &middot; replicas ${esc(app.running_replicas)}/${esc(app.target_replicas)}
          ${app.reason ? `<br><span class="reason">${esc(app.reason.split("\n")[0])}</span>` : ""}`;
        card.querySelector(".stats").innerHTML = `
          <div class="stat" data-stat="rps"><b>${num(f.rps)}</b><span>requests/s</span></div>
          <div class="stat"><b>${ms(f.p99)}</b><span>p99</span></div>
          <div class="stat"><b>${pct(f.errors)}</b><span>errors</span></div>`;
      }
      list.querySelectorAll(".app-card").forEach((card) => {
        if (!names.includes(card.dataset.app)) { charts.get(card.dataset.app)?.destroy(); charts.delete(card.dataset.app); card.remove(); }
      });
      await Promise.all(names.map((n) => charts.get(n).refresh({ application: n }, chartWindow).catch(() => {})));
      root.querySelector("#ov-instance").innerHTML = inst ? instanceHtml(inst) : "Instance details unavailable.";
      const recent = (ev.events || []).slice(-10).reverse();
      root.querySelector("#ov-events").innerHTML = recent.length ? eventList(recent) : "No events in the last hour.";
    },
    unmount() { charts.forEach((c) => c.destroy()); },
  };
}

function instanceHtml(inst) {
  const proxies = Object.entries(inst.proxies || {}).map(([kind, p]) =>
    `<dt>${esc(kind)} proxy</dt><dd>${p.error ? badge("FAILED") + " " + esc(p.error)
      : `${badge("RUNNING")} <code>${esc(p.host)}:${esc(p.port)}</code>${(p.pids || []).length > 1 ? ` &middot; ${p.pids.length} processes` : ""}`}</dd>`).join("");
  const mg = inst.management || {};
  return `<dl class="kv">
    <dt>instance</dt><dd><code>${esc(inst.instance_id)}</code> ${badge("RUNNING")}</dd>
    <dt>fleet</dt><dd>${esc(inst.version)} &middot; ${esc(inst.backend)} backend &middot; pid ${esc(inst.pid)}</dd>
    <dt>started</dt><dd>${when(inst.started_at)}</dd>
    <dt>management</dt><dd><code>${esc(mg.host)}:${esc(mg.port)}</code></dd>${proxies}</dl>`;
}

export function eventList(evs) {
  return `<ul class="timeline">${evs.map((e) => `<li data-kind="${esc(e.kind)}">
    <span class="muted">${clock(e.time)}</span><span><b>${esc(e.kind)}</b></span>
    <span>${[e.application, e.deployment, e.replica].filter(Boolean).map(esc).join(" / ")}${e.application ? ": " : ""}${esc(e.message)}</span></li>`).join("")}</ul>`;
}

// ---------------------------------------------------------------- application
export function application(root, [name]) {
  root.innerHTML = `<div class="crumbs"><a href="#/">Overview</a> / ${esc(name)}</div>
    <div class="panel-head"><h1 id="app-title">${esc(name)} <span class="st"></span></h1>
      <div class="toolbar">
        <a class="button" href="#/playground?app=${enc(name)}">Playground</a>
        <a class="button" href="#/logs?application=${enc(name)}">Logs</a>
        <a class="button" href="#/config/${enc(name)}">Config, edit &amp; roll back</a>
        <button class="danger" id="app-delete">Delete&hellip;</button></div></div>
    <div id="app-info" class="muted"></div>
    <div id="app-problems"></div>
    <section class="panel"><h2>Graph</h2><div class="graph" id="app-graph"></div></section>
    <section class="panel"><h2>Deployments</h2><div class="table-wrap"><table>
      <thead><tr><th>Deployment</th><th>State</th><th class="num">Replicas</th><th class="num">Requests/s</th>
      <th class="num hide-narrow">p99</th><th class="num hide-narrow">Errors</th><th>Message</th></tr></thead>
      <tbody id="app-deps"></tbody></table></div></section>
    <div class="toolbar" style="margin-top:14px" id="app-tools"></div>
    <div class="grid two"><section class="panel" id="c-rps"></section><section class="panel" id="c-lat"></section></div>`;
  root.querySelector("#app-tools").append(windowPicker(chartWindow, setWindow));
  const charts = [new Chart(root.querySelector("#c-rps"), SPECS.rps), new Chart(root.querySelector("#c-lat"), SPECS.latency)];
  let last = null;
  root.querySelector("#app-delete").addEventListener("click", async () => {
    const deps = Object.keys(last?.deployments || {});
    const ok = await confirmAction(`Delete application ${name}?`,
      `<p class="change">Stops <b>${deps.length}</b> deployments (${deps.map(esc).join(", ") || "none"}) and
       all their replicas${last?.route_prefix ? `; route <b>${esc(last.route_prefix)}</b> stops serving` : ""}.</p>
       <p>Its config stays in the revision history only until the instance stops.</p>`, "Delete", true);
    if (ok && await act(`Delete ${name}`, () => call("DELETE", `/api/applications/${enc(name)}`))) refreshSoon();
  });
  return {
    async refresh() {
      const [app, graph] = await Promise.all([
        get(`/api/applications/${enc(name)}`),
        get(`/api/applications/${enc(name)}/graph`).catch(() => null)]);
      last = app;
      root.querySelector("#app-title .st").innerHTML = badge(app.status);
      root.querySelector("#app-info").innerHTML = `route <code>${esc(app.route_prefix ?? "none")}</code> &middot;
        ingress <b>${esc(app.ingress)}</b> &middot; ${esc(app.protocol || "http")}
        ${app.last_deployed_time_s ? `&middot; deployed ${when(app.last_deployed_time_s)}` : ""}
        ${app.revision ? `&middot; revision ${esc(app.revision)}` : ""}`;
      root.querySelector("#app-problems").innerHTML = problems(app, name);
      if (graph) root.querySelector("#app-graph").innerHTML = drawGraph(graph, name, NARROW());
      root.querySelector("#app-deps").innerHTML = Object.entries(app.deployments || {}).map(([d, dep]) => {
        const f = figures(dep);
        const running = dep.running_replicas;
        return `<tr data-deployment="${esc(d)}"><td><a href="#/app/${enc(name)}/dep/${enc(d)}">${esc(d)}</a>${d === app.ingress ? ' <span class="muted">(ingress)</span>' : ""}</td>
          <td>${badge(dep.status)}</td><td class="num">${running}/${dep.target_replicas ?? "?"}</td>
          <td class="num">${num(f.rps)}</td><td class="num hide-narrow">${ms(f.p99)}</td><td class="num hide-narrow">${pct(f.errors)}</td>
          <td><span class="msg">${esc((dep.reason || dep.message || "").split("\n")[0])}</span></td></tr>`;
      }).join("");
      await Promise.all(charts.map((c) => c.refresh({ application: name }, chartWindow)));
    },
    unmount() { charts.forEach((c) => c.destroy()); },
  };
}

// ---------------------------------------------------------------- deployment
export function deployment(root, [app, dep]) {
  const base = `/api/applications/${enc(app)}/deployments/${enc(dep)}`;
  root.innerHTML = `<div class="crumbs"><a href="#/">Overview</a> / <a href="#/app/${enc(app)}">${esc(app)}</a> / ${esc(dep)}</div>
    <div class="panel-head"><h1 id="dep-title">${esc(dep)} <span class="st"></span></h1>
      <form class="row" id="scale-form"><div class="field"><label for="replicas">Replicas</label>
        <input id="replicas" type="number" min="0" max="1000" step="1" style="width:90px" required></div>
        <button type="submit" class="primary" id="scale">Scale&hellip;</button>
        <a class="button" href="#/logs?application=${enc(app)}&deployment=${enc(dep)}">Logs</a></form></div>
    <div class="stats" id="dep-stats"></div>
    <div id="dep-problems"></div>
    <section class="panel"><div class="panel-head"><h2>Replicas</h2><span id="replaced" class="muted"></span></div>
      <div class="table-wrap"><table><thead><tr><th>Replica</th><th>State</th><th class="num">pid</th>
      <th class="hide-narrow">Node</th><th class="num">Uptime</th><th class="num">Ongoing</th><th class="num">CPU</th>
      <th class="num">Memory</th><th>Message</th><th></th></tr></thead><tbody id="dep-replicas"></tbody></table></div>
      <details id="replaced-list"><summary>Replaced replicas and why</summary><div></div></details></section>
    <div class="toolbar" style="margin-top:14px" id="dep-tools"></div>
    <div class="grid two" id="dep-charts"></div>
    <section class="panel"><h2>Scaling decisions</h2><div id="dep-scaling" class="muted"></div></section>`;
  root.querySelector("#dep-tools").append(windowPicker(chartWindow, setWindow));
  const grid = root.querySelector("#dep-charts");
  const charts = ["depRps", "depLatency", "queue", "depErrors", "batch", "replicas"].map((k) => {
    const el = document.createElement("section");
    el.className = "panel";
    grid.append(el);
    return new Chart(el, SPECS[k]);
  });
  let status = null;
  const input = root.querySelector("#replicas");
  let touched = false;
  input.addEventListener("input", () => { touched = true; });
  root.querySelector("#scale-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const to = Number(input.value);
    const from = status ? status.target_replicas : "?";
    const auto = status && status.autoscaling;
    const ok = await confirmAction(`Scale ${dep}?`,
      `<p class="change">Replicas of <b>${esc(app)}/${esc(dep)}</b>: <b>${esc(from)}</b> &rarr; <b>${to}</b>.</p>
       ${to < from ? "<p>Replicas taken away finish their ongoing requests first.</p>" : ""}
       ${auto ? "<p>This deployment autoscales: the autoscaler's bounds apply from its next decision.</p>" : ""}`, "Scale");
    if (ok && await act(`Scale ${dep} to ${to}`, () => post(`${base}/scale`, { num_replicas: to }))) {
      touched = false;
      refreshSoon();
    }
  });
  root.querySelector("#dep-replicas").addEventListener("click", async (e) => {
    const btn = e.target.closest("button[data-restart]");
    if (!btn) return;
    const rid = btn.dataset.restart;
    const ok = await confirmAction(`Restart replica ${rid}?`,
      `<p class="change">Replica <b>${esc(rid)}</b> of ${esc(app)}/${esc(dep)} is replaced: a new one starts, and this one
       stops after its ongoing requests once the new one runs.</p>`, "Restart", true);
    if (ok && await act(`Restart ${rid}`, () => post(`${base}/replicas/${enc(rid)}/restart`))) refreshSoon();
  });
  return {
    async refresh() {
      const [st, reps] = await Promise.all([get(base), get(`${base}/replicas`).catch(() => null)]);
      status = st;
      const replicas = reps ? reps.replicas : st.replicas || [];
      const running = st.running_replicas;
      root.querySelector("#dep-title .st").innerHTML = badge(st.status);
      if (!touched && document.activeElement !== input) input.value = st.target_replicas ?? running;
      root.querySelector("#dep-stats").innerHTML = `
        <div class="stat" data-stat="running"><b>${running}</b><span>running</span></div>
        <div class="stat" data-stat="target"><b>${esc(st.target_replicas)}</b><span>target</span></div>
        <div class="stat"><b>${esc(st.desired_replicas)}</b><span>desired</span></div>
        <div class="stat"><b>${num(st.requests_per_s)}</b><span>requests/s</span></div>
        <div class="stat"><b>${ms(st.p99_s)}</b><span>p99</span></div>
        <div class="stat"><b>${pct(st.error_rate)}</b><span>errors</span></div>
        ${st.autoscaling ? `<div class="stat"><b>on</b><span>autoscaling</span></div>` : ""}`;
      const text = st.reason || st.message;
      const failing = text || st.last_error;
      root.querySelector("#dep-problems").innerHTML = failing ? `<div class="${["DEPLOY_FAILED", "UNHEALTHY"].includes(st.status) ? "error-box" : "panel"}">
        ${text ? `<pre>${esc(text)}</pre>` : ""}
        ${st.traceback ? `<details><summary>Traceback</summary><pre>${esc(st.traceback)}</pre></details>` : ""}
        ${st.last_error ? `<p>Last request error${st.last_error.at ? " at " + esc(st.last_error.at) : ""}: ${requestLink(st.last_error.request_id)}
          <pre>${esc(st.last_error.message || st.last_error.error || "")}</pre>
          ${st.last_error.traceback ? `<details><summary>Traceback</summary><pre>${esc(st.last_error.traceback)}</pre></details>` : ""}</p>` : ""}</div>` : "";
      root.querySelector("#dep-replicas").innerHTML = replicas.map((r) => `<tr data-replica="${esc(r.replica_id)}">
        <td class="mono">${esc(r.replica_id)}</td><td>${badge(r.state)}</td><td class="num">${esc(r.pid ?? "\u2013")}</td>
        <td class="hide-narrow">${esc(r.node_id ?? "\u2013")}</td><td class="num">${duration(r.uptime_s)}</td>
        <td class="num">${esc(r.ongoing ?? 0)}</td><td class="num">${r.cpu_percent == null ? "\u2013" : num(r.cpu_percent) + "%"}</td>
        <td class="num">${bytes(r.rss_bytes)}</td><td><pre>${esc(r.message || "")}</pre></td>
        <td><button class="small" data-restart="${esc(r.replica_id)}" ${r.state === "RUNNING" ? "" : "disabled"}>Restart&hellip;</button></td></tr>`).join("")
        || `<tr><td colspan="10" class="muted">No replica.</td></tr>`;
      const replaced = reps ? reps.replaced || [] : [];
      root.querySelector("#replaced").textContent = `${reps ? reps.replaced_total ?? replaced.length : 0} replaced`;
      root.querySelector("#replaced-list div").innerHTML = replaced.length ? `<ul>${replaced.slice(-50).reverse().map((r) =>
        `<li><span class="mono">${esc(r.replica_id)}</span> at ${clock(r.time)}: ${esc(r.reason)}</li>`).join("")}</ul>` : `<p class="muted">None.</p>`;
      const log = st.scaling_log || [];
      root.querySelector("#dep-scaling").innerHTML = log.length ? `<ul>${log.slice().reverse().map((s) =>
        `<li>${clock(s.time)}: ${esc(s.from)} &rarr; ${esc(s.to)} replicas: ${esc(s.reason)}</li>`).join("")}</ul>`
        : "No autoscaling decision yet.";
      const marks = log.map((s) => ({ time: s.time, text: `${s.from} \u2192 ${s.to}: ${s.reason}` }));
      await Promise.all(charts.map((c, i) => c.refresh({ application: app, deployment: dep }, chartWindow, i === 5 ? marks : [])));
    },
    unmount() { charts.forEach((c) => c.destroy()); },
  };
}

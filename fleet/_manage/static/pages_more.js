// Logs, Events, Config (with revisions, diffs, edit and roll back) and Playground pages.

import { get, post, call, enc, q } from "./api.js";
import { eventList } from "./pages_apps.js";
import {
  esc, badge, clock, when, act, confirmAction, requestLink, diffHtml, configText, yamlText, toast,
} from "./ui.js";

function refreshSoon() {
  window.dispatchEvent(new Event("fleet:refresh"));
}

async function appNames() {
  const apps = await get("/api/applications");
  return apps.applications || {};
}

function options(names, selected, blank) {
  return `<option value="">${esc(blank)}</option>` + names.map((n) =>
    `<option${n === selected ? " selected" : ""}>${esc(n)}</option>`).join("");
}

// ---------------------------------------------------------------- logs
const LOG_FIELDS = ["application", "deployment", "replica", "grep", "request_id"];

export function logs(root, _params, query) {
  const f = Object.fromEntries(LOG_FIELDS.map((k) => [k, query.get(k) || ""]));
  root.innerHTML = `<h1>Logs</h1>
    <form class="panel row" id="log-form">
      <div class="field"><label for="l-app">Application</label><select id="l-app" name="application"></select></div>
      <div class="field"><label for="l-dep">Deployment</label><input id="l-dep" name="deployment" value="${esc(f.deployment)}" placeholder="any"></div>
      <div class="field"><label for="l-rep">Replica</label><input id="l-rep" name="replica" value="${esc(f.replica)}" placeholder="any"></div>
      <div class="field grow"><label for="l-grep">Text</label><input id="l-grep" name="grep" value="${esc(f.grep)}" placeholder="contains"></div>
      <div class="field grow"><label for="l-rid">Request id</label><input id="l-rid" name="request_id" value="${esc(f.request_id)}"></div>
      <div class="field"><label for="l-since">Since</label><select id="l-since" name="since">
        ${[["1 min", 60], ["10 min", 600], ["1 h", 3600], ["24 h", 86400]].map(([l, s]) =>
          `<option value="${s}"${String(s) === (query.get("since") || "3600") ? " selected" : ""}>last ${l}</option>`).join("")}</select></div>
      <label><input type="checkbox" name="system" id="l-sys"${query.get("system") === "1" ? " checked" : ""}> fleet's own</label>
      <label><input type="checkbox" id="l-follow" checked> follow</label>
      <button type="submit" class="primary">Show</button>
    </form>
    <div class="panel-head" style="margin-top:10px"><span id="log-count" class="muted"></span></div>
    <div class="log" id="log-lines" aria-live="off"></div>`;
  const form = root.querySelector("#log-form");
  const box = root.querySelector("#log-lines");
  let loaded = false;
  appNames().then((apps) => {
    root.querySelector("#l-app").innerHTML = options(Object.keys(apps).sort(), f.application, "all applications");
  }).catch(() => {});
  if (f.application) root.querySelector("#l-app").innerHTML = options([f.application], f.application, "all applications");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const params = {};
    for (const [k, v] of data.entries()) if (v) params[k] = k === "system" ? "1" : v;
    window.location.hash = "#/logs" + q(params);
  });
  const params = () => {
    const p = { ...f, since: query.get("since") || 3600, limit: 500 };
    if (query.get("system") === "1") p.system = 1;
    return p;
  };
  return {
    async refresh() {
      if (loaded && !root.querySelector("#l-follow").checked) return;
      const data = await get("/api/logs" + q(params()));
      const lines = data.lines || [];
      const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 20;
      box.innerHTML = lines.length ? lines.map((l) => `<div class="line lvl-${esc(l.level)}" data-request-id="${esc(l.request_id || "")}">` +
        `<span class="meta">${clock(l.time)} ${esc(l.level || "")} ${[l.application, l.deployment, l.replica].filter(Boolean).map(esc).join("/")}</span> ` +
        `${l.request_id ? requestLink(l.request_id) + " " : ""}${esc(l.message)}</div>`).join("")
        : `<div class="meta">No lines match${f.request_id ? ` request id ${esc(f.request_id)}` : ""} in this window yet.</div>`;
      root.querySelector("#log-count").textContent = `${lines.length} line${lines.length === 1 ? "" : "s"}${lines.length >= 500 ? " (the latest 500)" : ""}`;
      if (!loaded || atBottom) box.scrollTop = box.scrollHeight;
      loaded = true;
    },
  };
}

// ---------------------------------------------------------------- events
export function events(root, _params, query) {
  root.innerHTML = `<h1>Events</h1>
    <div class="toolbar"><div class="field"><label for="e-app">Application</label><select id="e-app"></select></div>
    <div class="field"><label for="e-kind">Kind</label><select id="e-kind"><option value="">all kinds</option></select></div></div>
    <section class="panel"><div id="ev-list" class="muted">Loading&hellip;</div></section>`;
  const appSel = root.querySelector("#e-app"), kindSel = root.querySelector("#e-kind");
  let all = [];
  let since = Math.floor(Date.now() / 1000) - 86400;
  const kinds = new Set();
  const draw = () => {
    const shown = all.filter((e) => (!appSel.value || e.application === appSel.value) && (!kindSel.value || e.kind === kindSel.value));
    root.querySelector("#ev-list").innerHTML = shown.length ? eventList(shown.slice().reverse()) : "No events.";
  };
  appSel.innerHTML = options([], "", "all applications");
  appNames().then((apps) => { appSel.innerHTML = options(Object.keys(apps).sort(), query.get("application") || "", "all applications"); draw(); }).catch(() => {});
  appSel.addEventListener("change", draw);
  kindSel.addEventListener("change", draw);
  return {
    async refresh() {
      const data = await get("/api/events" + q({ since }));
      const fresh = (data.events || []).filter((e) => !all.length || e.time > all[all.length - 1].time ||
        (e.time === all[all.length - 1].time && e.message !== all[all.length - 1].message));
      if (fresh.length) {
        all = all.concat(fresh).slice(-2000);
        since = all[all.length - 1].time;
        for (const e of fresh) if (!kinds.has(e.kind)) {
          kinds.add(e.kind);
          kindSel.insertAdjacentHTML("beforeend", `<option>${esc(e.kind)}</option>`);
        }
      }
      draw();
    },
  };
}

// ---------------------------------------------------------------- config
export function config(root, [selected]) {
  root.innerHTML = `<h1>Config</h1>
    <div class="toolbar"><div class="field"><label for="c-app">Application</label><select id="c-app"></select></div></div>
    <div id="c-body"></div>`;
  const sel = root.querySelector("#c-app");
  sel.addEventListener("change", () => { window.location.hash = sel.value ? `#/config/${enc(sel.value)}` : "#/config"; });
  let shownVersion = null;
  return {
    async refresh() {
      const apps = await appNames();
      if (!sel.options.length || sel.options.length !== Object.keys(apps).length + 1) {
        sel.innerHTML = options(Object.keys(apps).sort(), selected || "", "whole instance (YAML)");
      }
      if (!selected) {
        if (shownVersion === "yaml") return;
        const text = (await call("GET", "/api/config?format=yaml")).data;
        root.querySelector("#c-body").innerHTML = `<section class="panel"><h2>Live config</h2>
          <p class="muted">What <code>fleet config</code> prints; <code>fleet apply</code> takes it back.</p>
          <pre class="diff" id="c-yaml">${esc(text)}</pre></section>`;
        shownVersion = "yaml";
        return;
      }
      const [{ data: st, etag }, revs, whole] = await Promise.all([
        call("GET", `/api/applications/${enc(selected)}`),
        get(`/api/applications/${enc(selected)}/revisions`).catch(() => ({ revisions: [] })),
        get("/api/config")]);
      const live = (whole.applications || []).find((a) => a.name === selected) || {};
      const key = `${etag}|${(revs.revisions || []).length}|${st.status}`;
      if (key === shownVersion) return;
      const editing = root.querySelector("#c-edit");
      if (editing && editing.dataset.dirty === "1") {      // never lose what is being typed
        root.querySelector("#c-status").innerHTML = badge(st.status);
        return;
      }
      shownVersion = key;
      renderApp(root.querySelector("#c-body"), selected, st, etag, revs.revisions || [], live);
    },
  };
}

function renderApp(body, name, st, etag, revisions, live) {
  const list = revisions.slice().sort((a, b) => b.revision - a.revision);
  const current = list[0];
  const { name: _name, ...editable } = live;
  const currentText = configText(editable);
  const yaml = (r) => r.config ? yamlText(r.config) : "# deployed from Python: no config file";
  body.innerHTML = `<section class="panel"><div class="panel-head"><h2>${esc(name)} <span id="c-status">${badge(st.status)}</span></h2>
      <span class="muted">version <code>${esc((etag || "").replace(/"/g, ""))}</code></span></div>
    <p class="muted">Edit this application's config (JSON, the shape of one <code>applications:</code> entry) and apply it.
      A failed update never takes down what is serving.${live.import_path ? "" : ` It was deployed from Python:
      give it an <code>import_path</code> (<code>module:application</code>) to apply it from here.`}</p>
    <textarea id="c-edit" rows="14" spellcheck="false" aria-label="Config of ${esc(name)}">${esc(currentText)}</textarea>
    <div class="toolbar" style="margin-top:8px"><button class="primary" id="c-apply">Apply&hellip;</button>
      <button id="c-reset">Discard edits</button></div></section>
    <section class="panel"><h2>Revisions</h2>${list.length ? list.map((r, i) => `<div class="revision" data-revision="${r.revision}">
      <div class="panel-head"><h3>Revision ${r.revision} ${r.status ? badge(r.status) : ""}</h3>
        <span class="muted">${when(r.time)}${r.note ? " &middot; " + esc(r.note) : ""}
        ${r.status !== "current" ? `<button class="small" data-rollback="${r.revision}">Roll back to ${r.revision}&hellip;</button>` : ""}</span></div>
      ${list[i + 1] ? diffHtml(yaml(list[i + 1]), yaml(r)) : `<pre class="diff">${esc(yaml(r))}</pre>`}</div>`).join("")
      : '<p class="muted">No revision recorded.</p>'}</section>`;
  const edit = body.querySelector("#c-edit");
  edit.addEventListener("input", () => { edit.dataset.dirty = "1"; });
  body.querySelector("#c-reset").addEventListener("click", () => { edit.value = currentText; edit.dataset.dirty = ""; });
  body.querySelector("#c-apply").addEventListener("click", async () => {
    let parsed;
    try {
      parsed = JSON.parse(edit.value);
    } catch (exc) {
      toast(`The config is not valid JSON: ${exc.message}`, true);
      return;
    }
    const ok = await confirmAction(`Apply config to ${name}?`, `<p>What changes against the live config:</p>
      ${diffHtml(yamlText(editable), yamlText(parsed))}<p class="muted">Deployments whose code, arguments or options changed get new
      replicas one by one; replica counts and user_config change in place.</p>`, "Apply");
    if (!ok) return;
    const done = await act(`Apply ${name}`, () => call("PUT", `/api/applications/${enc(name)}`, parsed, etag ? { "if-match": etag } : {}));
    if (done) { edit.dataset.dirty = ""; refreshSoon(); }
  });
  body.querySelectorAll("[data-rollback]").forEach((btn) => btn.addEventListener("click", async () => {
    const to = Number(btn.dataset.rollback);
    const target = list.find((r) => r.revision === to);
    const live = list.find((r) => r.status === "current") || current;
    const ok = await confirmAction(`Roll back ${name} to revision ${to}?`, `<p>Deploys revision ${to} again as a new revision.
      What changes against revision ${live.revision}:</p>${diffHtml(yaml(live), yaml(target))}`, "Roll back");
    if (ok && await act(`Roll back ${name} to ${to}`, () => post(`/api/applications/${enc(name)}/rollback`, { to }))) refreshSoon();
  }));
}

// ---------------------------------------------------------------- playground
export function playground(root, _params, query) {
  root.innerHTML = `<h1>Playground</h1>
    <form class="panel" id="pg-form">
      <div class="row"><div class="field"><label for="pg-app">Application</label><select id="pg-app"></select></div>
        <div class="field"><label for="pg-method">Method</label><select id="pg-method">
          ${["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"].map((m) => `<option>${m}</option>`).join("")}</select></div>
        <div class="field grow"><label for="pg-path">Path</label><input id="pg-path" value="/" required></div></div>
      <div class="grid two" style="margin-top:8px">
        <div class="field"><label for="pg-headers">Headers, one "Name: value" a line</label><textarea id="pg-headers" rows="4" spellcheck="false"></textarea></div>
        <div class="field"><label for="pg-body">Body</label><textarea id="pg-body" rows="4" spellcheck="false"></textarea></div></div>
      <div class="toolbar" style="margin-top:8px"><button type="submit" class="primary" id="pg-send">Send</button></div>
    </form>
    <section class="panel" id="pg-result" hidden></section>`;
  const appSel = root.querySelector("#pg-app"), path = root.querySelector("#pg-path");
  let apps = {}, proxy = null;
  get("/api/instance").then((inst) => { proxy = (inst.proxies || {}).http || null; }).catch(() => {});
  appNames().then((a) => {
    apps = a;
    const http = Object.keys(a).filter((n) => (a[n].protocol || "http") === "http" && a[n].route_prefix).sort();
    appSel.innerHTML = options(http, query.get("app") || http[0] || "", "(any path)");
    if (appSel.value) path.value = a[appSel.value].route_prefix;
  }).catch(() => {});
  appSel.addEventListener("change", () => { if (appSel.value) path.value = apps[appSel.value].route_prefix; });
  root.querySelector("#pg-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const headers = {};
    for (const line of root.querySelector("#pg-headers").value.split("\n")) {
      const i = line.indexOf(":");
      if (line.trim() && i > 0) headers[line.slice(0, i).trim()] = line.slice(i + 1).trim();
    }
    const spec = { method: root.querySelector("#pg-method").value, path: path.value, headers, body: root.querySelector("#pg-body").value };
    const out = root.querySelector("#pg-result");
    out.hidden = false;
    out.innerHTML = `<p class="muted">Sending&hellip;</p>`;
    try {
      const r = await post("/api/playground", spec);
      out.innerHTML = resultHtml(r, spec, proxy);
    } catch (exc) {
      out.innerHTML = `<div class="error-box">${esc(exc.message)}</div>`;
    }
  });
  return {};
}

function resultHtml(r, spec, proxy) {
  const ok = r.status < 400;
  const base = proxy ? `http://${proxy.host === "0.0.0.0" ? "127.0.0.1" : proxy.host}:${proxy.port}` : "http://127.0.0.1:8000";
  const url = base + spec.path;
  const sh = (s) => `'${s.replace(/'/g, `'\\''`)}'`;
  const curl = ["curl", "-i", "-X", spec.method, ...Object.entries(spec.headers).flatMap(([k, v]) => ["-H", sh(`${k}: ${v}`)]),
    ...(spec.body ? ["--data-binary", sh(spec.body)] : []), sh(url)].join(" ");
  const py = `import httpx\n\nreply = httpx.request(${JSON.stringify(spec.method)}, ${JSON.stringify(url)}` +
    (Object.keys(spec.headers).length ? `,\n    headers=${JSON.stringify(spec.headers)}` : "") +
    (spec.body ? `,\n    content=${JSON.stringify(spec.body)}` : "") + `)\nprint(reply.status_code, reply.text)`;
  return `<div class="stats">
      <div class="stat" id="pg-status"><b><span class="state ${ok ? "ok" : "bad"}"><span aria-hidden="true">${ok ? "\u2714" : "\u2716"}</span>${esc(r.status)}</span></b><span>status</span></div>
      <div class="stat"><b>${r.latency_ms.toFixed(1)} ms</b><span>latency</span></div>
      <div class="stat"><b id="pg-rid">${requestLink(r.request_id) || "\u2013"}</b><span>request id (its log lines)</span></div></div>
    <h3>Body${r.truncated ? " (first MiB)" : ""}</h3><pre class="diff" id="pg-body-out">${esc(r.body)}</pre>
    <details><summary>Headers</summary><table>${r.headers.map(([k, v]) => `<tr><th>${esc(k)}</th><td class="mono">${esc(v)}</td></tr>`).join("")}</table></details>
    <h3 style="margin-top:10px">As curl</h3><pre class="diff" id="pg-curl">${esc(curl)}</pre>
    <h3 style="margin-top:10px">As Python</h3><pre class="diff" id="pg-python">${esc(py)}</pre>`;
}

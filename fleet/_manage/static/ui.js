// Small helpers shared by the pages: escaping, state badges, number formats, the
// confirm dialog and the toast.

export function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => (
    { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// Every state reads without colour: an icon and the word itself go with the colour.
const STATES = {
  RUNNING: ["ok", "\u2714"], HEALTHY: ["ok", "\u2714"], READY: ["ok", "\u2714"],
  DEPLOYING: ["warn", "\u21bb"], UPDATING: ["warn", "\u21bb"], STARTING: ["warn", "\u21bb"],
  UPSCALING: ["warn", "\u2191"], DOWNSCALING: ["warn", "\u2193"], RECONFIGURING: ["warn", "\u21bb"],
  DEPLOY_FAILED: ["bad", "\u2716"], UNHEALTHY: ["bad", "!"], FAILED: ["bad", "\u2716"],
  STOPPING: ["idle", "\u25a0"], DELETING: ["idle", "\u232b"], STOPPED: ["idle", "\u25a0"],
  NOT_STARTED: ["idle", "\u25cb"], CURRENT: ["ok", "\u2714"], SUPERSEDED: ["idle", "\u25cb"],
};

export function stateKind(state) {
  return (STATES[String(state).toUpperCase()] || ["idle"])[0];
}

export function badge(state) {
  const [kind, icon] = STATES[String(state).toUpperCase()] || ["idle", "?"];
  return `<span class="state ${kind}" data-state="${esc(state)}"><span aria-hidden="true">${icon}</span>${esc(state || "UNKNOWN")}</span>`;
}

export function num(v, digits = 1) {
  if (v === undefined || v === null || Number.isNaN(v)) return "\u2013";
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en");
  return Number(v).toFixed(digits).replace(/\.0+$/, "");
}

export function ms(seconds) {
  if (seconds === undefined || seconds === null) return "\u2013";
  const v = seconds * 1000;
  return v < 10 ? `${v.toFixed(2)} ms` : `${Math.round(v)} ms`;
}

export function pct(fraction) {
  if (fraction === undefined || fraction === null) return "\u2013";
  return `${(fraction * 100).toFixed(fraction && fraction < 0.01 ? 2 : 1)}%`;
}

export function bytes(n) {
  if (!n && n !== 0) return "\u2013";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(s) {
  if (s === undefined || s === null) return "\u2013";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function clock(t) {
  if (!t) return "\u2013";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  return d.toLocaleTimeString("en-GB", { hour12: false });
}

export function when(t) {
  if (!t) return "\u2013";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  return d.toLocaleString("en-GB", { hour12: false });
}

// First present key of obj among names (the API's rows name a few figures in more
// than one way across versions; the page reads whichever is there).
export function pick(obj, ...names) {
  if (!obj) return undefined;
  for (const n of names) if (obj[n] !== undefined && obj[n] !== null) return obj[n];
  return undefined;
}

export function requestLink(id) {
  if (!id) return "";
  return `<a class="rid mono" href="#/logs?request_id=${encodeURIComponent(id)}" title="this request's log lines">${esc(id)}</a>`;
}

let toastTimer = null;
export function toast(text, bad = false) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.className = bad ? "toast bad" : "toast";
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, bad ? 9000 : 4000);
}

// The in-page confirm dialog: title, HTML saying what will change, the button's word.
// Resolves true when confirmed.
export function confirmAction(title, bodyHtml, okLabel = "Confirm", danger = false) {
  const dlg = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-body").innerHTML = bodyHtml;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = okLabel;
  ok.className = danger ? "danger" : "primary";
  dlg.returnValue = "";
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
    dlg.showModal();
    document.getElementById("confirm-cancel").focus();
  });
}

// Run an action's API call; say what happened in the toast.
export async function act(label, fn) {
  try {
    await fn();
    toast(`${label}: accepted`);
    return true;
  } catch (exc) {
    toast(`${label} failed: ${exc.message}`, true);
    return false;
  }
}

// A line diff of two texts (longest common subsequence; configs are short).
export function diffLines(a, b) {
  const x = a.split("\n"), y = b.split("\n");
  const n = x.length, m = y.length;
  if (n * m > 4e6) return [...x.map((l) => ["del", l]), ...y.map((l) => ["add", l])];
  const L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { out.push(["same", x[i]]); i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) out.push(["del", x[i++]]);
    else out.push(["add", y[j++]]);
  }
  while (i < n) out.push(["del", x[i++]]);
  while (j < m) out.push(["add", y[j++]]);
  return out;
}

export function diffHtml(a, b, context = 3) {
  const lines = diffLines(a, b);
  if (!lines.some(([k]) => k !== "same")) return `<p class="muted">No change.</p>`;
  const keep = lines.map(([k], i) => k !== "same" ||
    lines.slice(Math.max(0, i - context), i + context + 1).some(([kk]) => kk !== "same"));
  let html = "", skipped = false;
  lines.forEach(([k, l], i) => {
    if (!keep[i]) { if (!skipped) html += `<div class="same muted">\u2026</div>`; skipped = true; return; }
    skipped = false;
    html += `<div class="${k}">${esc(l)}</div>`;
  });
  return `<div class="diff">${html}</div>`;
}

// A config as YAML (keys in their order), for reading and diffing revisions.
export function yamlText(value, indent = "") {
  const scalar = (v) => {
    if (v === null || v === undefined) return "null";
    if (typeof v === "string") return /^[\w./:@-]+$/.test(v) && !/^(true|false|null|yes|no|on|off|[-\d.]+)$/i.test(v) ? v : JSON.stringify(v);
    return String(v);
  };
  const empty = (v) => (Array.isArray(v) && !v.length) || (v && typeof v === "object" && !Object.keys(v).length);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return value.map((v) => {
      if (v && typeof v === "object" && !empty(v)) {
        const inner = yamlText(v, indent + "  ");
        return `${indent}- ${inner.slice(indent.length + 2)}`;
      }
      return `${indent}- ${empty(v) ? JSON.stringify(v) : scalar(v)}`;
    }).join("\n");
  }
  if (value && typeof value === "object") {
    if (!Object.keys(value).length) return "{}";
    return Object.entries(value).map(([k, v]) => v && typeof v === "object" && !empty(v)
      ? `${indent}${k}:\n${yamlText(v, indent + "  ")}`
      : `${indent}${k}: ${empty(v) ? JSON.stringify(v) : scalar(v)}`).join("\n");
  }
  return indent + scalar(value);
}

// A config as indented JSON, for the editor.
export function configText(value) {
  return JSON.stringify(value, null, 2);
}

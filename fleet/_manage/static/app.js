// The dashboard's shell: hash routes to pages, one refresh a second for the page shown
// (never two at once), and the live indicator.

import { overview, application, deployment } from "./pages_apps.js";
import { logs, events, config, playground } from "./pages_more.js";

const ROUTES = [
  [/^\/?$/, overview, "overview"],
  [/^\/app\/([^/]+)\/dep\/([^/]+)$/, deployment, "overview"],
  [/^\/app\/([^/]+)$/, application, "overview"],
  [/^\/logs$/, logs, "logs"],
  [/^\/events$/, events, "events"],
  [/^\/config(?:\/([^/]+))?$/, config, "config"],
  [/^\/playground$/, playground, "playground"],
];
const REFRESH_MS = 1000;

let current = null;
let generation = 0;

function parse() {
  const raw = window.location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return { path, query: new URLSearchParams(query || "") };
}

async function show() {
  const { path, query } = parse();
  if (current && current.unmount) current.unmount();
  current = null;
  const gen = ++generation;
  // each page draws into an element of its own, so a refresh of the page before, still
  // in flight, writes into a detached element and never into this one
  const root = document.createElement("div");
  root.className = "view";
  document.getElementById("page").replaceChildren(root);
  let found = null;
  for (const [re, page, nav] of ROUTES) {
    const m = path.match(re);
    if (m) { found = [page, m.slice(1).map((p) => p && decodeURIComponent(p)), nav]; break; }
  }
  document.querySelectorAll("#nav a").forEach((a) =>
    a.classList.toggle("active", !!found && a.dataset.page === found[2]));
  if (!found) {
    root.innerHTML = `<p>No page at <code>#${path}</code>. <a href="#/">Overview</a></p>`;
    return;
  }
  const [page, params] = found;
  const view = page(root, params, query);
  if (gen !== generation) return;
  view.root = root;
  current = view;
  document.getElementById("page").focus({ preventScroll: true });
  await tick(view);
}

let inFlight = false;
let again = false;
async function tick(view = current) {
  if (!view) return;
  if (inFlight) { again = true; return; }     // once the one in flight is done
  inFlight = true;
  const live = document.getElementById("live");
  const banner = document.getElementById("banner");
  try {
    if (view.refresh) await view.refresh();
    if (view === current) view.root.dataset.ready = "1";   // drawn from the API at least once
    live.classList.remove("stale");
    live.querySelector(".live-text").textContent = "live";
    banner.hidden = true;
  } catch (exc) {
    live.classList.add("stale");
    live.querySelector(".live-text").textContent = "not updating";
    banner.textContent = exc.message;
    banner.hidden = false;
  } finally {
    inFlight = false;
  }
  if (again) {
    again = false;
    tick();
  }
}

window.addEventListener("hashchange", show);
setInterval(() => { if (!document.hidden) tick(); }, REFRESH_MS);
// a page may ask for an update at once after an action (scale, restart, rollback)
window.addEventListener("fleet:refresh", () => tick());
show();

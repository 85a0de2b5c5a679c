// An application's graph as SVG: deployments in layers by their longest path from the
// ingress side (left to right, or top to bottom on narrow screens), arrows for handles.

import { esc, stateKind } from "./ui.js";

const W = 200, H = 66, GAP_LAYER = 80, GAP_NODE = 22, PAD = 12;
const ICON = { ok: "\u2714", warn: "\u21bb", bad: "\u2716", idle: "\u25a0" };

export function layers(nodes, edges) {
  const names = nodes.map((n) => n.deployment);
  const incoming = new Map(names.map((n) => [n, 0]));
  for (const e of edges) if (incoming.has(e.to)) incoming.set(e.to, incoming.get(e.to) + 1);
  const depth = new Map();
  const roots = names.filter((n) => incoming.get(n) === 0);
  const start = roots.length ? roots : names.filter((n) => nodes.find((x) => x.deployment === n).ingress);
  (start.length ? start : names.slice(0, 1)).forEach((n) => depth.set(n, 0));
  // longest path, bounded by the node count so a cycle cannot loop forever
  for (let round = 0; round < names.length; round++) {
    let changed = false;
    for (const e of edges) {
      if (!depth.has(e.from) || !incoming.has(e.to)) continue;
      const d = depth.get(e.from) + 1;
      if (d < names.length && (depth.get(e.to) ?? -1) < d) { depth.set(e.to, d); changed = true; }
    }
    if (!changed) break;
  }
  names.forEach((n) => { if (!depth.has(n)) depth.set(n, 0); });
  const out = [];
  for (const n of names) {
    const d = depth.get(n);
    (out[d] = out[d] || []).push(n);
  }
  return out.filter(Boolean);
}

export function drawGraph(graph, app, narrow) {
  const { nodes, edges } = graph;
  if (!nodes.length) return `<p class="muted">No deployments.</p>`;
  const rows = layers(nodes, edges);
  const pos = new Map();
  // order each layer by its parents' mean position, so edges cross less
  rows.forEach((layer, li) => {
    if (li > 0) {
      const rank = (n) => {
        const ps = edges.filter((e) => e.to === n && pos.has(e.from)).map((e) => pos.get(e.from).i);
        return ps.length ? ps.reduce((a, b) => a + b, 0) / ps.length : 0;
      };
      layer.sort((a, b) => rank(a) - rank(b));
    }
    layer.forEach((n, i) => pos.set(n, { li, i }));
  });
  const widest = Math.max(...rows.map((r) => r.length));
  const across = (count) => count * (narrow ? W : H) + (count - 1) * GAP_NODE;
  const span = across(widest);
  const place = (n) => {
    const { li, i } = pos.get(n);
    const offset = (span - across(rows[li].length)) / 2 + i * ((narrow ? W : H) + GAP_NODE);
    const along = li * ((narrow ? H : W) + GAP_LAYER);
    return narrow ? { x: PAD + offset, y: PAD + along } : { x: PAD + along, y: PAD + offset };
  };
  const width = 2 * PAD + (narrow ? span : rows.length * W + (rows.length - 1) * GAP_LAYER);
  const height = 2 * PAD + (narrow ? rows.length * H + (rows.length - 1) * GAP_LAYER : span);
  let svg = `<svg viewBox="0 0 ${width} ${height}" style="max-width:${width}px" role="img" aria-label="Graph of ${esc(app)}: ${nodes.length} deployments, ${edges.length} edges" data-nodes="${nodes.length}" data-edges="${edges.length}">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse"><path d="M0 0L10 5L0 10z" fill="#7d8698"/></marker></defs>`;
  for (const e of edges) {
    if (!pos.has(e.from) || !pos.has(e.to)) continue;
    const a = place(e.from), b = place(e.to);
    let d;
    if (narrow) {
      const x1 = a.x + W / 2, y1 = a.y + H, x2 = b.x + W / 2, y2 = b.y;
      d = `M${x1} ${y1} C${x1} ${y1 + GAP_LAYER / 2} ${x2} ${y2 - GAP_LAYER / 2} ${x2} ${y2}`;
    } else {
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
      d = `M${x1} ${y1} C${x1 + GAP_LAYER / 2} ${y1} ${x2 - GAP_LAYER / 2} ${y2} ${x2} ${y2}`;
    }
    svg += `<path class="edge" d="${d}" marker-end="url(#arrow)" data-from="${esc(e.from)}" data-to="${esc(e.to)}"><title>${esc(e.from)} holds a handle to ${esc(e.to)}</title></path>`;
  }
  for (const n of nodes) {
    const p = place(n.deployment);
    const kind = stateKind(n.status);
    const label = n.deployment.length > 24 ? n.deployment.slice(0, 23) + "\u2026" : n.deployment;
    svg += `<a href="#/app/${encodeURIComponent(app)}/dep/${encodeURIComponent(n.deployment)}" class="node${n.ingress ? " ingress" : ""}" data-deployment="${esc(n.deployment)}">
<title>${esc(n.deployment)}${n.ingress ? " (ingress)" : ""}: ${esc(n.status)}${n.message ? " \u2013 " + esc(n.message) : ""}</title>
<rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" rx="8"/>
<text x="${p.x + 10}" y="${p.y + 20}" font-weight="600">${esc(label)}${n.ingress ? ' <tspan class="sub">\u2192 ingress</tspan>' : ""}</text>
<text x="${p.x + 10}" y="${p.y + 38}" class="st-${kind}">${ICON[kind] || ""} ${esc(n.status)}</text>
<text x="${p.x + 10}" y="${p.y + 55}" class="sub">replicas ${n.running_replicas} running / ${n.target_replicas} target</text>
</a>`;
  }
  return svg + "</svg>";
}

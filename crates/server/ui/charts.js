// The daemon's metrics as charts: /metrics (Prometheus text) is read every few seconds, the
// console keeps the last samples in memory and draws each series as an inline SVG line.
// Counters are drawn as rates (per second between two samples).

import { fill, h, poll } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const KEEP = 90; // samples kept per series (3 minutes at one every 2 s)

/** Prometheus text → [{name, labels: {…}, value}] (comments and blank lines skipped). */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[k] = v.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** Sums the samples of `name` by the value of label `by` (one total when `by` is null). */
function sumBy(samples, name, by, filter = () => true) {
  const out = {};
  for (const s of samples) {
    if (s.name !== name || !filter(s.labels)) continue;
    const k = by ? s.labels[by] ?? "" : "total";
    out[k] = (out[k] ?? 0) + s.value;
  }
  return out;
}

/** The charts: title, unit, whether the values are counters (drawn as rates), and how to read them. */
const CHARTS = [
  { id: "sandboxes", title: "Sandboxes by state", unit: "", read: (s) => nonZero(sumBy(s, "moat_sandboxes", "state"), ["running", "suspended"]) },
  { id: "requests", title: "API requests", unit: "/s", rate: true, read: (s) => sumBy(s, "moat_http_requests_total", null) },
  { id: "memory", title: "Sandbox memory", unit: " MiB", read: (s) => sumBy(s, "moat_memory_mib", "kind") },
  { id: "vcpus", title: "vCPUs", unit: "", read: (s) => sumBy(s, "moat_vcpus", "kind") },
  { id: "pool", title: "Warm pool ready VMs", unit: "", read: (s) => sumBy(s, "moat_pool_ready", "group") },
  { id: "egress", title: "Egress connections", unit: "/s", rate: true, read: (s) => sumBy(s, "moat_egress_connections_total", "verdict") },
  { id: "policy", title: "Policy decisions", unit: "/s", rate: true, read: (s) => sumBy(s, "moat_policy_decisions_total", "verdict") },
];

/** Keeps the states that matter even at zero, and any other state once it is not zero. */
function nonZero(byState, always) {
  const out = {};
  for (const [k, v] of Object.entries(byState)) if (v || always.includes(k)) out[k] = v;
  return out;
}

export function metricsView(main) {
  const history = []; // [{t, values: {chartId: {series: value}}}]
  const grid = h("div", { class: "charts" });
  const msg = h("p", { role: "status", class: "status" });
  fill(
    main,
    h("h1", {}, "Metrics"),
    h("p", { class: "help" }, "From the daemon's /metrics, every 2 seconds; counters as rates per second. Everything: ", h("a", { href: "/metrics" }, "/metrics"), "."),
    msg,
    grid,
  );
  return poll(async () => {
    let text;
    try {
      const r = await fetch("/metrics");
      if (!r.ok) throw new Error(`/metrics answered ${r.status}`);
      text = await r.text();
    } catch (e) {
      msg.textContent = `Cannot read the metrics: ${e.message}`;
      return;
    }
    msg.textContent = "";
    const samples = parseMetrics(text);
    history.push({ t: Date.now() / 1000, values: Object.fromEntries(CHARTS.map((c) => [c.id, c.read(samples)])) });
    if (history.length > KEEP + 1) history.shift();
    fill(grid, CHARTS.map((c) => chart(c, series(c, history), history.length)));
  }, 2000);
}

/** A chart's series: name → [[t, y]], rates from consecutive samples for counters. */
function series(c, history) {
  const out = {};
  history.forEach((p, i) => {
    for (const [name, v] of Object.entries(p.values[c.id])) {
      if (c.rate) {
        const prev = history[i - 1]?.values[c.id][name];
        if (prev === undefined) continue;
        // A counter that went down means the daemon restarted: no rate for that interval.
        if (v < prev) continue;
        (out[name] ??= []).push([p.t, (v - prev) / (p.t - history[i - 1].t)]);
      } else {
        (out[name] ??= []).push([p.t, v]);
      }
    }
  });
  return out;
}

const fmt = (v) => (Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(2));

function chart(c, data, samples) {
  const W = 360;
  const H = 140;
  const PAD = { l: 44, r: 8, t: 8, b: 18 };
  const names = Object.keys(data).sort();
  const points = names.flatMap((n) => data[n]);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  const latest = names.map((n) => `${n} ${fmt(data[n].at(-1)[1])}${c.unit}`);
  svg.setAttribute("aria-label", `${c.title}: ${latest.join(", ") || "no data yet"}`);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    svg.append(el);
    return el;
  };
  if (points.length) {
    const t0 = Math.min(...points.map((p) => p[0]));
    const t1 = Math.max(...points.map((p) => p[0]), t0 + 1);
    const ymax = Math.max(...points.map((p) => p[1]), c.rate ? 0.1 : 1);
    const x = (t) => PAD.l + ((t - t0) / (t1 - t0)) * (W - PAD.l - PAD.r);
    const y = (v) => H - PAD.b - (v / ymax) * (H - PAD.t - PAD.b);
    for (const v of [0, ymax / 2, ymax]) {
      add("line", { x1: PAD.l, x2: W - PAD.r, y1: y(v), y2: y(v), class: "grid" });
      add("text", { x: PAD.l - 4, y: y(v) + 4, class: "axis", "text-anchor": "end" }, fmt(v));
    }
    add("text", { x: W - PAD.r, y: H - 4, class: "axis", "text-anchor": "end" }, "now");
    add("text", { x: PAD.l, y: H - 4, class: "axis" }, `${Math.round(t1 - t0)} s ago`);
    names.forEach((n, i) => {
      const d = data[n].map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      add("polyline", { points: d, class: `line line-${i % 6}` });
    });
  } else {
    add("text", { x: W / 2, y: H / 2, class: "axis", "text-anchor": "middle" }, samples < 2 ? "waiting for a second sample…" : "nothing recorded yet");
  }
  return h(
    "figure",
    { class: "card chart", id: `chart-${c.id}` },
    h("figcaption", {}, c.title),
    svg,
    h(
      "ul",
      { class: "legend" },
      names.map((n, i) => h("li", {}, h("span", { class: `swatch line-${i % 6}`, "aria-hidden": "true" }), `${n}: ${fmt(data[n].at(-1)[1])}${c.unit}`)),
    ),
  );
}

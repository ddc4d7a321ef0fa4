// Traffic over the last hour (GET /admin/stats), drawn with uPlot: requests per second,
// latency p50/p95, generated tokens per second and cache hit rate, for all traffic or per
// model / backend. Refreshed every 30 s: one small query per page, however busy the proxy is.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { api } from "./api.js";
import { h } from "./dom.js";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569"];
const REFRESH_MS = 30000;

const METRICS = [
  { key: "rps", title: "Requests per second", unit: "req/s" },
  { key: "latency", title: "Latency p50 / p95", unit: "ms" },
  { key: "tokens_per_second", title: "Tokens per second (generated)", unit: "tok/s" },
  { key: "cache_hit_rate", title: "Cache hit rate", unit: "%" },
];

function lines(stats, metric) {
  const byAll = stats.by === "none";
  const series = byAll ? stats.series.slice(0, 1) : stats.series.slice(1);
  const out = [];
  for (const s of series) {
    if (metric === "latency") {
      if (byAll) out.push({ label: "p50", values: s.p50_ms }, { label: "p95", values: s.p95_ms });
      else out.push({ label: `${s.key} p95`, values: s.p95_ms });
    } else if (metric === "cache_hit_rate") {
      out.push({ label: byAll ? "all" : s.key, values: s.cache_hit_rate.map((v) => (v === null ? null : v * 100)) });
    } else {
      out.push({ label: byAll ? "all" : s.key, values: s[metric] });
    }
  }
  return out;
}

function latest(values) {
  for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] !== null && values[i] !== undefined) return values[i];
  return null;
}

export class Charts {
  constructor() {
    this.by = "none";
    this.plots = [];
    this.grid = h("div", { class: "charts" });
    const select = h("select", { id: "chart-by", onchange: () => { this.by = select.value; this.refresh(); } },
      h("option", { value: "none" }, "all traffic"),
      h("option", { value: "model" }, "model"),
      h("option", { value: "backend" }, "backend"));
    this.note = h("p", { class: "muted" }, "Loading…");
    this.el = h("div", {},
      h("p", { class: "controls" }, h("label", { for: "chart-by" }, "Last hour, per "), select),
      this.note, this.grid);
    this.timer = setInterval(() => this.refresh(), REFRESH_MS);
    this.resize = new ResizeObserver(() => this.fit());
    this.resize.observe(this.grid);
    this.refresh();
  }

  async refresh() {
    let stats;
    try {
      stats = await api(`/admin/stats?window=3600&step=60&by=${this.by}`);
    } catch (err) {
      this.note.textContent = `No chart data: ${err.message}`;
      return;
    }
    const total = stats.series[0].requests.reduce((a, b) => a + b, 0);
    this.note.textContent = total ? `${total} requests in the last hour, in one-minute steps.` : "No requests in the last hour yet.";
    for (const plot of this.plots) plot.plot.destroy();
    this.plots = [];
    this.grid.replaceChildren();
    const xs = stats.t;
    for (const metric of METRICS) {
      const data = lines(stats, metric.key);
      const now = data.map((d) => `${d.label} ${fmt(latest(d.values), metric.unit)}`).join(", ");
      const box = h("div", { class: "plot" });
      const figure = h("figure", { class: "chart", "aria-label": metric.title },
        h("figcaption", {}, metric.title, h("span", { class: "muted" }, ` (now: ${now || "–"})`)), box);
      this.grid.append(figure);
      const opts = {
        width: Math.max(240, box.clientWidth || 300),
        height: 170,
        legend: { show: data.length > 1 },
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max || 0, metric.unit === "%" ? 100 : 1)] } },
        axes: [{ stroke: "#64748b" }, { stroke: "#64748b", size: 48 }],
        series: [{}, ...data.map((d, i) => ({ label: d.label, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: false,
          // Latency and hit rate have gaps (no requests, no value): points keep a lone minute visible.
          points: { show: metric.key === "latency" || metric.key === "cache_hit_rate", size: 5 } }))],
      };
      const plot = new uPlot(opts, [xs, ...data.map((d) => d.values)], box);
      this.plots.push({ plot, box });
    }
    this.fit();
  }

  fit() {
    for (const { plot, box } of this.plots) {
      const width = Math.max(240, Math.floor(box.clientWidth));
      if (Math.abs(plot.width - width) > 2) plot.setSize({ width, height: 170 });
    }
  }

  destroy() {
    clearInterval(this.timer);
    this.resize.disconnect();
    for (const { plot } of this.plots) plot.destroy();
  }
}

function fmt(value, unit) {
  if (value === null || value === undefined) return "–";
  const n = unit === "ms" || unit === "%" ? Math.round(value) : Math.round(value * 100) / 100;
  return `${n} ${unit}`;
}

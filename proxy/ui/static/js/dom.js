// Building the page without ever parsing API data as HTML: every value becomes a text node.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, ""); // the attribute, so form.reset() returns to it
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function text(value) {
  return document.createTextNode(value === null || value === undefined ? "" : String(value));
}

// A table with a caption (its accessible name), a header row, and a keyed body that keeps rows whose
// data did not change, so a button under the pointer is not swapped for a new one on every update.
export class KeyedTable {
  constructor(caption, headings, { empty = "Nothing yet.", showCaption = false } = {}) {
    this.body = h("tbody");
    this.emptyText = empty;
    this.rows = new Map();
    this.table = h("table", {},
      h("caption", { class: showCaption ? null : "sr-only" }, caption),
      h("thead", {}, h("tr", {}, headings.map((t) => h("th", { scope: "col" }, t)))),
      this.body);
    this.colspan = headings.length;
    this.el = h("div", { class: "scroll" }, this.table);
  }

  update(items, key, build) {
    const next = new Map();
    const nodes = [];
    for (const item of items) {
      const id = key(item);
      const sig = JSON.stringify(item);
      const old = this.rows.get(id);
      const row = old && old.sig === sig ? old : { sig, el: build(item) };
      next.set(id, row);
      nodes.push(row.el);
    }
    this.rows = next;
    if (!nodes.length) nodes.push(h("tr", {}, h("td", { colspan: this.colspan, class: "empty" }, this.emptyText)));
    // Move only what moved: replaceChildren would detach rows that stay.
    nodes.forEach((node, i) => {
      if (this.body.children[i] !== node) this.body.insertBefore(node, this.body.children[i] || null);
    });
    while (this.body.children.length > nodes.length) this.body.lastElementChild.remove();
  }
}

export function progressBar(fraction, label, detail) {
  const pct = Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)));
  const bar = h("div", {
    role: "progressbar", "aria-label": label, "aria-valuemin": "0", "aria-valuemax": "100",
    "aria-valuenow": String(pct), "aria-valuetext": `${pct}%${detail ? ", " + detail : ""}`, class: "bar",
  }, h("div", { class: "fill" }));
  bar.firstChild.style.width = `${pct}%`; // CSSOM, which the CSP allows (no style attribute is parsed)
  return h("div", { class: "progress" }, bar, h("span", { class: "progress-text" }, `${pct}%${detail ? " · " + detail : ""}`));
}

export function badge(state) {
  return h("span", { class: `badge state-${String(state).replace(/[^a-z_]/g, "")}` }, state);
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(1)} ${units[i]}`;
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

export function clock(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString([], { hour12: false });
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? clock(iso) : d.toLocaleString([], { hour12: false });
}

export function transfer(op) {
  const parts = [];
  if (op.total) parts.push(`${bytes(op.completed)} of ${bytes(op.total)}`);
  if (op.speed) parts.push(`${bytes(op.speed)}/s`);
  if (op.eta_seconds !== null && op.eta_seconds !== undefined && ["queued", "running"].includes(op.state)) {
    parts.push(`ETA ${seconds(op.eta_seconds)}`);
  }
  return parts.join(" · ");
}

export function section(title, ...children) {
  const id = "h-" + title.toLowerCase().replace(/[^a-z0-9]+/g, "-");
  return h("section", { "aria-labelledby": id }, h("h2", { id }, title), ...children);
}

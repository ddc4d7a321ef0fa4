// Requests: the history with filters and cursor paging, a live tail, and one request in detail.

import { api } from "../api.js";
import { KeyedTable, badge, h, section, seconds, when } from "../dom.js";

const PAGE = 50;

export function mount(root, { store, notify }) {
  let rows = [];
  let next = null;
  let filters = {};
  const table = new KeyedTable("Requests",
    ["Started", "Request", "Endpoint", "Model", "Backend", "Status", "HTTP", "Duration", "First token", "Tokens", "Cache"],
    { empty: "No requests match." });
  const field = (id, labelText, control) => h("p", { class: "field" }, h("label", { for: id }, labelText), control);
  const model = h("input", { id: "f-model", name: "model", autocomplete: "off" });
  const backend = h("select", { id: "f-backend", name: "backend" }, h("option", { value: "" }, "any"));
  const status = h("select", { id: "f-status", name: "status" }, h("option", { value: "" }, "any"),
    ["ok", "error", "in_progress", "cancelled", "interrupted"].map((s) => h("option", { value: s }, s)));
  const since = h("input", { id: "f-since", name: "since", type: "datetime-local" });
  const until = h("input", { id: "f-until", name: "until", type: "datetime-local" });
  const tail = h("input", { id: "f-tail", type: "checkbox", checked: true });
  const form = h("form", { class: "filters", "aria-label": "Filter requests" },
    field("f-model", "Model", model), field("f-backend", "Backend", backend), field("f-status", "Status", status),
    field("f-since", "From", since), field("f-until", "Until", until),
    h("p", { class: "field buttons" }, h("button", { type: "submit", class: "primary" }, "Apply"),
      h("button", { type: "button", onclick: () => { form.reset(); tail.checked = true; load(); } }, "Clear")));
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  const older = h("button", { type: "button", hidden: true, onclick: () => load(next) }, "Load older");
  const summary = h("p", { class: "muted", role: "status" });
  const detail = h("section", { "aria-label": "Request detail", class: "detail", hidden: true });

  root.append(
    h("h1", {}, "Requests"),
    section("History", form, h("p", { class: "controls" }, h("label", {}, tail, " Live tail (new requests appear as they come)")),
      summary, table.el, h("p", {}, older)),
    detail,
  );

  function query(cursor) {
    const params = new URLSearchParams({ limit: String(PAGE) });
    for (const [k, v] of Object.entries(filters)) params.set(k, v);
    if (cursor) params.set("cursor", cursor);
    return `/admin/history/requests?${params}`;
  }

  async function load(cursor = null) {
    if (!cursor) {
      filters = {};
      if (model.value.trim()) filters.model = model.value.trim();
      if (backend.value) filters.backend = backend.value;
      if (status.value) filters.status = status.value;
      if (since.value) filters.since = new Date(since.value).toISOString();
      if (until.value) filters.until = new Date(until.value).toISOString();
    }
    try {
      const page = await api(query(cursor));
      rows = cursor ? [...rows, ...page.data.filter((r) => !rows.some((x) => x.id === r.id))] : page.data;
      next = page.next;
      render();
    } catch (err) { notify(`Could not load the history: ${err.message}`, "error"); }
  }

  function matches(r) {
    if (filters.model && r.requested_model !== filters.model && r.resolved_model !== filters.model) return false;
    if (filters.backend && r.backend !== filters.backend) return false;
    if (filters.status && r.status !== filters.status) return false;
    if (filters.since && r.started_at < filters.since) return false;
    return !filters.until;
  }

  function merge(fresh) {
    if (!tail.checked) return;
    const newest = rows.length ? rows[0].started_at : "";
    let changed = false;
    for (const r of fresh) {
      const at = rows.findIndex((x) => x.id === r.id);
      if (at >= 0) {
        if (JSON.stringify(rows[at]) !== JSON.stringify(r)) { rows[at] = r; changed = true; }
      } else if (matches(r) && r.started_at >= newest) { rows.push(r); changed = true; }
    }
    if (changed) {
      rows.sort((a, b) => (a.started_at === b.started_at ? (a.id < b.id ? 1 : -1) : a.started_at < b.started_at ? 1 : -1));
      render();
    }
  }

  function tokens(r) {
    if (r.prompt_tokens === null && r.completion_tokens === null) return "–";
    return `${r.prompt_tokens ?? "?"} → ${r.completion_tokens ?? "?"}`;
  }

  function render() {
    summary.textContent = `${rows.length} request${rows.length === 1 ? "" : "s"} shown${next ? ", more are older" : ""}.`;
    older.hidden = !next;
    table.update(rows, (r) => r.id, (r) => h("tr", {},
      h("td", {}, h("time", { datetime: r.started_at }, when(r.started_at))),
      h("th", { scope: "row" }, h("button", { type: "button", class: "link mono", onclick: () => show(r.id) }, r.id)),
      h("td", {}, r.endpoint),
      h("td", {}, r.requested_model || "–", r.resolved_model && r.resolved_model !== r.requested_model ? ` → ${r.resolved_model}` : ""),
      h("td", {}, r.backend || "–"),
      h("td", {}, badge(r.status)),
      h("td", { class: "num" }, r.http_status ?? "–"),
      h("td", { class: "num" }, seconds(r.duration_seconds)),
      h("td", { class: "num" }, seconds(r.ttft_seconds)),
      h("td", { class: "num" }, tokens(r)),
      h("td", {}, r.endpoint.startsWith("/v1/") ? (r.cache_hit ? "hit" : "miss") : "–")));
  }

  async function show(id) {
    let r;
    try { r = await api(`/admin/history/requests/${encodeURIComponent(id)}`); } catch (err) { notify(err.message, "error"); return; }
    const item = (k, v) => [h("dt", {}, k), h("dd", {}, v === null || v === undefined || v === "" ? "–" : String(v))];
    const body = (title, value) => h("details", { open: true }, h("summary", {}, title),
      h("pre", {}, value === null || value === undefined ? "(not stored: bodies are kept only with history.capture_bodies on)" : prettify(value)));
    detail.replaceChildren(
      h("h2", {}, `Request ${r.id}`),
      h("dl", {},
        item("Endpoint", r.endpoint), item("Status", `${r.status}${r.http_status ? " (HTTP " + r.http_status + ")" : ""}`),
        item("Started", when(r.started_at)), item("Finished", when(r.finished_at)),
        item("Duration", seconds(r.duration_seconds)), item("First token", seconds(r.ttft_seconds)),
        item("Requested model", r.requested_model), item("Resolved model", r.resolved_model), item("Backend", r.backend),
        item("Attempts", r.attempts), item("Stream", r.stream ? "yes" : "no"), item("Cache", r.cache_hit ? "hit" : "miss"),
        item("Prompt tokens", r.prompt_tokens), item("Completion tokens", r.completion_tokens),
        item("Key id", r.key_id), item("Error", r.error)),
      body("Request body", r.request_body), body("Response body", r.response_body),
      h("p", {}, h("button", { type: "button", onclick: () => { detail.hidden = true; } }, "Close")));
    detail.hidden = false;
    detail.scrollIntoView({ block: "nearest" });
  }

  function prettify(text) {
    try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return text; }
  }

  let backendsFor = "";
  function update(kind) {
    if (kind === "requests") merge(store.requests);
    if (kind === "fleet" && store.fleet) {
      const names = store.fleet.backends.map((b) => b.name);
      if (names.join("\n") !== backendsFor) {
        backendsFor = names.join("\n");
        const keep = backend.value;
        backend.replaceChildren(h("option", { value: "" }, "any"), ...names.map((n) => h("option", { value: n }, n)));
        backend.value = keep;
      }
    }
  }
  store.listeners.add(update);
  update("fleet");
  load();
  return { unmount() { store.listeners.delete(update); } };
}

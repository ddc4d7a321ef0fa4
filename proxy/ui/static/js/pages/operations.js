// Operations: running and recent pulls, deletes, activations and syncs; cancel, retry, and one's event log.

import { api, subscribe } from "../api.js";
import { KeyedTable, badge, bytes, clock, h, progressBar, section, seconds, transfer, when } from "../dom.js";

const ACTIVE = new Set(["queued", "running"]);
const RETRYABLE = new Set(["failed", "cancelled", "interrupted"]);
const VERB = { pull: "Pulling", delete: "Deleting", activate: "Activating", sync: "Syncing" };

export function label(op) {
  return `${VERB[op.kind] || op.kind} ${op.model}${op.alias ? " for " + op.alias : ""}${op.node ? " on " + op.node : ""}`;
}

export function mount(root, { store, notify }) {
  const table = new KeyedTable("Operations", ["Operation", "State", "Progress", "Attempts", "Error", "Started", "Actions"],
    { empty: "No operations yet: pull a model from the Models page." });
  const stateFilter = h("select", { id: "op-state", onchange: () => update("fleet") },
    h("option", { value: "" }, "any state"),
    ["queued", "running", "succeeded", "failed", "cancelled", "interrupted"].map((s) => h("option", { value: s }, s)));
  const logTitle = h("h2", { id: "op-log-title" }, "Event log");
  const log = h("ol", { class: "log", "aria-label": "Event log" });
  const logSection = h("section", { "aria-labelledby": "op-log-title", hidden: true }, logTitle,
    h("p", { class: "muted" }, "Each line is one Server-Sent Event of GET /admin/operations/{id}/events."), log);
  let following = null;

  root.append(
    h("h1", {}, "Operations"),
    section("Running and recent", h("p", { class: "controls" }, h("label", { for: "op-state" }, "Show "), stateFilter), table.el),
    logSection,
  );

  async function act(op, verb) {
    try {
      if (verb === "cancel") await api(`/admin/operations/${encodeURIComponent(op.id)}`, { method: "DELETE" });
      else await api(`/admin/operations/${encodeURIComponent(op.id)}/retry`, { method: "POST" });
      notify(`${verb === "cancel" ? "Cancelled" : "Retrying"}: ${label(op)}.`);
    } catch (err) { notify(`Could not ${verb}: ${err.message}`, "error"); }
  }

  function follow(op) {
    if (following) following.stop();
    logSection.hidden = false;
    logTitle.textContent = `Event log: ${label(op)} (${op.id})`;
    log.replaceChildren();
    let last = "";
    following = subscribe(`/admin/operations/${encodeURIComponent(op.id)}/events`, (event, snap) => {
      const line = [snap.state, snap.status, snap.total ? `${Math.round(snap.fraction * 100)}% of ${bytes(snap.total)}` : "",
        snap.speed ? `${bytes(snap.speed)}/s` : "", snap.eta_seconds !== null && ACTIVE.has(snap.state) ? `ETA ${seconds(snap.eta_seconds)}` : "",
        snap.attempts > 1 ? `attempt ${snap.attempts}` : "", snap.error || ""].filter(Boolean).join(" · ");
      if (line === last) return;
      last = line;
      log.append(h("li", {}, h("time", {}, clock(new Date().toISOString())), " ", line));
      while (log.children.length > 500) log.firstElementChild.remove();
    }, { reconnect: false });
    logSection.scrollIntoView({ block: "nearest" });
  }

  function row(op) {
    const progress = op.kind === "pull" || op.total || op.fraction
      ? progressBar(op.fraction, label(op), [op.status, transfer(op)].filter(Boolean).join(" · "))
      : h("span", {}, op.status);
    return h("tr", {},
      h("th", { scope: "row" }, label(op)),
      h("td", {}, badge(op.state)),
      h("td", { class: "wide" }, progress),
      h("td", { class: "num" }, op.attempts),
      h("td", { class: "error-text" }, op.error || ""),
      h("td", {}, when(op.started_at || op.created_at)),
      h("td", { class: "actions" },
        ACTIVE.has(op.state) ? h("button", { type: "button", onclick: () => act(op, "cancel") }, "Cancel") : null,
        RETRYABLE.has(op.state) ? h("button", { type: "button", onclick: () => act(op, "retry") }, "Retry") : null,
        h("button", { type: "button", onclick: () => follow(op) }, "Log")));
  }

  function update(kind) {
    if (kind !== "fleet" || !store.fleet) return;
    const state = stateFilter.value;
    const ops = store.fleet.operations.filter((op) => !state || op.state === state);
    table.update(ops, (op) => op.id, row);
  }
  store.listeners.add(update);
  update("fleet");
  return { unmount() { store.listeners.delete(update); if (following) following.stop(); } };
}

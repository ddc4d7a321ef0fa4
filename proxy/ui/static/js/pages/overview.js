// Overview: every node and its health, aliases nobody serves (with a fix), recent changes, charts.

import { api } from "../api.js";
import { backendState } from "../changes.js";
import { Charts } from "../charts.js";
import { KeyedTable, badge, clock, h, section } from "../dom.js";

export function mount(root, { store, confirm, notify }) {
  const nodes = new KeyedTable("Nodes", ["Node", "State", "Kind", "Version", "Latency", "Error rate", "In flight", "Queued", "Serves", "Last error", "Actions"],
    { empty: "Waiting for the first report…" });
  const problems = h("div", { class: "problems" });
  const changes = h("ol", { class: "changes", "aria-label": "Recent changes" });
  const charts = new Charts();
  root.append(
    h("h1", {}, "Overview"),
    section("Nodes", nodes.el),
    section("Alias problems", problems),
    section("Recent changes", changes),
    section("Traffic", charts.el),
  );

  function renderNodes(fleet) {
    nodes.update(fleet.backends, (b) => b.name, (b) => h("tr", {},
      h("th", { scope: "row" }, b.name),
      h("td", {}, badge(backendState(b)), b.draining && b.state !== "online" ? ` (${b.state})` : ""),
      h("td", {}, b.kind),
      h("td", {}, b.version || "–"),
      h("td", { class: "num" }, b.latency_ms === null ? "–" : `${Math.round(b.latency_ms)} ms`),
      h("td", { class: "num" }, `${Math.round((b.error_rate || 0) * 100)}%`),
      h("td", { class: "num" }, b.in_flight),
      h("td", { class: "num" }, b.queue_depth),
      h("td", { class: "models" }, b.served_models.join(", ") || "–"),
      // An error from before the node recovered would only alarm: shown while it is not online.
      h("td", { class: "error-text" }, b.state !== "online" && b.last_error ? b.last_error : ""),
      h("td", {}, b.draining
        ? h("button", { type: "button", onclick: () => drain(b.name, false) }, "Resume")
        : h("button", { type: "button", onclick: () => drain(b.name, true) }, "Drain")),
    ));
  }

  async function drain(name, on) {
    if (on && !await confirm({
      title: `Drain ${name}`,
      body: [`${name} gets no new requests; those in flight finish. Other nodes serving the same models take its share.`,
        "Not kept across a restart of the proxy."],
      action: "Drain",
    })) return;
    try {
      await api(`/admin/nodes/${encodeURIComponent(name)}/${on ? "drain" : "resume"}`, { method: "POST" });
      notify(on ? `${name} is draining.` : `${name} takes requests again.`);
    } catch (err) { notify(`Could not ${on ? "drain" : "resume"} ${name}: ${err.message}`, "error"); }
  }

  let lastProblems = "";
  function renderProblems(fleet) {
    const mismatches = fleet.alias_mismatches || [];
    const sig = JSON.stringify(mismatches);
    if (sig === lastProblems) return;
    lastProblems = sig;
    if (!mismatches.length) {
      problems.replaceChildren(h("p", { class: "muted" }, "Every alias points to a model a reachable node serves."));
      return;
    }
    problems.replaceChildren(...mismatches.map((m) => mismatchCard(m)));
  }

  function mismatchCard(m) {
    const instead = Object.entries(m.served_instead);
    const choices = [...new Set(instead.flatMap(([, models]) => models))].sort();
    const selectId = `repoint-${m.alias.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    const select = h("select", { id: selectId }, choices.map((c) => h("option", { value: c }, c)));
    const activate = async (model, pull) => {
      const ok = await confirm({
        title: pull ? `Install ${model} and activate it for ${m.alias}` : `Repoint ${m.alias} to ${model}`,
        body: [
          pull ? `${model} is pulled onto the alias's nodes where it is missing, then loaded.`
               : `${model} is loaded on the nodes that hold it and checked to answer.`,
          `Then ${m.alias} points to ${model}. A vLLM node is drained and restarted with the new model first. The change is kept across restarts.`,
        ],
        action: pull ? "Install and activate" : "Repoint",
      });
      if (!ok) return;
      try {
        const op = await api("/admin/models/activate", { method: "POST", body: { alias: m.alias, model, pull } });
        notify(`Activation of ${model} for ${m.alias} started (operation ${op.id}). Follow it on Operations.`);
      } catch (err) { notify(`Could not activate ${model} for ${m.alias}: ${err.message}`, "error"); }
    };
    return h("article", { class: "card warn", "aria-label": `Alias ${m.alias}` },
      h("h3", {}, `Alias ${m.alias} points to ${m.target}, which no reachable node serves`),
      h("ul", {}, instead.map(([node, models]) => h("li", {}, `${node} serves ${models.join(", ") || "nothing"}`))),
      h("p", {}, "Requests for this alias get 404 until it is fixed: repoint it to a model a node has, or install its target."),
      h("div", { class: "controls" },
        choices.length ? [h("label", { for: selectId }, `Repoint ${m.alias} to `), select,
          h("button", { type: "button", onclick: () => activate(select.value, false) }, "Repoint")] : [],
        h("button", { type: "button", onclick: () => activate(m.target, true) }, `Install ${m.target} and activate`)));
  }

  function renderChanges() {
    const items = (store.changes || []).slice(0, 12);
    changes.replaceChildren(...(items.length ? items.map((c) => h("li", {}, h("time", { datetime: c.at }, clock(c.at)), " ", c.text))
      : [h("li", { class: "muted" }, "Nothing changed since this page opened.")]));
  }

  function update(kind) {
    if (kind !== "fleet" || !store.fleet) return;
    renderNodes(store.fleet);
    renderProblems(store.fleet);
    renderChanges();
  }
  store.listeners.add(update);
  update("fleet");
  return { unmount() { store.listeners.delete(update); charts.destroy(); } };
}

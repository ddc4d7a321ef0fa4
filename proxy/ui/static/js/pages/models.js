// Models: the nodes × models matrix with live download bars, pull / remove, and aliases to activate.

import { api } from "../api.js";
import { KeyedTable, badge, h, progressBar, section, transfer } from "../dom.js";

const ACTIVE = new Set(["queued", "running"]);
const REFRESH_MS = 15000;

export function normalize(name) {
  if (name.startsWith("library/")) name = name.slice(8);
  const last = name.split("/").pop();
  return last.includes(":") ? name : `${name}:latest`;
}

export function mount(root, { store, confirm, notify }) {
  let matrix = { nodes: [], models: [], errors: {} };
  let activeIds = "";
  const matrixTable = new KeyedTable("Models", ["Model"], { empty: "No node holds a model yet." });
  const aliases = new KeyedTable("Aliases", ["Alias", "Target", "State", "Served by", "Actions"], { empty: "No aliases configured." });
  const errors = h("ul", { class: "error-text" });

  // --- pull form ---------------------------------------------------------------------------------
  const modelInput = h("input", { id: "pull-model", name: "model", required: true, placeholder: "llama3.1:8b", autocomplete: "off" });
  const nodeBoxes = h("span", { class: "choices" });
  const radio = (value, label, checked = false) => h("label", {},
    h("input", { type: "radio", name: "where", value, checked }), ` ${label}`);
  const pullForm = h("form", { class: "pull", "aria-label": "Pull a model" },
    h("p", {}, h("label", { for: "pull-model" }, "Model "), modelInput),
    h("fieldset", {}, h("legend", {}, "Onto"),
      radio("all", "all Ollama nodes", true), radio("auto", "auto (by GPU tier)"), radio("chosen", "these nodes:"), nodeBoxes),
    h("p", {}, h("button", { type: "submit", class: "primary" }, "Pull")));
  pullForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const model = modelInput.value.trim();
    const where = new FormData(pullForm).get("where");
    const chosen = [...nodeBoxes.querySelectorAll("input:checked")].map((i) => i.value);
    const nodes = where === "chosen" ? chosen : where;
    if (!model) return;
    if (where === "chosen" && !chosen.length) { notify("Choose at least one node.", "error"); return; }
    try {
      const ops = await api("/admin/models/pull", { method: "POST", body: { model, nodes } });
      notify(`Pulling ${model} onto ${ops.data.map((o) => o.node).join(", ")}.`);
      pullForm.reset();
    } catch (err) { notify(`Could not pull ${model}: ${err.message}`, "error"); }
  });
  nodeBoxes.addEventListener("change", () => { pullForm.querySelector('input[value="chosen"]').checked = true; });

  root.append(
    h("h1", {}, "Models"),
    section("Pull a model", pullForm),
    section("Models on nodes", errors, matrixTable.el),
    section("Aliases", aliases.el),
  );

  function ollamaNodes() {
    return (store.fleet ? store.fleet.backends : []).filter((b) => b.kind === "ollama").map((b) => b.name);
  }

  let boxesFor = "";
  function renderNodeBoxes() {
    const names = ollamaNodes();
    if (names.join("\n") === boxesFor) return;
    boxesFor = names.join("\n");
    nodeBoxes.replaceChildren(...names.map((n) => h("label", {}, h("input", { type: "checkbox", name: "node", value: n }), ` ${n}`)));
  }

  // --- the matrix -------------------------------------------------------------------------------
  async function loadMatrix() {
    try {
      matrix = await api("/admin/models/matrix");
      renderMatrix();
    } catch (err) { errors.replaceChildren(h("li", {}, `The matrix could not be loaded: ${err.message}`)); }
  }

  function pulls() {
    return (store.fleet ? store.fleet.operations : []).filter((op) => op.kind === "pull" && ACTIVE.has(op.state));
  }

  // A finished download keeps its (full) bar for a moment, so the end is seen, not skipped.
  const lingering = new Map(); // operation id -> {op, until}
  function shown() {
    const now = Date.now();
    for (const [id, entry] of lingering) if (entry.until < now) lingering.delete(id);
    return [...pulls(), ...[...lingering.values()].map((e) => e.op)];
  }

  function renderMatrix() {
    const nodes = matrix.nodes;
    const thead = matrixTable.table.tHead.rows[0];
    const want = ["Model", ...nodes, "Actions"];
    if ([...thead.cells].map((c) => c.textContent).join("\n") !== want.join("\n")) {
      thead.replaceChildren(...want.map((t) => h("th", { scope: "col" }, t)));
      matrixTable.colspan = want.length;
      matrixTable.rows.clear();
    }
    errors.replaceChildren(...Object.entries(matrix.errors || {}).map(([n, e]) => h("li", {}, `${n} did not answer: ${e}`)));
    const rows = new Map(matrix.models.map((m) => [normalize(m.model), { model: m.model, cells: { ...m.nodes } }]));
    for (const op of shown()) {
      const key = normalize(op.model);
      if (!rows.has(key)) rows.set(key, { model: op.model, cells: {} });
      rows.get(key).cells[op.node] = { ...(rows.get(key).cells[op.node] || {}), downloading: true, op };
    }
    for (const row of rows.values()) {
      for (const [node, cell] of Object.entries(row.cells)) {
        if (cell.downloading && !cell.op) cell.op = shown().find((o) => o.id === cell.operation) || null;
        if (cell.downloading && !cell.op) row.cells[node] = { ...cell, downloading: false };
      }
    }
    const items = [...rows.values()].sort((a, b) => a.model.localeCompare(b.model));
    matrixTable.update(items, (r) => normalize(r.model), (r) => h("tr", {},
      h("th", { scope: "row" }, r.model),
      nodes.map((n) => h("td", {}, cellView(r.model, n, r.cells[n] || {}))),
      h("td", {}, ollamaNodes().some((n) => r.cells[n] && r.cells[n].installed)
        ? h("button", { type: "button", onclick: () => remove(r) }, "Remove…") : "")));
  }

  function cellView(model, node, cell) {
    if (cell.downloading && cell.op) {
      const op = cell.op;
      const label = `Downloading ${model} on ${node}`;
      return h("div", { class: "cell-progress" },
        progressBar(op.fraction, label, [ACTIVE.has(op.state) ? op.status : op.state, transfer(op)].filter(Boolean).join(" · ")),
        ACTIVE.has(op.state) ? h("button", { type: "button", onclick: () => cancel(op) }, "Cancel") : null);
    }
    if (cell.loaded) return badge("loaded");
    if (cell.installed) return badge("installed");
    return h("span", { class: "muted", "aria-label": "not installed" }, "–");
  }

  async function cancel(op) {
    try {
      await api(`/admin/operations/${encodeURIComponent(op.id)}`, { method: "DELETE" });
      notify(`Cancelled the pull of ${op.model} on ${op.node}.`);
    } catch (err) { notify(`Could not cancel: ${err.message}`, "error"); }
    loadMatrix();
  }

  async function remove(row) {
    const holders = ollamaNodes().filter((n) => row.cells[n] && row.cells[n].installed);
    const boxes = holders.map((n) => h("label", {}, h("input", { type: "checkbox", value: n, checked: true }), ` ${n}`));
    const ok = await confirm({
      title: `Remove ${row.model}`,
      body: [`${row.model} is deleted from the chosen nodes (Ollama /api/delete). Pulling it again downloads it in full.`],
      extra: [h("fieldset", {}, h("legend", {}, "From"), boxes)],
      action: "Remove",
    });
    if (!ok) return;
    const nodes = boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (!nodes.length) return;
    const send = async (force) => {
      await api(`/admin/models/${encodeURIComponent(row.model)}`, { method: "DELETE", body: { nodes, force } });
      notify(`Removed ${row.model} from ${nodes.join(", ")}.`);
    };
    try {
      await send(false);
    } catch (err) {
      if (err.status !== 409) { notify(`Could not remove ${row.model}: ${err.message}`, "error"); return; }
      const usedByAlias = /point/.test(err.message);
      const again = usedByAlias && await confirm({
        title: `An alias uses ${row.model}`,
        body: [err.message, "Requests for that alias would fail once it is gone. Activate another model for the alias first (Aliases, below), or remove it anyway."],
        action: "Remove anyway",
      });
      if (!usedByAlias) notify(`Could not remove ${row.model}: ${err.message}`, "error");
      if (again) {
        try { await send(true); } catch (e2) { notify(`Could not remove ${row.model}: ${e2.message}`, "error"); }
      }
    }
    loadMatrix();
  }

  // --- aliases ----------------------------------------------------------------------------------
  function renderAliases() {
    const list = store.fleet ? store.fleet.aliases : [];
    aliases.update(list, (a) => a.name, (a) => h("tr", {},
      h("th", { scope: "row" }, a.name),
      h("td", {}, a.target),
      h("td", {}, badge(a.state)),
      h("td", {}, a.served_by.join(", ") || "–"),
      h("td", {}, h("button", { type: "button", onclick: () => activate(a) }, "Activate…"))));
  }

  async function activate(alias) {
    const kinds = new Map((store.fleet ? store.fleet.backends : []).map((b) => [b.name, b.kind]));
    const runtime = alias.served_by.some((n) => kinds.get(n) === "vllm") ? "vllm" : "ollama";
    const where = alias.served_by.join(", ") || (runtime === "ollama" ? "the alias's Ollama nodes" : "its nodes");
    const listId = "activate-models";
    const input = h("input", { id: "activate-model", list: listId, required: true, autocomplete: "off", value: "" });
    const pull = h("input", { type: "checkbox", id: "activate-pull", checked: true });
    const unload = h("input", { type: "checkbox", id: "activate-unload" });
    const explain = runtime === "vllm"
      ? [`Each of ${where} is drained (no new requests; those in flight finish), its activate_command restarts vLLM with the new model,`,
         "and the proxy waits until /health answers and /v1/models lists it. The node serves nothing during the restart.",
         `Then ${alias.name} points to the new model and the node takes traffic again.`].join(" ")
      : `The model is loaded on ${where} and checked to answer (pulled first where missing, if allowed); then ${alias.name} points to it. Requests already running finish on ${alias.target}. Nothing restarts.`;
    const ok = await confirm({
      title: `Activate a model for ${alias.name}`,
      body: [`${alias.name} points to ${alias.target} now.`, explain, "The change is verified before it takes effect, and kept across restarts."],
      extra: [
        h("p", {}, h("label", { for: "activate-model" }, "Model "), input,
          h("datalist", { id: listId }, matrix.models.map((m) => h("option", { value: m.model })))),
        runtime === "ollama" ? h("p", {}, h("label", {}, pull, " Pull it first where it is missing")) : null,
        runtime === "ollama" ? h("p", {}, h("label", {}, unload, ` Unload ${alias.target} afterwards`)) : null,
      ],
      action: "Activate",
    });
    const model = input.value.trim();
    if (!ok || !model) return;
    const body = { alias: alias.name, model };
    if (runtime === "ollama") Object.assign(body, { pull: pull.checked, unload_old: unload.checked });
    try {
      const op = await api("/admin/models/activate", { method: "POST", body });
      notify(`Activating ${model} for ${alias.name} (operation ${op.id}).`);
    } catch (err) { notify(`Could not activate ${model} for ${alias.name}: ${err.message}`, "error"); }
  }

  function update(kind) {
    if (kind !== "fleet" || !store.fleet) return;
    renderNodeBoxes();
    renderAliases();
    const ids = pulls().map((o) => o.id);
    const ended = activeIds.split(",").filter((id) => id && !ids.includes(id));
    for (const op of store.fleet.operations) {
      if (ended.includes(op.id) && op.state === "succeeded") {
        lingering.set(op.id, { op, until: Date.now() + 3000 });
        setTimeout(renderMatrix, 3100);
      }
    }
    const finished = ended.length > 0;
    activeIds = ids.sort().join(",");
    renderMatrix();
    if (finished) loadMatrix(); // a download ended: what is installed changed
  }
  store.listeners.add(update);
  const timer = setInterval(loadMatrix, REFRESH_MS);
  update("fleet");
  loadMatrix();
  return { unmount() { store.listeners.delete(update); clearInterval(timer); } };
}

// Nodes: what each node's agent reports (hardware, runtime memory and uptime, alerts), and its
// Hugging Face installs with progress, plus a form to start one. Public admin APIs only, as text.

import { api } from "../api.js";
import { badge, bytes, h, progressBar, section, seconds, transfer, when } from "../dom.js";

const POLL_MS = 2000;
const ACTIVE = new Set(["queued", "running"]);

function pct(used, total) {
  return total ? `${Math.round((100 * used) / total)}%` : "–";
}

function rows(pairs) {
  return h("table", { class: "facts" }, h("tbody", {}, pairs.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v)))));
}

function hardware(hw) {
  if (!hw) return h("p", { class: "muted" }, "No report from the agent yet.");
  const gpus = hw.gpus && hw.gpus.length
    ? hw.gpus.map((g, i) => [`GPU ${i}`, `${g.name}: ${bytes(g.memory_used_bytes)} of ${bytes(g.memory_total_bytes)} (${pct(g.memory_used_bytes, g.memory_total_bytes)})`
      + (g.utilization === null || g.utilization === undefined ? "" : `, ${g.utilization}% busy`)])
    : [["GPU", hw.gpu_note || "no GPU"]];
  const disks = (hw.disks || []).map((d) => [`Disk ${d.path}`, `${bytes(d.free_bytes)} free of ${bytes(d.total_bytes)}`]);
  return rows([
    ["CPUs", `${hw.cpu_count}, load ${Number(hw.load_1m).toFixed(2)}`],
    ["RAM", `${bytes(hw.memory_used_bytes)} of ${bytes(hw.memory_total_bytes)} (${pct(hw.memory_used_bytes, hw.memory_total_bytes)})`],
    ...gpus, ...disks,
  ]);
}

function runtime(rt) {
  if (!rt) return h("p", { class: "muted" }, "Unknown.");
  return rows([
    ["Runtime", `${rt.kind}${rt.version ? " " + rt.version : ""}`],
    ["State", badge(rt.state || "unknown")],
    ["Memory", bytes(rt.memory_bytes)],
    ["Uptime", seconds(rt.uptime_seconds)],
    ["Restarts", String(rt.restarts ?? 0)],
    ["PID", rt.pid === null || rt.pid === undefined ? "–" : String(rt.pid)],
  ]);
}

function alerts(list) {
  if (!list || !list.length) return h("p", { class: "muted" }, "No alerts.");
  return h("ul", { class: "alerts", "aria-label": "Alerts" }, list.map((a) => h("li", { class: "alert" }, a.message)));
}

function installs(ops, manifest) {
  const running = ops.filter((op) => ACTIVE.has(op.state));
  const recent = ops.filter((op) => !ACTIVE.has(op.state)).slice(0, 3);
  return h("div", {},
    running.length ? h("ul", { class: "installs", "aria-label": "Installs in progress" }, running.map((op) =>
      h("li", {}, h("span", {}, `${op.model}: ${op.status}`),
        progressBar(op.fraction, `Installing ${op.model} on ${op.node}`, transfer(op))))) : h("p", { class: "muted" }, "No install running."),
    recent.length ? h("ul", { class: "installs recent", "aria-label": "Recent installs" }, recent.map((op) =>
      h("li", {}, `${op.model}: `, badge(op.state), op.error ? ` ${op.error}` : ""))) : null,
    manifest && manifest.length ? h("table", {},
      h("caption", {}, "Installed from Hugging Face"),
      h("thead", {}, h("tr", {}, ["Model", "Revision", "Size", "Files", "Installed"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, manifest.map((m) => h("tr", {}, h("td", {}, m.model), h("td", {}, `${m.revision} (${String(m.commit).slice(0, 12)})`),
        h("td", { class: "num" }, bytes(m.size)), h("td", { class: "num" }, String(m.files.length)), h("td", {}, when(m.installed_at))))))
      : h("p", { class: "muted" }, "Nothing installed from Hugging Face."));
}

function card(node, ops, manifest) {
  const heading = `${node.name} (${node.kind})`;
  return h("article", { class: "card node", "aria-label": `Node ${node.name}` },
    h("h3", {}, heading, " ", badge(node.state), node.agent ? " agent" : " no agent"),
    node.agent_error ? h("p", { class: "error-text" }, `Agent not answering: ${node.agent_error} (showing its last report)`) : null,
    node.agent ? [
      h("h4", {}, "Hardware"), hardware(node.hardware),
      h("h4", {}, "Runtime"), runtime(node.runtime),
      h("h4", {}, "Alerts"), alerts(node.alerts),
      node.kind === "vllm" ? [h("h4", {}, "Hugging Face"), installs(ops, manifest)] : null,
    ] : h("p", { class: "muted" }, "Run llm-proxy node on this machine to see its hardware and runtime here."));
}

export function mount(root, { notify }) {
  const list = h("div", { class: "cards" }, h("p", { class: "muted" }, "Loading…"));
  const model = h("input", { id: "hf-model", name: "model", placeholder: "org/name", required: true, autocomplete: "off" });
  const revision = h("input", { id: "hf-revision", name: "revision", value: "main", autocomplete: "off" });
  const target = h("select", { id: "hf-node", name: "node" });
  const confirmBig = h("input", { id: "hf-confirm", name: "confirm", type: "checkbox" });
  const form = h("form", { class: "controls", "aria-label": "Install from Hugging Face" },
    h("label", { for: "hf-model" }, "Model "), model,
    h("label", { for: "hf-revision" }, " Revision "), revision,
    h("label", { for: "hf-node" }, " on "), target,
    h("label", {}, confirmBig, " large download confirmed"),
    h("button", { type: "submit", class: "primary" }, "Install"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { model: model.value.trim(), revision: revision.value.trim() || "main", source: "huggingface",
      nodes: [target.value], confirm: confirmBig.checked };
    try {
      const answer = await api("/admin/models/pull", { method: "POST", body });
      notify(`Installing ${body.model} on ${body.nodes[0]} (operation ${answer.data[0].id}).`);
      refresh();
    } catch (err) { notify(`Could not install ${body.model}: ${err.message}`, "error"); }
  });
  root.append(h("h1", {}, "Nodes"), section("Install from Hugging Face", form), section("Nodes and their agents", list));

  let timer = null;
  let stopped = false;
  async function refresh() {
    clearTimeout(timer);
    try {
      const [nodes, ops] = await Promise.all([api("/admin/nodes"), api("/admin/operations?kind=pull&limit=200")]);
      const hf = ops.data.filter((op) => op.params && op.params.source === "huggingface");
      const manifests = await Promise.all(nodes.data.map((n) => (n.agent && n.kind === "vllm"
        ? api(`/admin/nodes/${encodeURIComponent(n.name)}/manifest`).then((m) => m.data, () => [])
        : Promise.resolve([]))));
      if (stopped) return;
      const names = nodes.data.filter((n) => n.agent && n.kind === "vllm").map((n) => n.name);
      if (names.join() !== [...target.options].map((o) => o.value).join()) {
        const chosen = target.value;
        target.replaceChildren(...names.map((n) => h("option", { value: n, selected: n === chosen }, n)));
      }
      list.replaceChildren(...(nodes.data.length ? nodes.data.map((n, i) => card(n, hf.filter((op) => op.node === n.name), manifests[i]))
        : [h("p", { class: "muted" }, "No nodes.")]));
    } catch (err) {
      if (!stopped) list.replaceChildren(h("p", { class: "error-text" }, `Could not read the nodes: ${err.message}`));
    }
    if (!stopped) timer = setTimeout(refresh, POLL_MS);
  }
  refresh();
  return { unmount() { stopped = true; clearTimeout(timer); } };
}

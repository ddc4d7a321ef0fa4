// Catalog: models that can be installed (GET /admin/catalog), searchable, with whether each fits each node.

import { api } from "../api.js";
import { KeyedTable, bytes, h, section } from "../dom.js";

const LIMIT = 100;
const FIT = { true: "fits", false: "too big", null: "GPU unknown" };

export function mount(root, { notify }) {
  let seq = 0; // answers to an older search that arrive late are dropped
  const table = new KeyedTable("Installable models",
    ["Model", "Source", "Size", "Memory needed", "Quantisation", "Capabilities", "Fits"],
    { empty: "No model matches." });
  const field = (id, labelText, control) => h("p", { class: "field" }, h("label", { for: id }, labelText), control);
  const query = h("input", { id: "c-q", name: "q", type: "search", autocomplete: "off", placeholder: "llama, qwen3, gemma…" });
  const source = h("select", { id: "c-source", name: "source" }, h("option", { value: "" }, "both"),
    h("option", { value: "ollama" }, "Ollama library"), h("option", { value: "huggingface" }, "Hugging Face"));
  const form = h("form", { class: "filters", role: "search", "aria-label": "Search the catalog" },
    field("c-q", "Search", query), field("c-source", "Source", source),
    h("p", { class: "field buttons" }, h("button", { type: "submit", class: "primary" }, "Search"),
      h("button", { type: "button", onclick: () => { form.reset(); load(true); } }, "Clear"),
      h("button", { type: "button", onclick: () => load(true) }, "Ask the sources again")));
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  const summary = h("p", { class: "muted", role: "status" });
  const note = h("p", { class: "muted" },
    "≈ marks an estimate: sizes from the parameter count, memory as weights × 1.2 + 0.5 GiB. ",
    "A node fits a model when its gpu_memory_gb holds the memory needed.");

  root.append(h("h1", {}, "Catalog"), section("What can be installed", form, summary, table.el, note));

  function estimate(value, estimated) {
    return value === null || value === undefined ? "–" : `${estimated ? "≈ " : ""}${bytes(value)}`;
  }

  function fitList(fits) {
    const names = Object.keys(fits);
    if (!names.length) return "no nodes";
    return h("ul", { class: "fits" }, names.map((node) =>
      h("li", { dataset: { fits: String(fits[node]) } }, `${node}: ${FIT[String(fits[node])]}`)));
  }

  function row(e) {
    return h("tr", {},
      h("th", { scope: "row" }, e.name),
      h("td", {}, e.source === "ollama" ? "Ollama" : "Hugging Face"),
      h("td", {}, estimate(e.size, e.estimated.size)),
      h("td", {}, estimate(e.required_memory, e.estimated.required_memory)),
      h("td", {}, e.quantization || "–"),
      h("td", {}, e.capabilities.join(", ") || "–"),
      h("td", {}, fitList(e.fits)));
  }

  function describe(answer) {
    const states = Object.entries(answer.sources).map(([name, state]) => {
      const why = answer.errors[name] ? ` (${answer.errors[name]})` : "";
      return `${name === "ollama" ? "Ollama library" : "Hugging Face"}: ${state}${why}`;
    });
    const more = answer.truncated ? `, the first ${answer.data.length} shown` : "";
    return `${answer.data.length} models${more}. ${states.join("; ")}.`;
  }

  async function load(refresh = false) {
    const mine = ++seq;
    const params = new URLSearchParams({ limit: String(LIMIT) });
    if (query.value.trim()) params.set("q", query.value.trim());
    if (source.value) params.set("source", source.value);
    if (refresh) params.set("refresh", "true");
    summary.textContent = "Searching…";
    try {
      const answer = await api(`/admin/catalog?${params}`);
      if (mine !== seq) return;
      table.update(answer.data, (e) => `${e.source}/${e.name}`, row);
      summary.textContent = describe(answer);
    } catch (err) {
      if (mine !== seq) return;
      summary.textContent = "";
      notify(`Could not load the catalog: ${err.message}`, "error");
    }
  }

  load();
  return { unmount() { seq += 1; } };
}

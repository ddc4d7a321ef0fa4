// Entry point: one live feed (GET /admin/events) shared by every page, a hash router, the key prompt.

import { api, adminKey, onKeyNeeded, setAdminKey, subscribe } from "./api.js";
import { track } from "./changes.js";
import { h } from "./dom.js";
import * as overview from "./pages/overview.js";
import * as models from "./pages/models.js";
import * as nodes from "./pages/nodes.js";
import * as operations from "./pages/operations.js";
import * as requests from "./pages/requests.js";
import * as catalog from "./pages/catalog.js";

const PAGES = { overview, nodes, models, operations, requests, catalog };

// What the feed last said, and who wants to know when it changes.
export const store = {
  fleet: null,
  changes: [],
  requests: [],
  listeners: new Set(),
  emit(kind) { for (const fn of this.listeners) fn(kind); },
};

const main = document.getElementById("main");
const status = document.getElementById("connection");
let current = null;
let feed = null;

// --- the admin key prompt -------------------------------------------------------------------------

const login = document.getElementById("login");
const loginForm = document.getElementById("login-form");
const loginError = document.getElementById("login-error");
const signOut = document.getElementById("sign-out");
let pending = null;

onKeyNeeded((problem) => {
  if (!pending) {
    pending = new Promise((resolve) => {
      loginError.textContent = problem || "";
      loginForm.reset();
      if (!login.open) login.showModal();
      loginForm.onsubmit = (event) => {
        event.preventDefault();
        const key = new FormData(loginForm).get("key").trim();
        if (!key) { loginError.textContent = "Enter a key."; return; }
        setAdminKey(key);
        login.close();
        pending = null;
        signOut.hidden = false;
        resolve();
      };
    });
  }
  return pending;
});
login.addEventListener("cancel", (event) => event.preventDefault()); // Escape does not skip the prompt
signOut.hidden = !adminKey();
signOut.addEventListener("click", () => { setAdminKey(null); location.reload(); });

// --- a confirmation that says what will happen ----------------------------------------------------

const confirmBox = document.getElementById("confirm");

export function confirmAction({ title, body, action, extra = [] }) {
  return new Promise((resolve) => {
    const form = h("form", { method: "dialog" },
      h("h2", {}, title),
      ...(Array.isArray(body) ? body : [body]).map((p) => (p instanceof Node ? p : h("p", {}, p))),
      ...extra,
      h("div", { class: "actions" },
        h("button", { type: "button", value: "no", onclick: () => { confirmBox.close(); resolve(false); } }, "Go back"),
        h("button", { type: "submit", class: "primary" }, action)));
    form.addEventListener("submit", (event) => { event.preventDefault(); confirmBox.close(); resolve(true); });
    confirmBox.replaceChildren(form);
    confirmBox.onclose = () => resolve(false);
    confirmBox.showModal();
  });
}

// --- messages ------------------------------------------------------------------------------------

const notices = document.getElementById("notices");

export function notify(message, kind = "info") {
  const item = h("li", { class: `notice ${kind}` }, message,
    h("button", { type: "button", class: "link", onclick: () => item.remove() }, "Dismiss"));
  notices.prepend(item);
  while (notices.children.length > 4) notices.lastElementChild.remove();
  if (kind !== "error") setTimeout(() => item.remove(), 8000);
}

// --- router --------------------------------------------------------------------------------------

function route() {
  const name = (location.hash.replace(/^#\/?/, "").split("/")[0] || "overview").toLowerCase();
  const page = PAGES[name] ? name : "overview";
  if (current) current.unmount();
  main.replaceChildren();
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${page[0].toUpperCase()}${page.slice(1)} · llm-proxy`;
  current = PAGES[page].mount(main, { store, confirm: confirmAction, notify });
  main.focus({ preventScroll: true });
}

function setConnection(state) {
  status.dataset.state = state;
  status.textContent = { live: "Live", reconnecting: "Reconnecting…", offline: "Proxy unreachable", ended: "Stopped" }[state] || state;
}

async function start() {
  try {
    await api("/admin/status"); // asks for a key first when the proxy needs one
  } catch (err) {
    main.replaceChildren(h("section", { class: "problem" }, h("h2", {}, "The admin API refused this page"),
      h("p", {}, err.message),
      h("p", {}, "Open the dashboard from the proxy's own machine, or set server.admin_keys and sign in with a key.")));
    setConnection("offline");
    return;
  }
  feed = subscribe("/admin/events", (event, data) => {
    if (event === "fleet") { track(store, data); store.fleet = data; store.emit("fleet"); }
    else if (event === "requests") { store.requests = data.data || []; store.emit("requests"); }
  }, { onState: setConnection });
  window.addEventListener("hashchange", route);
  route();
}

window.addEventListener("pagehide", () => feed && feed.stop());
start();

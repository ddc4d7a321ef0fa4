// The page's only way to the proxy: same-origin fetch() to the public admin and /v1 APIs.
// The admin key (when the proxy has admin_keys) lives in sessionStorage and goes in the
// Authorization header; never in a URL or a cookie.

const KEY = "llm-proxy-admin-key";

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
  }
}

let askForKey = null; // set by main.js: () => Promise<void>, resolves once a key was entered

export function onKeyNeeded(fn) { askForKey = fn; }
export function adminKey() { return sessionStorage.getItem(KEY); }
export function setAdminKey(key) { if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY); }

function headers(extra = {}) {
  const out = { accept: "application/json", ...extra };
  const key = adminKey();
  if (key) out.authorization = `Bearer ${key}`;
  return out;
}

export async function api(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const init = { method, headers: headers(), signal, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["content-type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (response.status === 401 && askForKey) {
      await askForKey(adminKey() ? "That key was refused. Enter a key from server.admin_keys." : null);
      continue;
    }
    const data = response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
// Calls onEvent(name, data) per frame; reconnects until stop() is called.
export function subscribe(path, onEvent, { onState = () => {}, reconnect = true } = {}) {
  let controller = null;
  let stopped = false;
  let retry = 2000;

  async function run() {
    while (!stopped) {
      controller = new AbortController();
      try {
        const response = await fetch(path, { headers: headers({ accept: "text/event-stream" }), signal: controller.signal, cache: "no-store" });
        if (response.status === 401 && askForKey) {
          await askForKey(adminKey() ? "That key was refused. Enter a key from server.admin_keys." : null);
          continue;
        }
        if (!response.ok) {
          const body = await response.json().catch(() => null);
          throw new ApiError(response.status, body);
        }
        onState("live");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const frame = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let event = "message";
            const data = [];
            for (const line of frame.split("\n")) {
              if (line.startsWith("event:")) event = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
              else if (line.startsWith("retry:")) retry = Number(line.slice(6)) || retry;
            }
            if (data.length) {
              let parsed;
              try { parsed = JSON.parse(data.join("\n")); } catch { continue; }
              onEvent(event, parsed);
            }
          }
        }
        if (!reconnect) { onState("ended"); return; }
      } catch (err) {
        if (stopped) return;
        onState("offline", err);
        if (!reconnect) return;
      }
      if (!stopped) {
        onState("reconnecting");
        await new Promise((resolve) => setTimeout(resolve, retry));
      }
    }
  }

  run();
  return { stop() { stopped = true; if (controller) controller.abort(); } };
}

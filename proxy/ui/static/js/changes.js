// "What changed recently": differences between successive fleet frames, newest first.

const KEEP = 30;
const FINISHED = new Set(["succeeded", "failed", "cancelled", "interrupted"]);

export function backendState(b) {
  return b.draining ? "draining" : b.state;
}

export function track(store, fleet) {
  const previous = store.fleet;
  const now = new Date().toISOString();
  const changes = store.changes || (store.changes = []);
  if (!previous) {
    // Start with what finished in the last hour, so a fresh page is not blank.
    const hourAgo = Date.now() - 3600 * 1000;
    for (const op of fleet.operations || []) {
      if (FINISHED.has(op.state) && op.finished_at && Date.parse(op.finished_at) > hourAgo) {
        changes.push({ at: op.finished_at, text: describe(op) });
      }
    }
    changes.sort((a, b) => (a.at < b.at ? 1 : -1));
  } else {
    const before = new Map(previous.backends.map((b) => [b.name, b]));
    for (const b of fleet.backends) {
      const old = before.get(b.name);
      if (!old) changes.unshift({ at: now, text: `${b.name} joined the fleet (${backendState(b)})` });
      else if (backendState(old) !== backendState(b)) {
        const why = b.state === "offline" && b.last_error ? `: ${b.last_error}` : "";
        changes.unshift({ at: now, text: `${b.name} is now ${backendState(b)} (was ${backendState(old)})${why}` });
      }
      before.delete(b.name);
    }
    for (const name of before.keys()) changes.unshift({ at: now, text: `${name} left the fleet` });
    const oldOps = new Map((previous.operations || []).map((op) => [op.id, op]));
    for (const op of fleet.operations || []) {
      const old = oldOps.get(op.id);
      if (!old) changes.unshift({ at: op.created_at || now, text: `${op.kind} ${op.model}${op.node ? " on " + op.node : ""} started` });
      else if (old.state !== op.state && FINISHED.has(op.state)) changes.unshift({ at: op.finished_at || now, text: describe(op) });
    }
    const oldMismatch = new Set((previous.alias_mismatches || []).map((m) => m.alias));
    const newMismatch = new Set((fleet.alias_mismatches || []).map((m) => m.alias));
    for (const m of fleet.alias_mismatches || []) {
      if (!oldMismatch.has(m.alias)) changes.unshift({ at: now, text: `alias ${m.alias} points to ${m.target}, which no reachable node serves` });
    }
    for (const name of oldMismatch) if (!newMismatch.has(name)) changes.unshift({ at: now, text: `alias ${name} is served again` });
  }
  changes.splice(KEEP);
}

function describe(op) {
  const where = op.node ? ` on ${op.node}` : "";
  const alias = op.alias ? ` for ${op.alias}` : "";
  return `${op.kind} ${op.model}${alias}${where} ${op.state}${op.error ? ": " + op.error : ""}`;
}

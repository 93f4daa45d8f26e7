// The console's client of the daemon's REST API, on the page's own origin. The API key the
// user signed in with lives in sessionStorage: it goes with the tab, not to disk for good.

const KEY = "moat.apiKey";

export const apiKey = () => sessionStorage.getItem(KEY);
export const setApiKey = (k) => sessionStorage.setItem(KEY, k);
export const clearApiKey = () => sessionStorage.removeItem(KEY);

/** An error answer of the API: `{"error": {"code", "message"}}`, with its status. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Path of a group, and of a sandbox, under /v1. */
export const groupPath = (g) => `/v1/sandbox-groups/${encodeURIComponent(g)}`;
export const sandboxPath = (g, id) => `${groupPath(g)}/sandboxes/${encodeURIComponent(id)}`;

/**
 * One API call. `json` is sent as a JSON body, `body` as raw bytes; `query` is an object of
 * query parameters (undefined values left out). Returns the parsed JSON (null for 204), or the
 * Response itself with `raw`.
 */
export async function call(method, path, { json, body, query, raw } = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let url = path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== "") q.set(k, String(v));
    if ([...q].length) url += `?${q}`;
  }
  let r;
  try {
    r = await fetch(url, { method, headers, body });
  } catch (e) {
    throw new ApiError(0, "unreachable", `the daemon does not answer (${e.message})`);
  }
  if (!r.ok) {
    let code = `http_${r.status}`;
    let message = r.statusText;
    try {
      const e = (await r.json()).error;
      code = e.code;
      message = e.message;
    } catch {
      // Not our error shape (a proxy's page, say): the status line says enough.
    }
    if (r.status === 401) {
      clearApiKey();
      window.dispatchEvent(new CustomEvent("moat:signed-out", { detail: message }));
    }
    throw new ApiError(r.status, code, message);
  }
  if (raw) return r;
  return r.status === 204 ? null : r.json();
}

/** The shell's WebSocket URL; the key goes as a subprotocol (a browser cannot set headers). */
export function shellSocket(group, id, cols, rows) {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const q = new URLSearchParams({ cols: String(cols), rows: String(rows) });
  const ws = new WebSocket(`${proto}//${location.host}${sandboxPath(group, id)}/shell?${q}`, [
    "moat.shell.v1",
    `moat.key.${apiKey()}`,
  ]);
  ws.binaryType = "arraybuffer";
  return ws;
}

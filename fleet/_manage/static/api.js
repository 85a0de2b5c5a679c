// Calls to the management API. The page is served from the same origin, so the
// fleet_token cookie authenticates every call; a 401 sends the user to the sign-in page.

export class ApiError extends Error {
  constructor(status, message, requestId, detail) {
    super(message);
    this.status = status;
    this.requestId = requestId || "";
    this.detail = detail || null;
  }
}

const TIMEOUT_MS = 15000;

export async function call(method, path, body, headers = {}) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  let reply;
  try {
    reply = await fetch(path, {
      method, signal: ctl.signal, credentials: "same-origin",
      headers: body === undefined ? headers : { "content-type": "application/json", ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    throw new ApiError(0, ctl.signal.aborted
      ? `${method} ${path}: no answer within ${TIMEOUT_MS / 1000} s`
      : `${method} ${path}: the management server cannot be reached (${exc.message}); is the instance still running?`);
  } finally {
    clearTimeout(timer);
  }
  if (reply.status === 401) {
    window.location.assign("/");
    throw new ApiError(401, "signed out: the token is needed again");
  }
  const type = reply.headers.get("content-type") || "";
  const data = type.includes("json") ? await reply.json().catch(() => null) : await reply.text();
  if (!reply.ok) {
    const msg = data && data.error ? data.error : `${method} ${path}: HTTP ${reply.status}`;
    const detail = data && data.detail ? data.detail : null;
    const extra = detail ? " (" + detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ") + ")" : "";
    throw new ApiError(reply.status, msg + extra, data && data.request_id, detail);
  }
  return { data, etag: reply.headers.get("etag"), status: reply.status };
}

export const get = async (path) => (await call("GET", path)).data;
export const post = async (path, body) => (await call("POST", path, body === undefined ? {} : body)).data;

export function q(params) {
  const s = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") s.set(k, v);
  }
  const text = s.toString();
  return text ? "?" + text : "";
}

export const enc = encodeURIComponent;

// The console's only way to the API: the key from sessionStorage as a Bearer token, errors as ApiError,
// and a 401 anywhere signs the user out with the API's message.

const STORAGE = "pgsage.key";

/** An error answer of the API: its status, its code and its message as one line. */
export class ApiError extends Error {
  constructor(status, code, detail) {
    super(describe(detail) || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

/** The API's `detail` as one readable line: a string, {message, info} or a list of {loc, msg}. */
export function describe(detail) {
  if (detail === null || detail === undefined) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => {
        const where = Array.isArray(e?.loc) ? e.loc.filter((p) => p !== "body").join(".") : "";
        const msg = e?.msg ?? JSON.stringify(e);
        return where ? `${where}: ${msg}` : msg;
      })
      .join("; ");
  }
  if (typeof detail === "object" && typeof detail.message === "string") {
    const info = detail.info;
    if (info && typeof info === "object" && !Array.isArray(info)) {
      return `${detail.message} (${Object.entries(info).map(([k, v]) => `${k}: ${describe(v)}`).join(", ")})`;
    }
    return info ? `${detail.message}: ${describe(info)}` : detail.message;
  }
  return JSON.stringify(detail);
}

let unauthorized = () => {};

/** What to do when the API answers 401 (the console signs out and shows the message). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export function storedKey() {
  return sessionStorage.getItem(STORAGE);
}

export function storeKey(key) {
  sessionStorage.setItem(STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(STORAGE);
}

function url(path, query) {
  const u = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query ?? {})) {
    if (value !== null && value !== undefined && value !== "") u.searchParams.set(name, String(value));
  }
  return u;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const code = body?.error ?? "http_error";
  const detail = body?.detail ?? (response.statusText || `HTTP ${response.status}`);
  let message = describe(detail);
  const wait = response.headers.get("Retry-After");
  if (wait && (response.status === 429 || response.status === 503) && !/retry/i.test(message)) {
    message += ` (retry in ${wait} s)`;
  }
  return new ApiError(response.status, code, message);
}

async function send(method, path, { json, form, query, key, signal, accept } = {}) {
  const headers = { Accept: accept ?? "application/json" };
  const token = key ?? storedKey();
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary
  }
  let response;
  try {
    response = await fetch(url(path, query), { method, headers, body, signal, cache: "no-store" });
  } catch (err) {
    if (err?.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", `the service cannot be reached (${err?.message ?? err})`);
  }
  if (!response.ok) {
    const error = await failure(response);
    // A key given for signing in is judged by the caller; the stored key's 401 ends the session.
    if (response.status === 401 && key === undefined) unauthorized(error.message);
    throw error;
  }
  return response;
}

/** A JSON call; the parsed body (null for 204). Options: json, form, query, key (not the stored one), signal. */
export async function call(method, path, options = {}) {
  const response = await send(method, path, options);
  if (response.status === 204) return null;
  return response.json();
}

/**
 * A POST answered with Server-Sent Events, read with fetch and a stream reader (EventSource cannot POST):
 * yields {event, data} with data parsed from JSON.
 */
export async function* events(path, json, { signal } = {}) {
  const response = await send("POST", path, { json, signal, accept: "text/event-stream" });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const parsed = parseEvent(block);
        if (parsed) yield parsed;
      }
    }
    const last = parseEvent(buffer);
    if (last) yield last;
  } finally {
    reader.releaseLock();
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { event, data: JSON.parse(data.join("\n")) };
}

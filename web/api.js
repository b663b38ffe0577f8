// The REST API of the gateway (same origin): credentials, silent refresh, errors in plain words and
// the chat turn: over the conversation's WebSocket (GET /v1/sessions/{id}:connect), or as server-sent
// events read from a POST (EventSource can only GET) when WebSocket is unavailable.

const STORE = "parley.auth";

export class ApiError extends Error {
  constructor(status, message, { code = 0, retryAfter = null, reason = "" } = {}) {
    super(message || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.reason = reason; // e.g. insufficient_quota: a token budget is used up
  }
}

export class NetworkError extends Error {
  constructor() {
    super("network");
    this.name = "NetworkError";
  }
}

// Seconds to wait, from a Retry-After header (seconds or an HTTP date).
function retryAfter(response) {
  const value = response.headers.get("retry-after");
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

async function errorOf(response) {
  let message = "";
  let code = 0;
  try {
    const body = await response.json();
    message = body.message || body.error?.message || "";
    code = body.code || 0;
  } catch {
    // Not JSON: an HTML error page from a proxy, say. The status alone is explained.
  }
  return new ApiError(response.status, message, { code, retryAfter: retryAfter(response),
    reason: response.headers.get("parley-reason") || "" });
}

function seconds(n) {
  return n === 1 ? "1 second" : `${n} seconds`;
}

function duration(n) {
  if (n < 120) return seconds(n);
  return n < 7200 ? `${Math.round(n / 60)} minutes` : `${Math.round(n / 3600)} hours`;
}

// One sentence a person can act on.
export function explain(error) {
  if (error instanceof NetworkError || error?.name === "TypeError") {
    return navigator.onLine === false
      ? "You are offline. Reconnect to the network and try again."
      : "Cannot reach the Parley server. Check your connection and try again.";
  }
  if (!(error instanceof ApiError)) return `Something went wrong: ${error?.message || error}`;
  const detail = error.message && !error.message.startsWith("HTTP ") ? ` (${error.message})` : "";
  switch (error.status) {
    case 400:
      return error.message || "The request was not accepted.";
    case 401:
      return "Your sign-in has expired. Please sign in again.";
    case 403:
      return "You do not have permission to do that.";
    case 404:
      return `Not found${detail}.`;
    case 409:
      return error.message || "That conflicts with something that already exists.";
    case 429:
      if (error.reason === "insufficient_quota") {
        return `Your token budget is used up${detail}.${error.retryAfter !== null ? ` It resets in ${duration(error.retryAfter)}.` : ""}`;
      }
      return error.retryAfter !== null
        ? `Too many requests: the server is busy. Try again in ${seconds(error.retryAfter)}.`
        : `Too many requests: the server is busy. Wait a moment and try again${detail}.`;
    case 501:
      return `The server does not support this yet${detail}.`;
    case 503:
      return `The service is unavailable right now${detail}. Try again in a moment.`;
    case 504:
      return "The server took too long to answer. Try again.";
    default:
      return `The server answered with an error (HTTP ${error.status})${detail}.`;
  }
}

// In-band error events of a chat stream carry a gRPC status name.
export function explainStreamError(event) {
  const words = {
    RESOURCE_EXHAUSTED: "The server is busy.",
    UNAVAILABLE: "The model is unavailable right now.",
    DEADLINE_EXCEEDED: "The answer took too long and was cut off.",
    CANCELLED: "The answer was cancelled.",
    INVALID_ARGUMENT: "The request was not accepted.",
  };
  const lead = words[event.code] || "The answer failed.";
  return event.message ? `${lead} ${event.message}` : lead;
}

// A turn refused before it started arrives on the socket as an error event with a gRPC status name;
// the same refusal over HTTP is this status (so the view explains both alike).
const HTTP_STATUS = { INVALID_ARGUMENT: 400, UNAUTHENTICATED: 401, PERMISSION_DENIED: 403, NOT_FOUND: 404,
  ABORTED: 409, RESOURCE_EXHAUSTED: 429, UNAVAILABLE: 503, DEADLINE_EXCEEDED: 504 };

function abortError() {
  return new DOMException("The turn was stopped.", "AbortError");
}

class SocketClosed extends Error {
  constructor(code, reason) {
    super(reason || `WebSocket closed (${code})`);
    this.code = code;
  }
}

// One conversation's WebSocket: opened once, kept for every turn while the chat is open. Browsers
// cannot set headers on a WebSocket, so the access token goes in the first message — never in the URL.
class ChatSocket {
  constructor(api, sessionId) {
    this.sessionId = sessionId;
    this.closed = false;
    this.listener = null;
    this.ready = new Promise((resolve, reject) => {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${scheme}//${location.host}/v1/sessions/${encodeURIComponent(sessionId)}:connect`);
      let opened = false;
      this.ws = ws;
      ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: api.auth?.access_token || "" }));
      ws.onmessage = (message) => {
        const event = JSON.parse(message.data);
        if (opened) this.listener?.(event);
        else if (event.type === "ready") {
          opened = true;
          resolve(this);
        }
      };
      ws.onclose = (event) => {
        this.closed = true;
        if (!opened) reject(new SocketClosed(event.code, event.reason));
        else this.listener?.({ type: "closed", code: event.code, reason: event.reason });
      };
    });
  }

  // One turn's events in the SSE stream's shape ({start: …}, {delta: …}, …). Aborting `signal` sends
  // stop: the server keeps the partial answer, and this throws AbortError as a cut fetch does.
  async *turn(body, signal) {
    const events = [];
    let wake = null;
    let stopping = false;
    let started = false;
    this.listener = (event) => {
      events.push(event);
      if (wake) wake();
    };
    const stop = () => {
      stopping = true;
      if (!this.closed) this.ws.send(JSON.stringify({ type: "stop" }));
    };
    signal?.addEventListener("abort", stop);
    try {
      this.ws.send(JSON.stringify({ type: "chat", ...body }));
      for (;;) {
        while (!events.length) await new Promise((resolve) => (wake = resolve));
        wake = null;
        const { type, ...fields } = events.shift();
        if (type === "closed") {
          if (stopping) throw abortError();
          if (fields.code === 4401) throw new ApiError(401, fields.reason);
          return; // cut off: the caller says so and shows what arrived
        }
        if (type === "pong") continue;
        if (stopping && type === "done" && fields.finish_reason === "FINISH_REASON_CANCELLED") throw abortError();
        if (type === "error" && !started) {
          // Nothing was stored or generated: say it as the HTTP status would be said.
          throw new ApiError(HTTP_STATUS[fields.code] || 500, fields.message, {
            retryAfter: fields.retry_after_seconds || null, reason: fields.reason || "" });
        }
        started ||= type === "start";
        yield { [type]: fields };
        if (type === "done" || type === "error") return;
      }
    } finally {
      signal?.removeEventListener("abort", stop);
      this.listener = null;
    }
  }

  close() {
    this.closed = true;
    this.ws.close(1000);
  }
}

export class Api {
  constructor({ onSignedOut } = {}) {
    this.onSignedOut = onSignedOut || (() => {});
    this.refreshing = null;
    try {
      this.auth = JSON.parse(localStorage.getItem(STORE)) || null;
    } catch {
      this.auth = null;
    }
  }

  get user() {
    return this.auth?.user || null;
  }

  get isAdmin() {
    return (this.user?.roles || []).includes("ROLE_ADMIN");
  }

  save(auth) {
    this.auth = auth;
    if (auth) localStorage.setItem(STORE, JSON.stringify(auth));
    else localStorage.removeItem(STORE);
  }

  async signIn(username, password, register = false) {
    const path = register ? "/v1/auth/register" : "/v1/auth/login";
    const answer = await this.request("POST", path, { username, password }, { anonymous: true });
    this.save({ user: answer.user, ...answer.tokens });
    return answer.user;
  }

  async signOut() {
    this.socket?.close();
    this.socket = null;
    const refresh = this.auth?.refresh_token;
    this.save(null);
    if (refresh) {
      try {
        await this.request("POST", "/v1/auth/logout", { refresh_token: refresh }, { anonymous: true });
      } catch {
        // Signed out locally either way; the refresh token expires on its own.
      }
    }
  }

  // One refresh at a time, however many requests got a 401 together: refresh tokens rotate, and
  // re-using an old one revokes the whole family.
  refresh() {
    if (!this.refreshing) {
      const token = this.auth?.refresh_token;
      this.refreshing = (async () => {
        if (!token) return false;
        try {
          const answer = await this.request("POST", "/v1/auth/refresh", { refresh_token: token }, { anonymous: true });
          this.save({ ...this.auth, ...answer.tokens });
          return true;
        } catch (error) {
          if (error instanceof ApiError) return false;
          throw error; // offline: keep the tokens and say so
        }
      })().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  async fetch(method, path, body, { signal, anonymous = false, accept = "application/json" } = {}) {
    const send = () => {
      const headers = { accept };
      if (body !== undefined) headers["content-type"] = "application/json";
      if (!anonymous && this.auth?.access_token) headers.authorization = `Bearer ${this.auth.access_token}`;
      return fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      }).catch((error) => {
        if (error.name === "AbortError") throw error;
        throw new NetworkError();
      });
    };
    let response = await send();
    if (response.status === 401 && !anonymous) {
      if (await this.refresh()) {
        response = await send();
      }
      if (response.status === 401) {
        this.save(null);
        this.onSignedOut();
        throw await errorOf(response);
      }
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async request(method, path, body, options = {}) {
    const response = await this.fetch(method, path, body, options);
    const text = await response.text();
    return text ? JSON.parse(text) : {};
  }

  get(path) {
    return this.request("GET", path);
  }

  // Every page of a list: `key` names the repeated field.
  async all(path, key) {
    const items = [];
    let token = "";
    do {
      const sep = path.includes("?") ? "&" : "?";
      const page = await this.get(`${path}${sep}page_size=100${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
      items.push(...(page[key] || []));
      token = page.next_page_token || "";
    } while (token);
    return items;
  }

  // PATCH a session with an explicit field mask, so that emptied fields are cleared too.
  updateSession(id, fields) {
    const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
    const mask = Object.keys(fields).map(camel).join(",");
    return this.request("PATCH", `/v1/sessions/${encodeURIComponent(id)}?update_mask=${mask}`, { id, ...fields });
  }

  // One chat turn: yields the events {start}, {delta}, … {done} or {error} as they arrive.
  // One chat turn: over the conversation's WebSocket, or over SSE (`chat`) when WebSocket is not
  // available (no WebSocket in this browser, or a proxy on the way that does not upgrade). Events
  // have the SSE shape either way; `transport` says which carried the last turn.
  async *turn(sessionId, body, signal) {
    for (let attempt = 0; ; attempt++) {
      const socket = await this.openSocket(sessionId);
      this.transport = socket ? "websocket" : "sse";
      if (!socket) {
        yield* this.chat(sessionId, body, signal);
        return;
      }
      let started = false;
      try {
        for await (const event of socket.turn(body, signal)) {
          started = true;
          yield event;
        }
        return;
      } catch (error) {
        // The socket outlived its access token: the server closed it (4401) before the turn stored
        // anything. Refresh the token, connect again and send the turn once more.
        const expired = error instanceof ApiError && error.status === 401 && !started && attempt === 0;
        if (!expired || !(await this.refresh())) throw error;
      }
    }
  }

  // The open conversation's socket (one at a time), connected on its first turn; null when
  // WebSocket does not work here, after which turns use SSE.
  async openSocket(sessionId) {
    if (this.socket && this.socket.sessionId === sessionId && !this.socket.closed) return this.socket;
    this.socket?.close();
    this.socket = null;
    if (typeof WebSocket !== "function" || this.noWebSocket) return null;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        this.socket = await new ChatSocket(this, sessionId).ready;
        return this.socket;
      } catch (error) {
        // An expired access token: refresh it once and connect again. SSE says anything else
        // (a missing conversation, a sign-out) in its own words.
        if (error.code === 4401 && attempt === 0 && (await this.refresh())) continue;
        if (error.code !== 4401 && error.code !== 4404) this.noWebSocket = true;
        return null;
      }
    }
    return null;
  }

  async *chat(sessionId, body, signal) {
    const response = await this.fetch("POST", `/v1/sessions/${encodeURIComponent(sessionId)}:chat`, body, {
      signal,
      accept: "text/event-stream",
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          if (error.name === "AbortError") throw error;
          throw new NetworkError();
        }
        if (chunk.done) break;
        buffer += chunk.value.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).trimStart())
            .join("\n");
          if (data) yield JSON.parse(data);
        }
      }
    } finally {
      reader.releaseLock();
    }
  }
}

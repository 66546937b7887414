// The gateway's REST API (/api/v1) and its live events, as the principal whose token this tab holds.
//
// The token stays in this tab's sessionStorage (gone when the tab closes, or on "Sign out") and travels only
// in the Authorization header, never in a URL. Live events are read with fetch() and a stream reader rather
// than EventSource, which cannot send that header: the reader resumes after the last event id it saw
// (Last-Event-ID, as EventSource would), so a dropped connection loses nothing and repeats nothing.

const BASE = "/api/v1";
const TOKEN_KEY = "continuum.token";
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 15000;
// the gateway says something every 15 s (a keep-alive comment): this long without a word, the connection is dead
const SILENCE_MS = 45000;

export class Unauthorized extends Error {}

export class Problem extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const api = {
  token: sessionStorage.getItem(TOKEN_KEY),

  keep(token) {
    this.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
  },

  forget() {
    this.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
  },

  headers() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  },

  get(path, params = {}) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      for (const one of [value].flat()) if (one !== undefined && one !== null && one !== "") query.append(key, one);
    }
    const search = query.toString();
    return this.send("GET", search ? `${path}?${search}` : path);
  },

  post(path, body = {}) {
    return this.send("POST", path, body);
  },

  async send(method, path, body) {
    const headers = { ...this.headers(), Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(BASE + path, { method, headers, cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body) });
    } catch {
      throw new Problem(0, "the gateway does not answer");
    }
    if (response.status === 401) throw new Unauthorized("the token is not (or no longer) valid");
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Problem(response.status, answer.detail || `the gateway answered ${response.status}`);
    return answer;
  },
};

// The event stream (CloudEvents, each with its stream sequence as its id), for as long as it is started:
// `onOpen` once the gateway says nothing published from then on is missed (then is the time to read lists),
// `onEvent` for each event, `onStatus("connecting" | "live" | "reconnecting", reason, retryMs)`.
export class LiveEvents {
  constructor({ onEvent, onOpen, onStatus, onUnauthorized }) {
    Object.assign(this, { onEvent, onOpen, onStatus, onUnauthorized });
    this.lastId = null;
    this.stopped = true;
    this.abort = null;
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.loop();
  }

  stop() {
    this.stopped = true;
    this.abort?.abort();
  }

  async loop() {
    let delay = RETRY_MIN_MS;
    while (!this.stopped) {
      this.onStatus("connecting");
      const abort = (this.abort = new AbortController());
      let reason = "the stream ended";
      try {
        const headers = { ...api.headers(), Accept: "text/event-stream" };
        if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
        const response = await fetch(`${BASE}/events`, { headers, cache: "no-store", signal: abort.signal });
        if (response.status === 401) {
          this.stopped = true;
          this.onUnauthorized();
          return;
        }
        if (!response.ok) throw new Error(`the gateway answered ${response.status}`);
        await this.read(response.body.getReader(), abort, () => { delay = RETRY_MIN_MS; });
      } catch (error) {
        reason = error.name === "AbortError" ? "no word from the gateway" : error.message;
      }
      if (this.stopped) return;
      this.onStatus("reconnecting", reason, delay);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, RETRY_MAX_MS);
    }
  }

  // Server-Sent Events, line by line (the fields the gateway sends: id, data, and comments)
  async read(reader, abort, opened) {
    const decoder = new TextDecoder();
    let buffer = "";
    let id = null;
    let data = [];
    let silence = setTimeout(() => abort.abort(), SILENCE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        clearTimeout(silence);
        silence = setTimeout(() => abort.abort(), SILENCE_MS);
        let text = buffer + decoder.decode(value, { stream: true });
        // a CR that ends a chunk may be half of a CRLF: it waits for the next chunk
        const held = text.endsWith("\r") ? "\r" : "";
        if (held) text = text.slice(0, -1);
        const lines = text.split(/\r\n|\r|\n/);
        buffer = lines.pop() + held;
        for (const line of lines) {
          if (line === "") {
            if (data.length) {
              if (id !== null) this.lastId = id;
              this.onEvent(JSON.parse(data.join("\n")));
            }
            id = null;
            data = [];
          } else if (line.startsWith(":")) {
            if (line.slice(1).trim() === "open") {
              opened();
              this.onStatus("live");
              this.onOpen();
            }
          } else {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const content = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "data") data.push(content);
            else if (field === "id") id = content;
          }
        }
      }
    } finally {
      clearTimeout(silence);
    }
  }
}

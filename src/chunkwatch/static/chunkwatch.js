/**
 * chunkwatch.js — read a chunkwatch service's Server-Sent Events in the browser, and
 * measure the stream as the person saw it (the `browser` layer).
 *
 * An ES module with no dependencies and no build step: serve this file and import it.
 *
 * Usage:
 *
 *     import { events, lastStream } from "/chunkwatch.js";
 *
 *     const start = performance.now();
 *     const response = await fetch("/chat", {
 *       method: "POST",
 *       headers: { "Content-Type": "application/json" },
 *       body: JSON.stringify({ message: "hello" }),
 *     });
 *     for await (const ev of events(response, { start, beaconEndpoint: "/chunkwatch/beacon" })) {
 *       if (ev.event === "token") show(JSON.parse(ev.data).text);
 *     }
 *     console.log(lastStream()); // {events, first_event_ms, gap_max_ms, end, ...}
 *
 * `events(response, options)` is an async generator of parsed events `{event, data, id}`
 * (the WHATWG parsing rules: CRLF, LF or CR line ends, split anywhere across chunks;
 * multi-line `data`; `:` comments ignored; `event` defaults to "message"; an event not
 * ended by a blank line when the body ends is dropped). Options:
 *
 *   start           performance.now() when the caller started `fetch`; times count from
 *                   it (default: when `events` was called).
 *   terminal        event names that end a good or failed stream (["done", "error"]).
 *   beaconEndpoint  URL the one beacon per stream goes to (default none: no beacon).
 *   signal          the AbortSignal given to `fetch`: an abort counts as `closed`.
 *   now             a clock in ms (default performance.now; tests pass their own).
 *
 * Per stream it counts the events received, the time to the first body byte and to the
 * first event, the longest gap between two events, whether a terminal event arrived,
 * and how the stream ended:
 *
 *   clean   the body ended after a terminal event (or the caller stopped reading after
 *           one: everything was received);
 *   abrupt  the body ended without a terminal event, or the network failed mid-body;
 *   closed  the caller stopped reading before the terminal event, aborted the fetch,
 *           or the page was hidden (pagehide, or visibilitychange to hidden) first;
 *   error   anything else (a response that is not 2xx or has no body, an unexpected
 *           error while reading).
 *
 * The record is final at the first of: the stream's end, or the page being hidden (a
 * hidden page may be frozen or discarded without another chance to send). Then, if
 * `beaconEndpoint` is set and the response carried an `X-Chunkwatch-Stream` header, it
 * sends exactly one beacon with `navigator.sendBeacon`, a text/plain JSON body (no CORS
 * preflight) of exactly these fields, times in ms rounded to 0.1, under 512 bytes:
 *
 *   {"v": 1, "token": <X-Chunkwatch-Stream>, "events": int,
 *    "first_byte_ms": number|null, "first_event_ms": number|null,
 *    "gap_max_ms": number|null, "terminal": bool,
 *    "end": "clean"|"abrupt"|"closed"|"error", "duration_ms": number}
 *
 * No URL, text or user input is sent. `gap_max_ms` is null below two events.
 *
 * `lastStream()` returns a copy of the last stream's record (the beacon's fields but
 * `v` and `token`, plus `open` and `beacon`: "off" | "pending" | "sent" | "refused"),
 * or null before the first stream.
 *
 * Measuring never breaks the page: the reader's own errors reach the caller unchanged
 * (the same object), and a failure of the bookkeeping or the beacon is swallowed.
 */

const STREAM_HEADER = "X-Chunkwatch-Stream";
const DEFAULT_TERMINAL = ["done", "error"];
// The beacon's body stays under 512 bytes; the fixed fields take about 190 at most, so
// a longer token than this is not the service's and no beacon is sent for it.
const MAX_BEACON_BYTES = 512;
const MAX_TOKEN_LENGTH = 256;

let last = null;

export function lastStream() {
  return last === null ? null : { ...last.record };
}

function round(ms) {
  return ms === null ? null : Math.round(ms * 10) / 10;
}

/** One stream's counts; finalized once (end or page hide), sending its beacon then. */
class Watch {
  constructor(response, options) {
    this.now = typeof options.now === "function" ? options.now : () => performance.now();
    this.start = typeof options.start === "number" ? options.start : this.now();
    this.terminalNames = new Set(options.terminal || DEFAULT_TERMINAL);
    let token = null;
    try {
      token = response.headers.get(STREAM_HEADER);
    } catch (_) {
      token = null;
    }
    this.endpoint = options.beaconEndpoint || null;
    this.token = token && token.length <= MAX_TOKEN_LENGTH ? token : null;
    this.lastEventAt = null;
    this.record = {
      events: 0,
      first_byte_ms: null,
      first_event_ms: null,
      gap_max_ms: null,
      terminal: false,
      end: null,
      duration_ms: null,
      open: true,
      beacon: this.endpoint && this.token ? "pending" : "off",
    };
    this.onHide = (ev) => {
      if (ev.type === "pagehide" || document.visibilityState === "hidden") this.finish("closed");
    };
    if (typeof addEventListener === "function") addEventListener("pagehide", this.onHide);
    if (typeof document !== "undefined") {
      document.addEventListener("visibilitychange", this.onHide);
    }
  }

  byte() {
    const r = this.record;
    if (r.open && r.first_byte_ms === null) r.first_byte_ms = round(this.now() - this.start);
  }

  event(name) {
    const r = this.record;
    if (!r.open) return;
    const at = this.now();
    r.events += 1;
    if (r.first_event_ms === null) r.first_event_ms = round(at - this.start);
    if (this.lastEventAt !== null) {
      const gap = round(at - this.lastEventAt);
      if (r.gap_max_ms === null || gap > r.gap_max_ms) r.gap_max_ms = gap;
    }
    this.lastEventAt = at;
    if (this.terminalNames.has(name)) r.terminal = true;
  }

  finish(end) {
    const r = this.record;
    if (!r.open) return; // finalize once, whichever comes first
    r.open = false;
    r.end = end;
    r.duration_ms = round(this.now() - this.start);
    if (typeof removeEventListener === "function") removeEventListener("pagehide", this.onHide);
    if (typeof document !== "undefined") {
      document.removeEventListener("visibilitychange", this.onHide);
    }
    if (r.beacon === "pending") r.beacon = this.send() ? "sent" : "refused";
  }

  send() {
    const r = this.record;
    const body = JSON.stringify({
      v: 1,
      token: this.token,
      events: r.events,
      first_byte_ms: r.first_byte_ms,
      first_event_ms: r.first_event_ms,
      gap_max_ms: r.gap_max_ms,
      terminal: r.terminal,
      end: r.end,
      duration_ms: r.duration_ms,
    });
    try {
      const blob = new Blob([body], { type: "text/plain;charset=utf-8" });
      if (blob.size >= MAX_BEACON_BYTES) return false;
      return navigator.sendBeacon(this.endpoint, blob) === true;
    } catch (_) {
      return false; // a page without sendBeacon, or one that refuses: never the page's problem
    }
  }
}

/** The SSE parser: feed it decoded text; it returns the events each piece completes. */
class Parser {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.hasData = false;
    this.type = "";
    this.id = "";
    this.first = true;
  }

  feed(text, final) {
    let buf = this.buffer + text;
    if (this.first && buf.length > 0) {
      this.first = false;
      if (buf.charCodeAt(0) === 0xfeff) buf = buf.slice(1); // one leading BOM is not data
    }
    const out = [];
    let pos = 0;
    for (;;) {
      let cr = buf.indexOf("\r", pos);
      let lf = buf.indexOf("\n", pos);
      if (cr === -1 && lf === -1) break;
      let end;
      let next;
      if (cr !== -1 && (lf === -1 || cr < lf)) {
        // A CR at the end of what we have may be the first half of a CRLF: wait for more.
        if (cr === buf.length - 1 && !final) break;
        end = cr;
        next = buf[cr + 1] === "\n" ? cr + 2 : cr + 1;
      } else {
        end = lf;
        next = lf + 1;
      }
      const ev = this.line(buf.slice(pos, end));
      if (ev !== null) out.push(ev);
      pos = next;
    }
    this.buffer = buf.slice(pos);
    // At the end of the body a line without its end is still a line, but an event
    // without its blank line is dropped (the standard's rule).
    if (final && this.buffer.length > 0) {
      this.line(this.buffer);
      this.buffer = "";
    }
    return out;
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line[0] === ":") return null; // a comment: `: open`, `: heartbeat`
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
    }
    if (field === "data") {
      this.data.push(value);
      this.hasData = true;
    } else if (field === "event") {
      this.type = value;
    } else if (field === "id") {
      if (!value.includes("\0")) this.id = value;
    } // `retry` and unknown fields are ignored: this reader does not reconnect
    return null;
  }

  dispatch() {
    const ev = this.hasData
      ? { event: this.type || "message", data: this.data.join("\n"), id: this.id }
      : null;
    this.data = [];
    this.hasData = false;
    this.type = "";
    return ev;
  }
}

function classify(err, signal) {
  if ((signal && signal.aborted) || (err && err.name === "AbortError")) return "closed";
  if (err instanceof TypeError) return "abrupt"; // fetch's network errors are TypeErrors
  return "error";
}

/**
 * The events of an SSE `response`, parsed, while counting the stream (see the top of
 * this file). Stop reading whenever you like: `break` counts as `closed` unless the
 * terminal event arrived.
 */
export async function* events(response, options = {}) {
  const watch = new Watch(response, options);
  last = watch;
  if (!response.ok || !response.body) {
    watch.finish("error");
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  const parser = new Parser();
  let end = "closed"; // what a `return()` from the caller (a `break`) leaves
  let finished = false;
  try {
    for (;;) {
      let step;
      try {
        step = await reader.read();
      } catch (err) {
        end = classify(err, options.signal);
        finished = true;
        throw err; // the caller's error, unchanged
      }
      const text = step.done ? decoder.decode() : decoder.decode(step.value, { stream: true });
      if (!step.done && step.value.length > 0) watch.byte();
      for (const ev of parser.feed(text, step.done)) {
        watch.event(ev.event);
        end = watch.record.terminal ? "clean" : "closed";
        yield ev;
      }
      if (step.done) {
        end = watch.record.terminal ? "clean" : "abrupt";
        finished = true;
        return;
      }
    }
  } finally {
    watch.finish(end);
    if (!finished) {
      // The caller stopped reading: end the request too, so the service sees the client go.
      reader.cancel().catch(() => {});
    }
    try {
      reader.releaseLock();
    } catch (_) {
      // nothing to release on a stream that already errored
    }
  }
}

// The reference service's chat page: streams POST /chat with fetch and chunkwatch.js,
// shows the answer as it arrives, the guard's switch, errors in words, and the browser's
// own counts of the last stream. No framework, no build step, nothing from elsewhere.
import { events, lastStream } from "/chunkwatch.js";

const $ = (id) => document.getElementById(id);
const form = $("ask");
const input = $("message");
const send = $("send");
const stop = $("stop");
const status = $("status");
const modeNote = $("mode");
const answer = $("answer");
const errorBox = $("error");
const beacon = document.querySelector('meta[name="chunkwatch-beacon"]')?.content || undefined;

let threadId = null; // the conversation the service issued; sent back to continue it
let controller = null;

function setState(state, words) {
  document.body.dataset.state = state;
  status.textContent = words;
  answer.setAttribute("aria-busy", state === "streaming" ? "true" : "false");
  send.disabled = state === "streaming";
  stop.disabled = state !== "streaming";
}

function ms(value) {
  return value === null || value === undefined ? "—" : `${value} ms`;
}

function showFunnel() {
  const s = lastStream();
  if (s === null) return;
  for (const dd of document.querySelectorAll("#browser dd")) {
    const v = s[dd.dataset.field];
    if (dd.dataset.field === "events") dd.textContent = String(v);
    else if (dd.dataset.field === "terminal") dd.textContent = v ? "arrived" : "not (yet)";
    else if (dd.dataset.field === "end") dd.textContent = v === null ? "open" : v;
    else dd.textContent = ms(v);
  }
  $("browser-events").textContent = String(s.events);
  $("browser-end").textContent = s.end === null ? "open" : s.end;
}

// The server's side of the last request, from the beacon endpoint's GET (the holder of the
// stream token may read its funnel and verdict): filled once the browser's own beacon was
// recorded, so the funnel reads gateway → … → sse → browser. Asked after a short wait and
// again a few times: the beacon and the service's record of the stream land just after the
// stream's end, and an early ask would only be refused.
async function showServer(token) {
  if (!beacon || !token) return;
  for (let attempt = 0; attempt < 10; attempt++) {
    await new Promise((resolve) => setTimeout(resolve, 250));
    let report;
    try {
      const response = await fetch(`${beacon}/${encodeURIComponent(token)}`);
      if (response.status === 404) continue; // not recorded yet
      if (!response.ok) return;
      report = await response.json();
    } catch (_) {
      return; // nothing to show: the page's own counts stay
    }
    fillServer(report);
    if (report.browser) return;
  }
}

function fillServer(report) {
  const funnel = report.funnel || {};
  const verdict = report.verdict;
  for (const row of document.querySelectorAll("tr.server-layer")) {
    const [units, outcome] = row.querySelectorAll("td");
    const layer = row.dataset.layer;
    units.textContent = layer in funnel ? String(funnel[layer]) : "—";
    outcome.textContent = verdict && verdict.layer === layer ? verdict.outcome : "—";
  }
  const words = [];
  if (verdict) words.push(`The service's verdict: ${verdict.outcome === "ok" ? "ok" : `${verdict.outcome} at ${verdict.layer}`}.`);
  if (report.browser) words.push(`The browser layer: ${report.browser.outcome}.`);
  $("server-slot").textContent = words.join(" ") || "Server layers: reported.";
  if (report.browser) document.body.dataset.browserOutcome = report.browser.outcome;
}

function addText(text) {
  answer.append(document.createTextNode(text));
}

function addNote(words) {
  const p = document.createElement("p");
  p.className = "tool";
  p.textContent = words;
  answer.append(p);
}

// The error event in words: what went wrong, where chunkwatch saw the data stop, and the
// trace id to quote to on-call. Fields are shown as text, never as HTML.
function showError(err) {
  errorBox.replaceChildren();
  const lines = [`The answer failed: ${err.message || err.type || "unknown error"}`];
  if (err.layer) {
    lines.push(`Where the data stopped: at the ${err.layer} layer (${err.outcome || "failed"}).`);
  }
  if (err.detail) lines.push(`What chunkwatch saw: ${err.detail}`);
  if (err.trace_id) lines.push(`Trace id: ${err.trace_id}`);
  for (const words of lines) {
    const p = document.createElement("p");
    p.textContent = words;
    errorBox.append(p);
  }
  errorBox.hidden = false;
}

function parse(data) {
  try {
    return JSON.parse(data);
  } catch (_) {
    return {};
  }
}

async function ask(message) {
  controller = new AbortController();
  answer.replaceChildren();
  errorBox.hidden = true;
  modeNote.hidden = true;
  setState("streaming", "Asking…");
  const start = performance.now();
  let response;
  try {
    response = await fetch("/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(threadId ? { message, thread_id: threadId } : { message }),
      signal: controller.signal,
    });
  } catch (err) {
    showError({ message: `the service could not be reached (${err.message})` });
    setState("error", "Failed.");
    return;
  }
  if (!response.ok || !(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
    const body = await response.json().catch(() => ({}));
    const err = body.error || { message: `HTTP ${response.status}` };
    if (err.type === "unknown_thread") threadId = null; // forgotten: the next turn starts anew
    showError(err);
    setState("error", "Failed.");
    return;
  }
  setState("streaming", "Streaming tokens…");
  const token = response.headers.get("X-Chunkwatch-Stream");
  let outcome = "error";
  try {
    const opts = { start, signal: controller.signal, beaconEndpoint: beacon };
    for await (const ev of events(response, opts)) {
      const data = parse(ev.data);
      if (ev.event === "token") {
        addText(data.text || "");
      } else if (ev.event === "tool") {
        addNote(`tool ${data.name}: ${data.output}`);
      } else if (ev.event === "mode") {
        modeNote.textContent =
          `The token stream broke (${data.reason}); the service switched to state ` +
          `streaming (${data.mode}): the answer now comes whole, step by step.`;
        modeNote.hidden = false;
        setState("streaming", "Streaming state updates…");
      } else if (ev.event === "update") {
        for (const m of data.messages || []) {
          if (m.role === "assistant" && m.content) addText(m.content);
          else if (m.role === "tool") addNote(`tool ${m.name}: ${m.content}`);
        }
      } else if (ev.event === "done") {
        threadId = data.thread_id || threadId;
        outcome = "done";
      } else if (ev.event === "error") {
        showError(data);
        outcome = "error";
      }
      showFunnel();
    }
    if (outcome === "done") setState("done", "Done.");
    else if (lastStream()?.terminal) setState("error", "Failed.");
    else {
      showError({ message: "the stream ended before the service said it was done" });
      setState("error", "Cut short.");
    }
  } catch (err) {
    if (controller.signal.aborted) setState("stopped", "Stopped.");
    else {
      showError({ message: `the stream broke (${err.message})` });
      setState("error", "Cut short.");
    }
  } finally {
    controller = null;
    showFunnel();
    showServer(token);
  }
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const message = input.value.trim();
  if (message && !controller) ask(message);
});
stop.addEventListener("click", () => controller?.abort());

// /?q=TEXT sends TEXT once: the query leaves the address bar so a reload does not resend it.
const q = new URLSearchParams(location.search).get("q");
if (q) {
  input.value = q;
  history.replaceState(null, "", location.pathname);
  ask(q);
}

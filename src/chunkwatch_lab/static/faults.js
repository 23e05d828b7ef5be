// The demo's fault panel (chunkwatch demo --serve): shows each gateway's fault and switches
// it through the service's /lab/faults. Stays hidden on a service without that route, which
// /healthz says ("lab": ["faults"]), so no other page ever asks for it.
const section = document.getElementById("faults");
const note = document.getElementById("faults-status");

function words(setting) {
  const params = Object.entries(setting)
    .filter(([k]) => k !== "fault" && k !== "modes" && k !== "side")
    .map(([k, v]) => `${k} ${v}`);
  return params.length ? `${setting.fault} (${params.join(", ")})` : setting.fault;
}

function show(side, setting) {
  document.getElementById(`fault-now-${side}`).textContent = words(setting);
  const select = document.getElementById(`fault-${side}`);
  if (setting.modes) {
    select.replaceChildren(
      ...setting.modes.map((mode) => new Option(mode, mode, false, mode === setting.fault)),
    );
  } else select.value = setting.fault;
}

async function load() {
  const health = await fetch("/healthz").then((r) => (r.ok ? r.json() : {}), () => ({}));
  if (!(health.lab || []).includes("faults")) return;
  const response = await fetch("/lab/faults");
  if (!response.ok) return;
  const { sides } = await response.json();
  for (const [side, setting] of Object.entries(sides)) show(side, setting);
  section.hidden = false;
}

async function apply(side, fault) {
  note.textContent = `Switching the ${side} gateway to ${fault}…`;
  const response = await fetch("/lab/faults", {
    method: "PUT",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ side, fault }),
  }).catch((err) => ({ ok: false, json: async () => ({ error: { message: err.message } }) }));
  const body = await response.json().catch(() => ({}));
  if (response.ok) {
    show(side, body);
    note.textContent = `The ${side} gateway is now ${words(body)}: send a message to see it.`;
  } else {
    note.textContent = `Not switched: ${body.error?.message || `HTTP ${response.status}`}`;
  }
}

for (const form of section.querySelectorAll("form[data-side]")) {
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    apply(form.dataset.side, form.elements.fault.value);
  });
}
load();

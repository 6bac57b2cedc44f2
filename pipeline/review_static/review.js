// The review page: the queue from /api/queue, each decision POSTed to /api/decisions at once.
// Plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const state = { flags: [], columns: [], current: 0, shownAt: Date.now(), editing: false, basis: {} };
const $ = (id) => document.getElementById(id);
const KEY = (f) => JSON.stringify(f.key);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

async function load() {
  const response = await fetch("/api/queue", { cache: "no-store" });
  const data = await response.json();
  state.flags = data.flags;
  state.columns = data.columns;
  state.unmarked = new Set(data.unmarked || []);
  state.basis = { minutes: data.minutes_per_correction, cost: data.cost_per_hour };
  const model = data.model || {};
  $("model").textContent = model.name ? `model ${model.name} version ${model.version || "?"}` : "";
  fillFilter("filter-kind", [...new Set(state.flags.map((f) => f.kind))]);
  fillFilter("filter-field", [...new Set(state.flags.map((f) => f.field).filter(Boolean))].sort());
  const firstOpen = visible().find((f) => !f.decision);
  state.current = firstOpen ? firstOpen.position : 0;
  render();
}

function fillFilter(id, values) {
  const select = $(id);
  for (const v of values) select.append(el("option", { value: v }, v));
}

function visible() {
  const kind = $("filter-kind").value, field = $("filter-field").value, open = $("filter-open").checked;
  return state.flags.filter((f) => (!kind || f.kind === kind) && (!field || f.field === field)
    && (!open || !f.decision || f.position === state.current));
}

function render() {
  renderQueue();
  renderDetail();
  renderProgress();
}

function label(flag) {
  if (flag.kind === "error") return `${flag.record_id} · ${flag.field}`;
  if (flag.kind === "duplicate") return `${flag.record_id} = ${flag.match_id}`;
  return flag.record_id;
}

function renderQueue() {
  const list = $("queue");
  list.replaceChildren();
  for (const flag of visible()) {
    const decision = flag.decision ? flag.decision.decision : "";
    const item = el("li", { class: `${decision} ${flag.position === state.current ? "current" : ""}`,
      "data-position": flag.position, onclick: () => select(flag.position) },
    el("span", { class: `kind ${flag.kind}` }, flag.kind),
    el("span", { class: "what", title: flag.reason }, label(flag)),
    el("span", { class: "state" }, decision ? `✓ ${decision}` : Number(flag.score).toFixed(2)));
    list.append(item);
  }
  const current = list.querySelector("li.current");
  if (current) current.scrollIntoView({ block: "nearest" });
}

function recordTable(flag) {
  const table = el("table", { class: "record" });
  const a = flag.record || {}, b = flag.match;
  const head = el("tr", {}, el("th", {}, ""), el("th", {}, `record ${flag.record_id}`));
  if (flag.kind === "duplicate") head.append(el("th", {}, `matched ${flag.match_id}${b ? "" : " (not loaded)"}`));
  table.append(head);
  for (const column of state.columns) {
    const row = el("tr", {}, el("th", {}, column), el("td", {}, a[column] ?? ""));
    if (flag.kind === "duplicate") {
      row.append(el("td", {}, b ? b[column] ?? "" : ""));
      if (b && !state.unmarked.has(column) && (a[column] ?? "") !== (b[column] ?? "")) row.classList.add("differs");
    }
    if (flag.kind === "error" && column === flag.field) row.classList.add("flagged");
    table.append(row);
  }
  return table;
}

function renderDetail() {
  const flag = state.flags[state.current];
  const box = $("detail");
  if (!flag) { box.replaceChildren(el("p", { class: "muted" }, "No flags in this folder.")); return; }
  const parts = [el("h2", {}, `${flag.kind} flag ${flag.position + 1} of ${state.flags.length}: record ${flag.record_id}`),
    el("p", { class: "reason" }, flag.reason)];
  if (flag.kind === "error") {
    parts.push(el("p", { class: "proposal" }, `${flag.field}: `, el("span", { class: "old" }, flag.value || "(empty)"),
      " → ", el("span", { class: "new" }, flag.suggestion
        || (flag.suggest_empty === "true" ? "(leave it empty)" : "(no suggestion: type the right value)"))));
  } else if (flag.kind === "duplicate") {
    parts.push(el("p", { class: "proposal" }, `same as record ${flag.match_id}? Differing fields are marked.`));
  }
  const actions = el("div", { class: "actions" },
    el("button", { class: "accept", onclick: () => decide("accept") }, "Accept (a)"),
    el("button", { class: "reject", onclick: () => decide("reject") }, "Reject (r)"));
  if (flag.kind === "error") {
    const input = el("input", { id: "new-value", placeholder: "the right value (e), Enter saves",
      value: flag.decision && flag.decision.decision === "edit" ? flag.decision.new_value : (flag.suggestion || flag.value) });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); decide("edit", input.value); }
      if (event.key === "Escape") { input.blur(); }
      event.stopPropagation();
    });
    actions.append(input, el("button", { class: "edit", onclick: () => decide("edit", $("new-value").value) }, "Save typed value"));
  }
  parts.push(actions);
  if (flag.decision) {
    const d = flag.decision;
    parts.push(el("p", { class: `decided ${d.decision}` },
      `decided: ${d.decision}${d.decision === "edit" ? ` → “${d.new_value}”` : ""} at ${d.decided_at}`));
  }
  parts.push(recordTable(flag));
  box.replaceChildren(...parts);
  state.shownAt = Date.now();
}

function renderProgress() {
  const decided = state.flags.filter((f) => f.decision);
  const done = decided.length, left = state.flags.length - done;
  const seconds = decided.reduce((sum, f) => sum + (Number(f.decision.seconds) || 0), 0);
  const accepted = decided.filter((f) => f.decision.decision !== "reject").length;
  let text = `${done} done · ${left} left · ${(seconds / 60).toFixed(1)} min spent`;
  const savedMinutes = accepted * (state.basis.minutes ?? 4) - seconds / 60;
  text += ` · ${savedMinutes.toFixed(0)} min of correction saved`;
  if (state.basis.cost != null) text += ` (€ ${(savedMinutes / 60 * state.basis.cost).toFixed(2)})`;
  $("progress-text").textContent = text;
  $("bar-done").style.width = `${state.flags.length ? (100 * done) / state.flags.length : 0}%`;
}

function select(position) {
  state.current = position;
  render();
}

function move(step) {
  const list = visible();
  const at = list.findIndex((f) => f.position === state.current);
  const next = list[Math.min(Math.max(at + step, 0), list.length - 1)];
  if (next) select(next.position);
}

function nextOpen() {
  const list = visible();
  const at = list.findIndex((f) => f.position === state.current);
  const after = list.slice(at + 1).concat(list.slice(0, at)).find((f) => !f.decision);
  if (after) select(after.position); else render();
}

async function decide(decision, newValue) {
  const flag = state.flags[state.current];
  if (!flag) return;
  if (decision === "accept" && flag.kind === "error" && !flag.suggestion && flag.suggest_empty !== "true") {
    toast("No suggestion to accept: type the right value (e), or reject (r).", true);
    $("new-value").focus();
    return;
  }
  const seconds = Math.min((Date.now() - state.shownAt) / 1000, 600).toFixed(1);
  const body = { record_id: flag.record_id, kind: flag.kind, field: flag.field, match_id: flag.match_id,
    value: flag.value, suggestion: flag.suggestion, decision, new_value: newValue ?? "", seconds };
  const response = await fetch("/api/decisions", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  const answer = await response.json();
  if (!response.ok) { toast(answer.detail || `not saved (${response.status})`, true); return; }
  flag.decision = answer;
  toast(`saved: ${decision}`);
  nextOpen();
}

async function refreshDecisions() {
  // Another tab may have decided flags: show its decisions too.
  const response = await fetch("/api/decisions", { cache: "no-store" });
  if (!response.ok) return;
  const byKey = new Map((await response.json()).decisions.map((d) => [JSON.stringify(d.key), d]));
  let changed = false;
  for (const flag of state.flags) {
    const d = byKey.get(KEY(flag)) || null;
    if (JSON.stringify(d) !== JSON.stringify(flag.decision)) { flag.decision = d; changed = true; }
  }
  if (changed && !state.editing) render();
}

let toastTimer;
function toast(text, error = false) {
  const node = $("toast");
  node.textContent = text;
  node.className = `show${error ? " error" : ""}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { node.className = ""; }, error ? 4000 : 1500);
}

document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT" || event.target.tagName === "SELECT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const flag = state.flags[state.current];
  switch (event.key) {
    case "a": decide("accept"); break;
    case "r": decide("reject"); break;
    case "e":
      if (flag && flag.kind === "error") { event.preventDefault(); const input = $("new-value"); input.focus(); input.select(); }
      break;
    case "j": case "ArrowDown": event.preventDefault(); move(1); break;
    case "k": case "ArrowUp": event.preventDefault(); move(-1); break;
    default: return;
  }
});
document.addEventListener("focusin", (e) => { state.editing = e.target.id === "new-value"; });
document.addEventListener("focusout", () => { state.editing = false; });
for (const id of ["filter-kind", "filter-field", "filter-open"]) {
  $(id).addEventListener("change", () => {
    const list = visible();
    if (list.length && !list.some((f) => f.position === state.current)) state.current = list[0].position;
    render();
    $(id).blur();
  });
}
window.addEventListener("focus", refreshDecisions);
setInterval(refreshDecisions, 5000);
load();

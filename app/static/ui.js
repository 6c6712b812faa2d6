// The attention explorer: fills the form from the URL, calls POST /score, draws the probabilities and the
// attention heatmap (and DSIN's sessions when the answer has them). Plain browser JavaScript, no build step.
//
// URL: /ui?user=U&candidates=a,b,c&model=din&version=2&auto=1   (auto=1 scores on load)
//      an API key can be given after '#': /ui?user=U#key=SECRET (a fragment never reaches a server or its logs)
// body[data-state] says where the page is: idle, loading, done or error (tests wait for done).
"use strict";

const $ = (id) => document.getElementById(id);

// viridis at 9 stops, as training.explain's PNG draws it
const SCALE = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"];

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

const STOPS = SCALE.map(hexToRgb);

// t in [0, 1] → [r, g, b] interpolated between the scale's stops
function colour(t) {
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
}

function css([r, g, b]) {
  return `rgb(${r}, ${g}, ${b})`;
}

function readable([r, g, b]) {
  return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? "#000" : "#fff"; // text that stays legible on the cell
}

function element(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k === "style") Object.assign(el.style, v);
    else if (k.startsWith("data-")) el.setAttribute(k, v);
    else el[k] = v;
  }
  for (const child of children) el.append(child);
  return el;
}

function setState(state, message) {
  document.body.dataset.state = state;
  $("status").textContent = message;
  $("status").className = state;
}

// picking: a history item clicked in the heatmap joins the candidates (once)
function addCandidate(item) {
  const current = parseCandidates($("candidates").value);
  if (!current.includes(item)) $("candidates").value = [...current, item].join(", ");
}

function parseCandidates(text) {
  return text
    .split(/[\s,]+/)
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
}

function keyFromFragment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  return fragment.get("key");
}

async function loadModels(selected) {
  const select = $("model");
  try {
    const r = await fetch("models", { headers: { Accept: "application/json" } });
    if (!r.ok) return;
    const body = await r.json();
    for (const m of body.models) {
      if (![...select.options].some((o) => o.value === m.name)) {
        select.append(element("option", { value: m.name, textContent: m.name }));
      }
    }
    select.options[0].textContent = `(default: ${body.default})`;
  } catch (e) {
    // the page still works with a model typed into the URL; the list is a convenience
  }
  if (selected) select.value = selected;
}

function request() {
  const body = {
    user_id: $("user").value.trim(),
    candidates: parseCandidates($("candidates").value).map((item_id) => ({ item_id })),
    return_attention: true,
  };
  if ($("model").value) body.model = $("model").value;
  if ($("version").value.trim()) body.version = $("version").value.trim();
  return body;
}

async function score(event) {
  if (event) event.preventDefault();
  const body = request();
  if (!body.user_id || body.candidates.length === 0) {
    setState("error", "Enter a user id and at least one candidate item id.");
    return;
  }
  const headers = { "Content-Type": "application/json", Accept: "application/json" };
  const key = $("key").value.trim();
  if (key) {
    headers.Authorization = `Bearer ${key}`;
    sessionStorage.setItem("ctr-ui-key", key); // kept for this tab only
  }
  setState("loading", `Scoring ${body.candidates.length} candidates for user ${body.user_id}…`);
  let r;
  try {
    r = await fetch("score", { method: "POST", headers, body: JSON.stringify(body) });
  } catch (e) {
    setState("error", `Could not reach the service: ${e}`);
    return;
  }
  const answer = await r.json().catch(() => null);
  if (!r.ok) {
    const detail = answer && answer.detail !== undefined ? JSON.stringify(answer.detail) : r.statusText;
    const hint = r.status === 401 ? " (enter the API key: this service requires one on /score)" : "";
    setState("error", `HTTP ${r.status}: ${detail}${hint}`);
    return;
  }
  try {
    draw(answer);
  } catch (e) {
    setState("error", `Could not draw the answer: ${e}`); // an answer of another shape than this page knows
    return;
  }
  setState("done", `Scored ${answer.scores.length} candidates against ${answer.history.length} history items.`);
}

// the colour scale spans the values shown, as matplotlib's does in training.explain's PNG: DIN's sigmoid
// weights often sit in a narrow band, which a 0-to-1 scale would paint one colour
function extent(values) {
  if (values.length === 0) return { min: 0, max: 0 };
  let min = Infinity;
  let max = -Infinity;
  for (const v of values) {
    min = Math.min(min, v); // a loop: Math.min(...values) overflows the stack at 1000 × 1000 weights
    max = Math.max(max, v);
  }
  return { min, max };
}

// session index of each history position (-1: in no session), from the answer's `sessions`
function sessionOfColumns(sessions, length) {
  const of = new Array(length).fill(-1);
  (sessions || []).forEach((members, s) => members.forEach((j) => (of[j] = s)));
  return of;
}

function draw(answer) {
  const history = answer.history;
  const scores = answer.scores;
  const hasSessions = Array.isArray(answer.sessions);
  const sessionOf = sessionOfColumns(answer.sessions, history.length);
  const range = extent(scores.flatMap((s) => s.attention || []));
  const shade = (a) => colour(range.max > range.min ? (a - range.min) / (range.max - range.min) : 0.5);

  const source = answer.history_source + (answer.degraded ? ", degraded: the behaviour store did not answer" : "");
  const scale = history.length
    ? `colour: attention from ${range.min.toPrecision(3)} to ${range.max.toPrecision(3)}`
    : "no history: nothing to attend to";
  $("summary").textContent =
    `${answer.model} version ${answer.version} · user ${answer.user_id} · history from ${source} ` +
    `(${history.length} items, most recent first) · ${scale}`;
  $("legend").hidden = history.length === 0;
  $("legend-min").textContent = range.min.toPrecision(3);
  $("legend-max").textContent = range.max.toPrecision(3);
  $("legend-bar").style.background = `linear-gradient(to right, ${SCALE.join(", ")})`;

  const table = $("heatmap");
  table.replaceChildren();
  const head = element("thead");
  if (hasSessions) {
    const row = element("tr", { class: "session-row" }, element("th", { colSpan: 2, textContent: "session" }));
    let j = 0;
    while (j < history.length) {
      let k = j;
      while (k + 1 < history.length && sessionOf[k + 1] === sessionOf[j]) k++;
      const s = sessionOf[j];
      const label = s >= 0 ? `session ${s + 1}` : "–";
      row.append(element("th", { colSpan: k - j + 1, class: `session s${s % 2}`, textContent: label, "data-session": s }));
      j = k + 1;
    }
    head.append(row);
  }
  const columns = element("tr", {}, element("th", { textContent: "candidate" }), element("th", { textContent: "probability" }));
  history.forEach((h, j) => {
    const cell = element(
      "th",
      { class: "hist", title: `history[${j}]: item ${h.item_id}, category ${h.category_id ?? "?"}` },
      element("span", { class: "item", textContent: h.item_id }),
      element("span", { class: "cat", textContent: h.category_id ?? "?" }),
    );
    cell.dataset.item = h.item_id;
    cell.title += " · click: add it to the candidates";
    cell.addEventListener("click", () => addCandidate(h.item_id));
    if (hasSessions && j > 0 && sessionOf[j] !== sessionOf[j - 1]) cell.classList.add("session-start");
    columns.append(cell);
  });
  head.append(columns);
  table.append(head);

  const body = element("tbody");
  for (const s of scores) {
    const bar = element("span", { class: "bar", style: { width: `${(100 * s.probability).toFixed(1)}%` } });
    const prob = element("td", { class: "prob" }, bar, element("span", { class: "value", textContent: s.probability.toFixed(4) }));
    prob.dataset.probability = String(s.probability);
    const row = element("tr", { class: "candidate" }, element("th", { class: "cand", textContent: s.item_id }), prob);
    row.dataset.item = s.item_id;
    (s.attention || []).forEach((a, j) => {
      const rgb = shade(a);
      const cell = element("td", {
        class: "att",
        title: `${s.item_id} → history[${j}] ${history[j].item_id}: ${a}`,
        textContent: history.length <= 30 ? a.toFixed(2) : "",
        style: { background: css(rgb), color: readable(rgb) },
      });
      cell.dataset.attention = String(a);
      if (hasSessions && j > 0 && sessionOf[j] !== sessionOf[j - 1]) cell.classList.add("session-start");
      row.append(cell);
    });
    body.append(row);
  }
  table.append(body);
  drawSessions(answer, hasSessions);
  $("result").hidden = false;
}

// DSIN: one row per candidate, one column per session, coloured by the candidate's weight on that session
function drawSessions(answer, hasSessions) {
  const section = $("sessions-section");
  const table = $("sessions");
  table.replaceChildren();
  section.hidden = !hasSessions;
  if (!hasSessions) return;
  const sessions = answer.sessions;
  const range = extent(answer.scores.flatMap((s) => s.session_weights || []));
  const head = element("tr", {}, element("th", { textContent: "candidate" }));
  sessions.forEach((members, k) =>
    head.append(element("th", { class: "session", textContent: `session ${k + 1} (${members.length} items)`, "data-session": k })),
  );
  table.append(element("thead", {}, head));
  const body = element("tbody");
  for (const s of answer.scores) {
    const row = element("tr", { class: "candidate" }, element("th", { class: "cand", textContent: s.item_id }));
    row.dataset.item = s.item_id;
    (s.session_weights || []).forEach((w) => {
      const rgb = colour(range.max > range.min ? (w - range.min) / (range.max - range.min) : 0.5);
      const cell = element("td", {
        class: "weight",
        textContent: w.toFixed(3),
        style: { background: css(rgb), color: readable(rgb) },
      });
      cell.dataset.weight = String(w);
      row.append(cell);
    });
    body.append(row);
  }
  table.append(body);
}

function init() {
  const q = new URLSearchParams(location.search);
  $("user").value = q.get("user") || "";
  $("candidates").value = (q.get("candidates") || "").split(",").join(", ");
  $("version").value = q.get("version") || "";
  const model = q.get("model") || "";
  if (model) $("model").append(element("option", { value: model, textContent: model }));
  $("model").value = model;
  $("key").value = keyFromFragment() || sessionStorage.getItem("ctr-ui-key") || "";
  $("query").addEventListener("submit", score);
  loadModels(model);
  if (q.get("auto") === "1") score();
}

init();

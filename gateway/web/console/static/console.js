// The ops console. Reads GET /api/v1/admin/console every second with the admin token (kept in
// the tab's session storage) and keeps the last WINDOW readings in the page for its charts
// (uPlot). Counters arrive as totals since the instance started; rates and latency quantiles
// are differences between two readings. Any numeric figure of the view that the page does not
// know is shown as a tile, and charted beside the backlog when it is a lag or a queue length.
// The rules panel reads GET /api/v1/admin/rules and is hidden while that answers 404.
"use strict";

const WINDOW = 300;            // readings kept: five minutes at one per second
const LATENCY_SPAN = 5;        // quantiles over the last 5 readings (seconds)
const RULES_EVERY = 5;         // rules re-read every 5 readings
const KNOWN = new Set(["mode", "changed_at", "history", "breaker", "entries_in", "skus",
  "answers", "latency", "workers"]);
const SKU_COLUMNS = ["stock", "available", "held", "sold", "holds", "backlog", "pending", "dead"];
const OVERLOAD = new Set(["rate_limited", "client_rate_limited", "busy", "queue_full",
  "unavailable"]);
const LAGGING = /lag|backlog|queue|length|depth|pending/i;
// The contract's rules, in its order, with their units.
const RULES = [["qps", "orders/s"], ["burst", "orders"], ["breaker_rt_ms", "ms"],
  ["breaker_slow_ratio", "share"], ["breaker_min_calls", "calls"], ["breaker_window_ms", "ms"],
  ["breaker_open_s", "s"], ["client_qps", "orders/s"], ["client_burst", "orders"],
  ["user_qps", "orders/s"], ["user_burst", "orders"]];

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("flashgate-token") || "";
let mode = null;
let polls = 0;
let previous = null;        // {at, answers, entries_in}: the last reading, for rates
const latencies = [];       // the last LATENCY_SPAN + 1 latency readings
let rules = null;           // the rules in force, as last read

function headers(extra) {
  return Object.assign({ "Authorization": "Bearer " + token,
    "X-Operator": $("operator").value || "console" }, extra || {});
}
function when(t) {
  if (!t) return "never";
  const ms = t < 1e12 ? t * 1000 : t;  // epoch seconds or milliseconds
  return new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = String(text);
  if (cls) td.className = cls;
  return td;
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function fixed(v, digits) { return v === null || v === undefined ? "-" : v.toFixed(digits); }
function words(key) { return key.replace(/[._]/g, " "); }

// -- charts ----------------------------------------------------------------------------------

function palette() {
  const css = getComputedStyle(document.documentElement);
  const v = (name) => css.getPropertyValue(name).trim();
  return { fg: v("--fg"), grid: v("--grid"), muted: v("--muted"), good: v("--good"),
    bad: v("--bad"), warn: v("--warn"), info: v("--info"), violet: v("--violet"),
    // no green among the others: green is for what went well
    series: [v("--info"), v("--warn"), v("--violet"), v("--bad"), "#14a3a3", "#d4569b",
      "#8a9a2b", "#a0522d", v("--muted")] };
}

// One chart: a rolling window of named series (added as they appear), drawn by uPlot, with the
// newest value of each beside it.
class Chart {
  constructor(id, unit, digits, colors) {
    this.box = $(id);
    this.plot = this.box.querySelector(".plot");
    this.now = this.box.querySelector(".now");
    this.unit = unit;
    this.digits = digits;
    this.colors = colors || {};
    this.keys = [];
    this.values = {};
    this.uplot = null;
    this.stale = true;      // series added since the chart was built
  }
  push(xs, point) {
    for (const key of Object.keys(point)) {
      if (!(key in this.values)) {
        this.keys.push(key);
        this.colors[key] = this.colors[key] || this.nextColor();
        this.values[key] = new Array(xs.length - 1).fill(null);
        this.stale = true;
      }
    }
    for (const key of this.keys) {
      const series = this.values[key];
      series.push(key in point ? point[key] : null);
      while (series.length > xs.length) series.shift();
    }
    this.draw(xs);
    this.showNow(point);
  }
  nextColor() {  // the first of the palette's colours no series of this chart has yet
    const taken = new Set(Object.values(this.colors));
    const free = palette().series.filter((c) => !taken.has(c));
    return free.length ? free[0] : palette().muted;
  }
  draw(xs) {
    const data = [xs, ...this.keys.map((k) => this.values[k])];
    if (this.uplot && !this.stale) { this.uplot.setData(data); return; }
    if (this.uplot) this.uplot.destroy();
    const p = palette();
    const axis = { stroke: p.fg, grid: { stroke: p.grid }, ticks: { stroke: p.grid } };
    const clock = (u, splits) => splits.map((t) => new Date(t * 1000).toTimeString().slice(0, 8));
    const unit = this.unit;
    const y = Object.assign({ label: unit, size: 60, labelSize: 18 }, axis);
    if (this.digits === 0) y.incrs = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4,
      5e4, 1e5, 2e5, 5e5, 1e6];
    this.uplot = new uPlot({
      width: this.plot.clientWidth || 500, height: 230,
      legend: { show: false },
      hooks: { drawClear: [shadeQueueOnly] },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(hi * 1.1, 1)] } },
      axes: [Object.assign({ values: clock, space: 70 }, axis), y],
      series: [{}, ...this.keys.map((k) => ({
        label: k, width: 2, spanGaps: false,
        stroke: this.colors[k],
      }))],
    }, data, this.plot);
    this.stale = false;
  }
  showNow(point) {
    this.now.replaceChildren();
    this.keys.forEach((k) => {
      const li = el("li");
      const sw = el("span", "sw");
      sw.style.background = this.colors[k];
      li.append(sw, words(k) + " ", el("b", "", fixed(k in point ? point[k] : null, this.digits)),
        " " + this.unit);
      li.dataset.series = k;
      this.now.append(li);
    });
  }
  resize() { if (this.uplot) this.uplot.setSize({ width: this.plot.clientWidth, height: 230 }); }
}

let charts = null;
const xs = [];
const modes = [];           // the mode of each reading in xs

// Behind each chart: the readings taken in QUEUE_ONLY, shaded.
function shadeQueueOnly(u) {
  const ctx = u.ctx;
  const { top, height } = u.bbox;
  ctx.save();
  ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--queued");
  for (let i = 0; i < modes.length; i++) {
    if (modes[i] !== "QUEUE_ONLY") continue;
    let j = i;
    while (j + 1 < modes.length && modes[j + 1] === "QUEUE_ONLY") j++;
    const x0 = u.valToPos(xs[Math.max(0, i - 1)], "x", true);
    const x1 = u.valToPos(xs[j], "x", true);
    ctx.fillRect(x0, top, Math.max(x1 - x0, 2), height);
    i = j;
  }
  ctx.restore();
}

function makeCharts() {
  const p = palette();
  charts = {
    outcomes: new Chart("chart-outcomes", "orders/s", 1, { accepted: p.good,
      "sold out": p.warn, refused: p.violet, shed: p.bad, replayed: p.info }),
    refusals: new Chart("chart-refusals", "orders/s", 1, { sold_out: p.warn,
      rate_limited: p.bad, client_rate_limited: "#d4569b", busy: "#a0522d" }),
    latency: new Chart("chart-latency", "ms", 2, { p50: p.info, p99: p.warn }),
    backlog: new Chart("chart-backlog", "entries", 0, { backlog: p.info }),
  };
}

// -- figures ---------------------------------------------------------------------------------

// The q-quantile of a cumulative histogram (counts has one more entry than le: every answer),
// interpolated within its bucket; beyond the last bound, the last bound.
function quantile(q, le, counts) {
  const total = counts[counts.length - 1];
  if (!total) return null;
  const rank = q * total;
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] < rank) continue;
    if (i >= le.length) return le[le.length - 1];
    const lo = i ? le[i - 1] : 0;
    const below = i ? counts[i - 1] : 0;
    const inside = counts[i] - below;
    return inside ? lo + (le[i] - lo) * (rank - below) / inside : le[i];
  }
  return le[le.length - 1];
}

function outcome(code) {
  if (code === "created") return "accepted";
  if (code === "replayed") return "replayed";
  if (code === "sold_out") return "sold out";
  if (OVERLOAD.has(code)) return "shed";
  return "refused";
}

// Rates per second since the previous reading (null across a restart: a counter went back).
function rates(view, at) {
  const outcomes = { accepted: 0, "sold out": 0, refused: 0, shed: 0, replayed: 0 };
  const reasons = {};
  let ok = previous !== null && at > previous.at;
  const dt = ok ? (at - previous.at) / 1000 : 1;
  for (const [code, n] of Object.entries(view.answers || {})) {
    const was = ok ? (previous.answers[code] || 0) : n;
    if (n < was) ok = false;
    const rate = (n - was) / dt;
    outcomes[outcome(code)] += rate;
    if (code !== "created" && code !== "replayed") reasons[code] = rate;
  }
  if (!ok) {
    for (const k of Object.keys(outcomes)) outcomes[k] = null;
    for (const k of Object.keys(reasons)) reasons[k] = null;
  }
  const entries = ok ? Math.max(0, (view.entries_in - previous.entries_in) / dt) : null;
  return { outcomes, reasons, entries };
}

function latencyNow(view) {
  const lat = view.latency;
  if (!lat) return { p50: null, p99: null };
  latencies.push(lat.counts);
  while (latencies.length > LATENCY_SPAN + 1) latencies.shift();
  const first = latencies[0];
  const delta = lat.counts.map((c, i) => c - (first[i] || 0));
  if (delta.some((d) => d < 0)) { latencies.length = 0; return { p50: null, p99: null }; }
  return { p50: quantile(0.5, lat.le_ms, delta), p99: quantile(0.99, lat.le_ms, delta) };
}

// Numeric figures the page has no place for: top-level numbers, the numbers of top-level
// objects ("queue.length") and of lists of records ("relays.<group>.lag"), as the view gives them.
function extras(view) {
  const found = {};
  for (const [key, value] of Object.entries(view)) {
    if (KNOWN.has(key)) continue;
    if (typeof value === "number") found[key] = value;
    else if (Array.isArray(value)) {
      // a list of records ("relays": [{group, target, lag, ...}]): each by its first text field
      value.forEach((item, i) => {
        if (!item || typeof item !== "object") return;
        const name = Object.values(item).find((v) => typeof v === "string") || String(i);
        numbers(item, `${key}.${name}`, found);
      });
    } else if (value && typeof value === "object") numbers(value, key, found);
  }
  return found;
}
function numbers(record, prefix, found) {
  for (const [sub, v] of Object.entries(record)) {
    if (typeof v === "number") found[prefix + "." + sub] = v;
  }
}

function showExtras(found) {
  const tiles = $("tiles");
  for (const [key, value] of Object.entries(found)) {
    let tile = tiles.querySelector(`[data-figure="${CSS.escape(key)}"]`);
    if (!tile) {
      tile = el("div", "tile");
      tile.dataset.figure = key;
      tile.append(el("span", "label", words(key)), el("b"));
      tiles.append(tile);
    }
    tile.querySelector("b").textContent = Number.isInteger(value) ? value : value.toFixed(2);
  }
}

// -- panels ----------------------------------------------------------------------------------

function showSkus(skus) {
  const body = $("skus").tBodies[0];
  const head = $("skus").tHead.rows[0];
  const columns = [...SKU_COLUMNS];
  for (const s of skus) {
    for (const [k, v] of Object.entries(s)) {
      // any other figure of a SKU (a number, or a state such as a fair start's draw)
      const shown = typeof v === "number" || typeof v === "string";
      if (k !== "sku_id" && shown && !columns.includes(k)) columns.push(k);
    }
  }
  while (head.cells.length < columns.length + 1) {
    head.append(el("th", "", words(columns[head.cells.length - 1])));
  }
  body.replaceChildren();
  const progress = $("progress");
  progress.replaceChildren();
  for (const s of skus) {
    const row = body.insertRow();
    row.dataset.sku = s.sku_id;
    cell(row, s.sku_id);
    for (const c of columns) cell(row, c in s ? s[c] : "-");
    progress.append(sellOut(s));
  }
}

function sellOut(s) {
  const line = el("div", "sku");
  line.dataset.sku = s.sku_id;
  const bar = el("div", "bar");
  const part = (n, cls) => {
    const span = el("span", cls);
    span.style.width = (s.stock > 0 ? (100 * n) / s.stock : 0) + "%";
    return span;
  };
  bar.append(part(s.sold, "sold"), part(s.held, "held"));
  const pct = s.stock > 0 ? Math.round((100 * (s.sold + s.held)) / s.stock) : 0;
  line.append(el("span", "name", s.sku_id), bar,
    el("span", "figure", `${s.sold} sold + ${s.held} held of ${s.stock} (${pct} %)`));
  return line;
}

function showWorkers(workers, breaker) {
  const body = $("workers").tBodies[0];
  body.replaceChildren();
  for (const w of workers || []) {
    const row = body.insertRow();
    cell(row, w.pid);
    cell(row, w.breaker, w.breaker);
    cell(row, w.mode || "-");
  }
  if (!workers || !workers.length) cell(body.insertRow(), "this worker: " + breaker, breaker);
}

function showHistory(history) {
  const body = $("history").tBodies[0];
  body.replaceChildren();
  for (const h of history) {
    const row = body.insertRow();
    for (const v of [when(h.at), h.from, h.to, h.by || "-", h.client || "-"]) cell(row, v);
  }
}

function showMode(view) {
  mode = view.mode;
  $("modebar").hidden = false;
  $("mode").textContent = mode;
  $("mode").className = "mode " + mode;
  $("switch").textContent = mode === "NORMAL" ? "Switch to QUEUE_ONLY" : "Switch to NORMAL";
  $("since").textContent = when(view.changed_at);
}

// -- the loop --------------------------------------------------------------------------------

async function refresh() {
  if (!token) return;
  let answer;
  try {
    answer = await fetch("/api/v1/admin/console", { headers: headers() });
  } catch (e) { $("error").textContent = "gateway unreachable"; return; }
  if (answer.status === 401) { $("error").textContent = "wrong token"; $("board").hidden = true; return; }
  if (!answer.ok) { $("error").textContent = "error " + answer.status; return; }
  const view = await answer.json();
  const at = Date.now();
  $("error").textContent = "";
  $("login").hidden = true;
  $("board").hidden = false;
  if (!charts) makeCharts();
  showMode(view);
  render(view, at);
  if (polls++ % RULES_EVERY === 0) readRules();
  $("updated").textContent = new Date(at).toLocaleTimeString();
}

function render(view, at) {
  showSkus(view.skus);
  showWorkers(view.workers, view.breaker);
  showHistory(view.history);
  if (previous !== null && at - previous.at < 500) return;  // an extra reading (the switch)
  const r = rates(view, at);
  const lat = latencyNow(view);
  const found = extras(view);
  const backlog = view.skus.reduce((sum, s) => sum + s.backlog, 0);
  previous = { at, answers: view.answers || {}, entries_in: view.entries_in };
  xs.push(at / 1000);
  modes.push(view.mode);
  while (xs.length > WINDOW) xs.shift();
  while (modes.length > WINDOW) modes.shift();
  const o = r.outcomes;
  charts.outcomes.push(xs, o);
  charts.refusals.push(xs, r.reasons);
  charts.latency.push(xs, lat);
  const lagging = { backlog };
  for (const [k, v] of Object.entries(found)) if (LAGGING.test(k)) lagging[k] = v;
  charts.backlog.push(xs, lagging);
  const sum = (...vs) => (vs.some((v) => v === null) ? null : vs.reduce((a, b) => a + b, 0));
  $("rate-answers").textContent = fixed(sum(o.accepted, o.replayed, o["sold out"], o.refused, o.shed), 1);
  $("rate-accepted").textContent = fixed(o.accepted, 1);
  $("rate-refused").textContent = fixed(sum(o["sold out"], o.refused, o.shed), 1);
  $("p50").textContent = fixed(lat.p50, 2);
  $("p99").textContent = fixed(lat.p99, 2);
  $("backlog").textContent = backlog;
  $("rate").textContent = fixed(r.entries, 1);
  showExtras(found);
}

// -- rules -----------------------------------------------------------------------------------

async function readRules() {
  let answer;
  try {
    answer = await fetch("/api/v1/admin/rules", { headers: headers() });
  } catch (e) { return; }
  if (answer.status === 404) { $("rules").hidden = true; return; }
  if (!answer.ok) return;
  showRules(await answer.json());
}

function showRules(current) {
  rules = current;
  $("rules").hidden = false;
  $("rules-version").textContent = current.version === undefined ? "-" : current.version;
  const body = $("rules-table").tBodies[0];
  for (const [name, unit] of RULES) {
    let row = body.querySelector(`tr[data-rule="${name}"]`);
    if (!row) {
      row = body.insertRow();
      row.dataset.rule = name;
      cell(row, words(name));
      cell(row, "");
      const input = el("input");
      input.name = name;
      input.inputMode = "decimal";
      input.addEventListener("input", () => input.classList.toggle("changed", edited(input)));
      row.insertCell().append(input);
      cell(row, unit, "unit");
    }
    row.cells[1].textContent = name in current ? current[name] : "-";
    const input = row.querySelector("input");
    if (!input.classList.contains("changed")) input.value = name in current ? current[name] : "";
  }
  const hist = $("rules-history").tBodies[0];
  hist.replaceChildren();
  for (const h of current.history || []) {
    const row = hist.insertRow();
    cell(row, when(h.at));
    cell(row, h.by || "-");
    cell(row, h.client || "-");
    cell(row, change(h.before || {}, h.after || {}));
  }
}

function edited(input) {
  if (rules === null) return false;
  const was = input.name in rules ? String(rules[input.name]) : "";
  return input.value.trim() !== was;
}

function change(before, after) {
  const parts = [];
  for (const [k, v] of Object.entries(after)) {
    if (before[k] !== v) parts.push(`${k} ${before[k] === undefined ? "-" : before[k]} → ${v}`);
  }
  return parts.join(", ") || "-";
}

// The changed fields: numbers where they read as numbers, else the text as typed (the gateway
// answers 400 naming the field, and nothing is applied).
function changes() {
  const out = {};
  for (const input of $("rules-table").querySelectorAll("input")) {
    if (!edited(input)) continue;
    const text = input.value.trim();
    const n = Number(text);
    out[input.name] = text !== "" && Number.isFinite(n) ? n : text;
  }
  return out;
}

function review(event) {
  event.preventDefault();
  $("rules-error").textContent = "";
  const changed = changes();
  const list = $("rules-diff");
  list.replaceChildren();
  for (const [k, v] of Object.entries(changed)) list.append(el("li", "", `${k}: ${rules[k]} → ${v}`));
  $("rules-note").textContent = list.children.length ? "" : "nothing changed";
  $("rules-confirm").hidden = !list.children.length;
}

async function apply() {
  const changed = changes();
  $("rules-confirm").hidden = true;
  let answer;
  try {
    answer = await fetch("/api/v1/admin/rules", { method: "PUT",
      headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(changed) });
  } catch (e) { $("rules-error").textContent = "gateway unreachable"; return; }
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    $("rules-error").textContent = `refused (${answer.status}): ` + (body.message || body.error || "");
    return;
  }
  for (const input of $("rules-table").querySelectorAll("input")) input.classList.remove("changed");
  $("rules-note").textContent = "applied" + (body.version === undefined ? "" : ", version " + body.version);
  if (body && typeof body === "object" && "version" in body) showRules(body); else readRules();
}

// -- wiring ----------------------------------------------------------------------------------

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("token").value;
  sessionStorage.setItem("flashgate-token", token);
  previous = null;
  refresh();
});

$("switch").addEventListener("click", async () => {
  const to = mode === "NORMAL" ? "QUEUE_ONLY" : "NORMAL";
  if (!confirm("Switch every gateway to " + to + "?")) return;
  const answer = await fetch("/api/v1/order/switch?mode=" + to, { method: "POST", headers: headers() });
  if (!answer.ok) { $("error").textContent = "switch refused: " + answer.status; }
  refresh();
});

$("rules-form").addEventListener("submit", review);
$("rules-apply").addEventListener("click", apply);
$("rules-cancel").addEventListener("click", () => { $("rules-confirm").hidden = true; });
window.addEventListener("resize", () => { if (charts) Object.values(charts).forEach((c) => c.resize()); });

setInterval(refresh, 1000);
refresh();

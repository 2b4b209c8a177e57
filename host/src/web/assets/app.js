// The uet dashboard: a page per hash (#/, #/run/N, #/tools), data from the daemon's JSON
// reads, live changes from one Server-Sent Events stream per tab. Every text from the daemon
// goes into the page as text (textContent), never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const STATES = ["pending", "running", "succeeded", "failed", "skipped", "canceled"];
const NODE_W = 150, NODE_H = 24, PITCH_X = 190, PITCH_Y = 34, PAD = 12;
const ROW_H = 20;

// Errors of the page itself are shown, not only logged: a broken view says so.
window.addEventListener("error", (e) => showError(String(e.message || e)));
window.addEventListener("unhandledrejection", (e) => showError(String(e.reason)));

function showError(text) {
  const box = document.getElementById("errors");
  box.hidden = false;
  box.textContent = text;
}

function clearError() {
  const box = document.getElementById("errors");
  box.hidden = true;
  box.textContent = "";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

// replaceChildren without the nulls that stand for "nothing here" (it would print "null").
function fill(node, ...children) {
  node.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

class NotLoggedIn extends Error {}

async function api(path, options) {
  const res = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (res.status === 401) throw new NotLoggedIn();
  const body = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function badge(state) {
  return el("span", { class: "badge st-" + state }, state);
}

function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "";
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + Math.round(s % 60) + "s";
  return Math.floor(m / 60) + "h " + (m % 60) + "m";
}

function span(a, b) {
  if (!a) return "";
  return seconds(((b || Date.now()) - a) / 1000);
}

// Each page drawn has a number; a page whose loading finishes after another page was asked
// for must not follow its stream into a table no longer shown.
let generation = 0;

// One stream per tab: a new page closes the last page's.
let stream = null;
function follow(url, handlers, page) {
  if (page !== generation) return;
  if (stream) stream.close();
  stream = new EventSource(url);
  const live = document.getElementById("live");
  stream.onopen = () => live.classList.add("on");
  stream.onerror = () => live.classList.remove("on");
  for (const [name, fn] of Object.entries(handlers)) {
    stream.addEventListener(name, (e) => fn(e));
  }
}

// At most one call of `fn` per `ms`, the last one always made.
function throttle(fn, ms) {
  let timer = null, again = false;
  return function run() {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(() => { timer = null; if (again) { again = false; run(); } }, ms);
  };
}

// ---- runs list ----

async function runsPage(main, page) {
  const stateSel = el("select", { id: "filter-state" },
    el("option", { value: "" }, "any state"),
    ...STATES.concat(["quarantined"]).map((s) => el("option", { value: s }, s)));
  const search = el("input", { id: "filter-name", type: "search", placeholder: "name" });
  const body = el("tbody", { id: "runs" });
  main.replaceChildren(
    el("div", { class: "controls" }, stateSel, search),
    el("table", {}, el("thead", {}, el("tr", {}, ...["run", "name", "state", "trigger",
      "created", "took", "reason"].map((h) => el("th", {}, h)))), body));
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  stateSel.value = params.get("state") || "";
  search.value = params.get("q") || "";
  const load = async () => {
    const q = new URLSearchParams({ state: stateSel.value, q: search.value, limit: "200" });
    const runs = await api("/api/runs?" + q);
    body.replaceChildren(...runs.map((r) => el("tr", { "data-run": r.run_id },
      el("td", {}, el("a", { href: "#/run/" + r.run_id }, "#" + r.run_id)),
      el("td", {}, r.name), el("td", {}, badge(r.state)), el("td", {}, r.trigger || ""),
      el("td", {}, when(r.created_at)), el("td", {}, span(r.started_at, r.finished_at)),
      el("td", { class: "wrap muted" }, r.reason || ""))));
    if (!runs.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no runs")));
  };
  const reload = throttle(() => load().catch(report), 300);
  stateSel.addEventListener("change", reload);
  search.addEventListener("input", reload);
  await load();
  follow("/api/stream", { change: reload }, page);
}

// ---- a run ----

const run = {};

async function runPage(main, id, drawn) {
  const [page, layout] = await Promise.all([api("/api/runs/" + id), api("/api/runs/" + id + "/layout")]);
  if (drawn !== generation) return;
  Object.assign(run, {
    id, info: page.run, steps: page.run.steps, layout, selected: null,
    index: new Map(page.run.steps.map((s, i) => [s.id, i])), tab: "graph",
  });
  run.children = layout.nodes.map(() => []);
  layout.nodes.forEach((n, i) => n.needs.forEach((d) => run.children[d].push(i)));
  main.replaceChildren(
    el("div", { class: "runhead", id: "runhead" }),
    el("div", { class: "tabs" },
      ...["graph", "timeline", "events"].map((t) => el("button", {
        id: "tab-" + t, class: t === "graph" ? "here" : "", onclick: () => showTab(t),
      }, t))),
    el("div", { class: "split" }, el("div", { class: "view", id: "view" }),
      el("aside", { class: "panel", id: "panel", hidden: true })));
  drawHead();
  showTab("graph");
  loadHistory(page.run.name).catch(report);
  const redrawSoon = throttle(() => { drawHead(); redraw(); }, 200);
  const timelineSoon = throttle(() => { if (run.tab === "timeline") loadTimeline().catch(report); }, 1000);
  follow("/api/stream?run=" + id + "&after=" + page.head, {
    events: (e) => {
      for (const ev of JSON.parse(e.data)) applyEvent(ev);
      redrawSoon();
      timelineSoon();
    },
  }, drawn);
}

// An event's effect on the page: a step's or the run's new state, a line in the log.
function applyEvent(ev) {
  const [what, state] = ev.kind.split(".");
  if (what === "step" && ev.step !== null && run.index.has(ev.step)) {
    const s = run.steps[run.index.get(ev.step)];
    s.state = state;
    if (state === "running") s.started_at = s.started_at || ev.at;
    if (["succeeded", "failed", "skipped", "canceled"].includes(state)) s.finished_at = ev.at;
    if (run.selected === ev.step) loadStep(ev.step).catch(report);
  } else if (what === "run") {
    run.info.state = state;
    if (state === "running") run.info.started_at = run.info.started_at || ev.at;
    if (["succeeded", "failed", "canceled", "quarantined"].includes(state)) run.info.finished_at = ev.at;
    else run.info.finished_at = null;
  }
  if (run.eventsBody) appendEvents([ev]);
}

function counts() {
  const c = {};
  for (const s of run.steps) c[s.state] = (c[s.state] || 0) + 1;
  return c;
}

function drawHead() {
  const info = run.info, c = counts(), total = run.steps.length || 1;
  const done = (c.succeeded || 0) + (c.failed || 0) + (c.skipped || 0) + (c.canceled || 0);
  const bar = el("div", { class: "progress", title: done + " of " + run.steps.length + " done" });
  for (const [k, cls] of [["succeeded", "p-succeeded"], ["failed", "p-failed"],
    ["skipped", "p-other"], ["canceled", "p-other"], ["running", "p-running"]]) {
    const part = el("span", { class: cls });
    part.style.width = (100 * (c[k] || 0) / total) + "%";
    bar.append(part);
  }
  const going = info.state === "running" || info.state === "pending";
  let eta = "";
  if (going && info.started_at && done > 0 && done < run.steps.length) {
    const per = (Date.now() - info.started_at) / done;
    eta = "eta " + seconds(per * (run.steps.length - done) / 1000);
  }
  const act = (name, enabled) => el("button", {
    id: "act-" + name, class: name === "cancel" ? "danger" : "", disabled: !enabled,
    onclick: () => action(name),
  }, name);
  fill(document.getElementById("runhead"),
    el("h1", {}, info.name, " ", el("span", { class: "muted" }, "#" + info.run_id)),
    el("span", { id: "run-state" }, badge(info.state)),
    el("span", {}, bar),
    el("span", { id: "run-progress" }, done + "/" + run.steps.length + " done",
      c.running ? ", " + c.running + " running" : "", c.failed ? ", " + c.failed + " failed" : ""),
    el("span", { class: "muted" }, span(info.started_at, info.finished_at), " ", eta),
    el("span", { class: "muted" }, info.trigger || info.source),
    info.reason ? el("span", { class: "muted", id: "run-reason" }, info.reason) : null,
    el("span", {}, act("cancel", going), " ",
      act("retry", info.state === "failed" || info.state === "canceled"), " ",
      act("release", info.state === "quarantined")),
    el("span", { class: "history", id: "history" }, run.historyChart || ""));
}

async function action(name) {
  if (!confirm(name + " run #" + run.id + " (" + run.info.name + ")?")) return;
  try {
    const done = await api("/api/runs/" + run.id + "/" + name, { method: "POST" });
    clearError();
    document.getElementById("run-state").title = done.message;
  } catch (e) { report(e); }
}

function showTab(tab) {
  run.tab = tab;
  for (const t of ["graph", "timeline", "events"]) {
    document.getElementById("tab-" + t).className = t === tab ? "here" : "";
  }
  run.eventsBody = null;
  const view = document.getElementById("view");
  if (tab === "graph") drawGraphView(view);
  if (tab === "timeline") { view.replaceChildren(el("div", { class: "notice" }, "loading")); loadTimeline().catch(report); }
  if (tab === "events") drawEventsView(view).catch(report);
}

function legend() {
  return el("div", { class: "legend" }, ...STATES.map((s) => el("span", {}, el("i", { class: "st-" + s }), s)));
}

// A scroller whose drawing holds only what is in view: a spacer gives it the whole size,
// and an SVG the size of the view is redrawn at each scroll.
function windowed(view, width, height, draw) {
  const scroller = el("div", { class: "scroller", id: "scroller" });
  const spacer = el("div", {});
  spacer.style.width = width + "px";
  spacer.style.height = height + "px";
  const pic = svg("svg", { id: "drawing" });
  scroller.append(spacer, pic);
  // a small drawing gets a small box; a large one scrolls within two thirds of the window
  scroller.style.height = Math.min(height + 20, Math.round(window.innerHeight * 0.65)) + "px";
  view.append(scroller);
  let queued = false;
  const paint = () => {
    queued = false;
    const x = scroller.scrollLeft, y = scroller.scrollTop;
    // never past the drawing's edge, or the picture itself would make the box scroll
    const w = Math.max(0, Math.min(scroller.clientWidth, width - x));
    const h = Math.max(0, Math.min(scroller.clientHeight, height - y));
    pic.setAttribute("width", w);
    pic.setAttribute("height", h);
    pic.style.transform = "translate(" + x + "px," + y + "px)";
    pic.setAttribute("viewBox", x + " " + y + " " + w + " " + h);
    pic.replaceChildren(...draw(x, y, w, h));
  };
  scroller.addEventListener("scroll", () => { if (!queued) { queued = true; requestAnimationFrame(paint); } });
  run.redraw = paint;
  paint();
}

function redraw() {
  if (run.redraw && run.tab === "graph") run.redraw();
}

function drawGraphView(view) {
  const l = run.layout;
  view.replaceChildren(legend());
  run.redraw = null;
  const width = PAD * 2 + Math.max(1, l.columns) * PITCH_X;
  const height = PAD * 2 + Math.max(1, l.rows) * PITCH_Y;
  const at = (i) => [PAD + l.nodes[i].column * PITCH_X, PAD + l.nodes[i].row * PITCH_Y];
  windowed(view, width, height, (x, y, w, h) => {
    const c0 = Math.max(0, Math.floor((x - PAD) / PITCH_X) - 1), c1 = Math.ceil((x + w) / PITCH_X);
    const r0 = Math.max(0, Math.floor((y - PAD) / PITCH_Y) - 1), r1 = Math.ceil((y + h) / PITCH_Y);
    const edges = [], nodes = [];
    const seen = (i) => { const n = l.nodes[i]; return n.column >= c0 && n.column <= c1 && n.row >= r0 && n.row <= r1; };
    for (const i of visibleNodes(c0, c1, r0, r1)) {
      const [nx, ny] = at(i);
      for (const d of l.nodes[i].needs) edges.push(edge(at(d), [nx, ny]));
      for (const k of run.children[i]) if (!seen(k)) edges.push(edge([nx, ny], at(k)));
      const s = run.steps[i];
      const box = svg("rect", {
        x: nx, y: ny, width: NODE_W, height: NODE_H, rx: 4,
        class: "node st-" + s.state + (run.selected === s.id ? " sel" : ""), "data-step": s.id,
      });
      box.addEventListener("click", () => selectStep(s.id));
      const title = svg("title", {});
      title.textContent = s.id + ": " + s.state;
      box.append(title);
      const label = svg("text", { x: nx + 6, y: ny + 16 });
      label.textContent = s.id.length > 20 ? s.id.slice(0, 19) + "…" : s.id;
      nodes.push(box, label);
    }
    return edges.concat(nodes);
  });
}

// The steps in a block of columns and rows: by column, then the rows in range, through an
// index built once per run.
function visibleNodes(c0, c1, r0, r1) {
  if (!run.grid) {
    run.grid = [];
    run.layout.nodes.forEach((n, i) => {
      (run.grid[n.column] = run.grid[n.column] || [])[n.row] = i;
    });
  }
  const out = [];
  for (let c = c0; c <= c1 && c < run.grid.length; c++) {
    const col = run.grid[c] || [];
    for (let r = r0; r <= r1 && r < col.length; r++) if (col[r] !== undefined) out.push(col[r]);
  }
  return out;
}

function edge([ax, ay], [bx, by]) {
  const x1 = ax + NODE_W, y1 = ay + NODE_H / 2, x2 = bx, y2 = by + NODE_H / 2, mid = (x1 + x2) / 2;
  return svg("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}` });
}

async function loadTimeline() {
  const bars = await api("/api/runs/" + run.id + "/timeline");
  if (run.tab !== "timeline") return;
  const view = document.getElementById("view");
  // by loops, not Math.min(...bars): a long run has more attempts than a call has arguments
  let t0 = run.info.started_at || Infinity, t1 = run.info.finished_at || Date.now();
  for (const b of bars) {
    t0 = Math.min(t0, b.started_at);
    t1 = Math.max(t1, b.finished_at || b.started_at, b.retry_at || 0);
  }
  if (t0 === Infinity) t0 = t1 - 1;
  const left = 170, width = Math.max(600, view.clientWidth - 4), scale = (width - left - PAD) / Math.max(1, t1 - t0);
  // a step is queued from when its last need ended (or the run began) to its first attempt
  const queuedFrom = (b) => {
    const i = run.index.get(b.step);
    if (b.number !== 1 || i === undefined) return null;
    const needs = run.layout.nodes[i].needs.map((d) => run.steps[d].finished_at || 0);
    const from = needs.length ? Math.max(...needs) : run.info.started_at;
    return from && from < b.started_at ? from : null;
  };
  view.replaceChildren(el("div", { class: "legend" },
    el("span", {}, el("i", { class: "st-pending" }), "queued"),
    el("span", {}, el("i", { class: "st-running" }), "running"),
    el("span", {}, el("i", { class: "st-succeeded" }), "succeeded"),
    el("span", {}, el("i", { class: "st-failed" }), "failed, retry waits after it"),
    el("span", { class: "muted" }, bars.length + " attempts over " + seconds((t1 - t0) / 1000))));
  windowed(view, width, PAD * 2 + bars.length * ROW_H, (x, y, w, h) => {
    const out = [];
    const r0 = Math.max(0, Math.floor(y / ROW_H) - 1), r1 = Math.min(bars.length - 1, Math.ceil((y + h) / ROW_H));
    for (let r = r0; r <= r1; r++) {
      const b = bars[r], top = PAD + r * ROW_H;
      const label = svg("text", { x: 4, y: top + 13 });
      label.textContent = (b.step.length > 18 ? b.step.slice(0, 17) + "…" : b.step) + " #" + b.number;
      const x1 = left + (b.started_at - t0) * scale, x2 = left + ((b.finished_at || Date.now()) - t0) * scale;
      const cls = b.outcome === null ? "st-running" : b.outcome === "succeeded" ? "st-succeeded" : "st-failed";
      const bar = svg("rect", { x: x1, y: top + 3, width: Math.max(2, x2 - x1), height: ROW_H - 6, class: "node " + cls, "data-step": b.step });
      bar.addEventListener("click", () => selectStep(b.step));
      const tip = svg("title", {});
      tip.textContent = b.step + " attempt " + b.number + ": " + (b.outcome || "running") + ", " + seconds(((b.finished_at || Date.now()) - b.started_at) / 1000);
      bar.append(tip);
      const queued = queuedFrom(b);
      if (queued) {
        const qx = left + (queued - t0) * scale;
        out.push(svg("rect", { x: qx, y: top + 8, width: Math.max(1, x1 - qx), height: 4, class: "st-pending" }));
      }
      out.push(label, bar);
      if (b.retry_at) {
        const wait = svg("rect", { x: x2, y: top + 8, width: Math.max(1, (b.retry_at - (b.finished_at || b.retry_at)) * scale), height: 4, class: "st-pending" });
        out.push(wait);
      }
    }
    return out;
  });
  run.redraw = null;
}

async function drawEventsView(view) {
  const verify = el("button", { id: "verify", onclick: async () => {
    const v = await api("/api/runs/" + run.id + "/verify");
    result.className = v.holds ? "chain-ok" : "chain-bad";
    result.textContent = v.message;
  } }, "check the hash chain");
  const result = el("span", { id: "verified" });
  const body = el("tbody", { id: "events" });
  const more = el("button", { id: "more-events" }, "more");
  view.replaceChildren(el("div", { class: "controls" }, verify, result),
    el("table", {}, el("thead", {}, el("tr", {}, ...["#", "at", "step", "what", "detail"].map((h) => el("th", {}, h)))), body), more);
  run.eventsBody = body;
  run.eventsLast = 0;
  const page = async () => {
    const events = await api("/api/runs/" + run.id + "/events?after=" + run.eventsLast);
    appendEvents(events);
    more.hidden = events.length < 1000;
  };
  more.addEventListener("click", () => page().catch(report));
  await page();
}

function appendEvents(events) {
  for (const ev of events) {
    if (ev.seq <= run.eventsLast) continue;
    run.eventsLast = ev.seq;
    run.eventsBody.append(el("tr", {}, el("td", {}, ev.seq), el("td", {}, when(ev.at)),
      el("td", {}, ev.step || ""), el("td", {}, ev.kind), el("td", { class: "wrap" }, ev.detail)));
  }
}

async function selectStep(id) {
  run.selected = id;
  redraw();
  await loadStep(id);
}

async function loadStep(id) {
  const d = await api("/api/runs/" + run.id + "/steps/" + encodeURIComponent(id));
  if (run.selected !== id) return;
  const json = (v) => el("pre", {}, JSON.stringify(v, null, 2));
  const panel = document.getElementById("panel");
  panel.hidden = false;
  fill(panel,
    el("h2", { id: "step-title" }, d.step.id, " ", badge(d.step.state)),
    el("div", { class: "muted" }, d.target, d.needs.length ? ", after " + d.needs.join(", ") : ""),
    d.step.reason ? el("div", { id: "step-reason" }, d.step.reason) : null,
    el("h3", {}, "input"), json(d.with),
    el("h3", {}, "output"), d.step.output === null ? el("div", { class: "muted" }, "none yet") : json(d.step.output),
    el("h3", {}, "attempts (" + d.attempts.length + ")"),
    ...d.attempts.map((a) => el("div", { class: "attempt" },
      el("div", {}, "#" + a.number + " ", a.outcome ? badge(a.outcome === "succeeded" ? "succeeded" : "failed") : badge("running"),
        " ", a.outcome || "", " ", span(a.started_at, a.finished_at), a.retry_at ? ", retry at " + when(a.retry_at) : ""),
      a.error ? el("div", {}, a.error) : null,
      a.stdout ? el("pre", {}, a.stdout) : null,
      a.stderr ? el("pre", {}, a.stderr) : null)),
    el("h3", {}, "log"),
    el("pre", { id: "step-log" }, d.events.map((e) =>
      new Date(e.at).toLocaleTimeString() + " " + e.kind + (e.detail ? " " + e.detail : "")).join("\n")));
}

async function loadHistory(name) {
  const runs = await api("/api/history?name=" + encodeURIComponent(name));
  const took = runs.filter((r) => r.started_at && r.finished_at);
  if (took.length < 2) return;
  const most = Math.max(...took.map((r) => r.finished_at - r.started_at)) || 1;
  const chart = svg("svg", { width: took.length * 6, height: 28, id: "history-chart" });
  took.forEach((r, i) => {
    const h = Math.max(2, 26 * (r.finished_at - r.started_at) / most);
    const bar = svg("rect", { x: i * 6, y: 28 - h, width: 4, height: h, class: "st-" + r.state });
    const tip = svg("title", {});
    tip.textContent = "#" + r.run_id + ": " + seconds((r.finished_at - r.started_at) / 1000) + ", " + r.state;
    bar.append(tip);
    chart.append(bar);
  });
  run.historyChart = el("span", {}, el("span", { class: "muted" }, "history "), chart);
  drawHead();
}

// ---- tools ----

async function toolsPage(main, page) {
  const tools = await api("/api/tools");
  if (page !== generation) return;
  const body = el("tbody", { id: "tools" }, ...tools.map((t) => el("tr", {},
    el("td", {}, t.name), el("td", {}, t.kind), el("td", {}, t.capabilities.join(", ")),
    el("td", {}, t.version || ""), el("td", { class: "wrap" }, breakerText(t.breaker)),
    el("td", { class: "muted wrap" }, t.source))));
  main.replaceChildren(el("table", {}, el("thead", {}, el("tr", {},
    ...["tool", "kind", "capabilities", "version", "breaker", "source"].map((h) => el("th", {}, h)))), body));
  follow("/api/stream", { change: throttle(() => toolsPage(main, page).catch(report), 2000) }, page);
}

function breakerText(b) {
  if (!b) return "-";
  let out = b.state;
  if (b.probe_in_ms !== null && b.probe_in_ms !== undefined) out += " (" + b.failures + " failures; probe in " + seconds(b.probe_in_ms / 1000) + ")";
  else if (b.failures) out += " (" + b.failures + " failures)";
  return out;
}

// ---- routing ----

function report(e) {
  if (e instanceof NotLoggedIn) {
    if (stream) stream.close();
    document.getElementById("main").replaceChildren(el("div", { class: "notice", id: "login-needed" },
      "Not logged in. Run ", el("code", {}, "uet web"), " on the daemon's machine and open the address it prints."));
    return;
  }
  showError(e.message || String(e));
}

async function route() {
  clearError();
  const main = document.getElementById("main");
  const hash = location.hash || "#/";
  document.getElementById("nav-runs").className = hash.startsWith("#/tools") ? "" : "here";
  document.getElementById("nav-tools").className = hash.startsWith("#/tools") ? "here" : "";
  run.redraw = null;
  run.grid = null;
  const m = hash.match(/^#\/run\/(\d+)/);
  const page = ++generation;
  try {
    if (m) await runPage(main, Number(m[1]), page);
    else if (hash.startsWith("#/tools")) await toolsPage(main, page);
    else await runsPage(main, page);
  } catch (e) { report(e); }
}

async function status() {
  try {
    const s = await api("/api/status");
    document.getElementById("daemon").textContent = "uet " + s.version + ", " + s.active + " running";
  } catch (e) { /* the page says why already */ }
}

window.addEventListener("hashchange", route);
// a page left (or kept in the back-forward cache) lets go of its stream: a browser allows a
// host six connections, and streams held by pages gone would starve the next page's loads
window.addEventListener("pagehide", () => { if (stream) { stream.close(); stream = null; } });
window.addEventListener("pageshow", (e) => { if (e.persisted) route(); });
window.addEventListener("resize", () => redraw());
document.addEventListener("DOMContentLoaded", () => { route(); status(); setInterval(status, 5000); });

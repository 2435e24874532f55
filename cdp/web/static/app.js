// cdp console: plain JS + SVG, no dependencies. Talks to /api/v1 with the token the
// URL fragment carried (#token=..., printed by `cdpctl web`); the token is also set as a
// SameSite=Strict cookie limited to /api so that download links work.
"use strict";

const API = "/api/v1";
const POLL_MS = 5000;
const S = {
  token: null, volumes: [], vol: null, status: null,
  range: null,          // {from, to} in ns (Numbers), or null = oldest point .. now
  follow: true,         // the range ends at now and moves with it
  tl: null,             // last timeline answer
  metric: "writes",
  at: "now", path: "/", versionsPath: null,
};

// ------------------------------------------------------------------ token and requests

function takeToken() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    S.token = decodeURIComponent(m[1]);
    sessionStorage.setItem("cdp_token", S.token);
    history.replaceState(null, "", location.pathname + location.search);  // out of the URL bar
  } else {
    S.token = sessionStorage.getItem("cdp_token");
  }
  if (S.token) {
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `cdp_token=${encodeURIComponent(S.token)}; path=/api; SameSite=Strict${secure}`;
  }
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, opts = {}) {
  const headers = { "Authorization": `Bearer ${S.token || ""}` };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, {
    method: opts.method || "GET", headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

const vpath = (p) => `/volumes/${encodeURIComponent(S.vol)}${p}`;
const q = (o) => Object.entries(o).filter(([, v]) => v !== null && v !== undefined && v !== "")
  .map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");

// ------------------------------------------------------------------ formatting

const $ = (id) => document.getElementById(id);
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null) e.append(k);
  return e;
}
function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + u[i];
}
function fmtTime(ns) {
  if (!ns) return "";
  const d = new Date(ns / 1e6);
  return d.toLocaleString(undefined, { year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
const nsText = (x) => BigInt(Math.round(x)).toString();
function setStatus(text, bad) {
  const s = $("status");
  s.textContent = text;
  s.style.color = bad ? "#ffb4ab" : "";
}

// ------------------------------------------------------------------ volumes and alerts

async function loadVolumes() {
  S.volumes = await api("/volumes");
  const ul = $("volumes");
  ul.replaceChildren();
  for (const v of S.volumes) {
    const li = el("li", { class: "volume" + (v.volume === S.vol ? " sel" : ""), "data-volume": v.volume,
                          onclick: () => selectVolume(v.volume) },
      el("div", { class: "name", text: v.volume }),
      el("div", { class: "meta", text: `${fmtBytes(v.size)} · ${v.markers} markers · @${v.last_seq}` +
                  (v.connections ? ` · ${v.connections} client(s)` : "") }));
    ul.append(li);
  }
  if (!S.volumes.length) {
    $("empty-text").textContent = "No volumes yet: create one with `cdpctl volume create`.";
  } else if (!S.vol) {
    await selectVolume(S.volumes[0].volume);
  }
}

async function loadAlerts() {
  const rows = await api("/alerts");
  const ul = $("alerts");
  ul.replaceChildren();
  if (!rows.length) ul.append(el("li", { class: "muted", text: "none" }));
  for (const a of rows) {
    ul.append(el("li", { class: a.state, text: `${a.volume} ${a.id} ${a.state} · clean: ${a.clean_point}` }));
  }
}

async function selectVolume(name) {
  S.vol = name;
  S.range = null; S.follow = true; S.at = "now"; S.path = "/"; S.versionsPath = null;
  $("volume-view").hidden = false;
  $("empty-view").hidden = true;
  $("undo-box").hidden = true;
  for (const li of document.querySelectorAll("#volumes li")) {
    li.classList.toggle("sel", li.dataset.volume === name);
  }
  await Promise.all([loadStatus(), loadTimeline(), loadFiles(), loadMarkers(), loadVersions()]);
}

async function loadStatus() {
  S.status = await api(vpath(""));
  $("vol-title").textContent = S.vol;
  const st = $("vol-state");
  st.textContent = S.status.paused ? "paused" : `live · @${S.status.last_seq}`;
  st.className = "state" + (S.status.paused ? " paused" : "");
}

async function loadMarkers() {
  const ms = await api(vpath("/markers"));
  const ul = $("markers");
  ul.replaceChildren();
  for (const m of ms.slice(-50).reverse()) {
    ul.append(el("li", { class: m.expired ? "expired" : "", "data-marker": m.name,
                         onclick: () => openAt(m.name) },
      `${m.name}${m.label ? " “" + m.label + "”" : ""} · ${fmtTime(m.time_ns)}`));
  }
  if (!ms.length) ul.append(el("li", { class: "muted", text: "no markers" }));
}

// ------------------------------------------------------------------ the timeline

async function loadTimeline() {
  const width = $("timeline").clientWidth || 800;
  const buckets = Math.max(20, Math.min(400, Math.floor(width / 4)));
  const args = { buckets };
  if (S.range) {
    args.from = nsText(S.range.from);
    args.to = S.follow ? null : nsText(S.range.to);
  }
  S.tl = await api(vpath("/timeline?" + q(args)));
  if (!S.range) S.range = { from: S.tl.from_ns, to: S.tl.to_ns };
  else if (S.follow) S.range.to = S.tl.to_ns;
  $("range-text").textContent = `${fmtTime(S.tl.from_ns)} → ${S.follow ? "now" : fmtTime(S.tl.to_ns)}`;
  drawTimeline();
}

const SVGNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawTimeline() {
  const box = $("timeline");
  const t = S.tl;
  const W = box.clientWidth || 800, H = box.clientHeight || 190;
  const padL = 8, padR = 8, top = 14, bottom = 24;
  const plotH = H - top - bottom;
  const x = (ns) => padL + (ns - t.from_ns) / Math.max(1, t.to_ns - t.from_ns) * (W - padL - padR);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, "data-from": nsText(t.from_ns), "data-to": nsText(t.to_ns) });
  // faded by retention: before faded_before_ns only retained points resolve
  const faded = t.retention && t.retention.faded_before_ns;
  if (faded && faded > t.from_ns) {
    root.append(svg("rect", { class: "faded", x: padL, y: top, width: Math.max(0, Math.min(x(faded), W - padR) - padL),
                              height: plotH, fill: "#c8ccd4", opacity: 0.45 }));
  }
  // write rate (or bytes) per bucket
  const vals = t.buckets.map((b) => S.metric === "bytes" ? b.bytes : b.writes);
  const max = Math.max(1, ...vals);
  t.buckets.forEach((b, i) => {
    if (!vals[i]) return;
    const x0 = x(b.start_ns), x1 = x(b.end_ns);
    const h = Math.max(1, vals[i] / max * plotH);
    root.append(svg("rect", { class: "bucket", x: x0, y: top + plotH - h, width: Math.max(1, x1 - x0 - 0.5),
                              height: h, fill: "#5b8def" }));
  });
  // entropy (the sentinel's suspect share, 0..1) as a line
  const pts = t.buckets.filter((b) => b.entropy !== null)
    .map((b) => `${x((b.start_ns + b.end_ns) / 2)},${top + plotH - b.entropy * plotH}`);
  if (pts.length > 1) root.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: "#d92d20", "stroke-width": 1.5 }));
  // axis: first and last times and the midpoint
  root.append(svg("line", { x1: padL, x2: W - padR, y1: top + plotH, y2: top + plotH, stroke: "#dde1e8" }));
  for (const [frac, anchor] of [[0, "start"], [0.5, "middle"], [1, "end"]]) {
    const ns = t.from_ns + frac * (t.to_ns - t.from_ns);
    root.append(svg("text", { x: padL + frac * (W - padL - padR), y: H - 7, "font-size": 11, fill: "#6b7385",
                              "text-anchor": anchor }, fmtTime(ns)));
  }
  for (const r of t.rewinds) {
    root.append(svg("line", { class: "rewind", x1: x(r.time_ns), x2: x(r.time_ns), y1: top, y2: top + plotH,
                              stroke: "#e07b00", "stroke-width": 2, "stroke-dasharray": "4 3" }));
  }
  for (const m of t.markers) {
    const g = svg("g", { class: "marker", "data-marker": m.name });
    g.append(svg("line", { x1: x(m.time_ns), x2: x(m.time_ns), y1: top - 6, y2: top + plotH,
                           stroke: m.expired ? "#9aa3b5" : "#2463eb", "stroke-width": 1.5 }));
    g.append(svg("title", {}, `${m.name}${m.label ? " “" + m.label + "”" : ""} ${fmtTime(m.time_ns)}`));
    root.append(g);
  }
  for (const a of t.alerts) {
    const ax = x(a.first_time || a.detected_time);
    root.append(svg("path", { class: "alert", d: `M${ax - 6},${top - 2} L${ax + 6},${top - 2} L${ax},${top + 9} Z`,
                              fill: "#d92d20" }));
  }
  if (S.at !== "now") {
    const ns = pointTime(S.at);
    if (ns !== null && ns >= t.from_ns && ns <= t.to_ns) {
      root.append(svg("line", { class: "cursor", x1: x(ns), x2: x(ns), y1: 0, y2: H, stroke: "#16213a", "stroke-width": 1 }));
    }
  }
  const tip = el("div", { class: "tip", hidden: "" });
  box.replaceChildren(root, tip);
  box._x = x;
}

function pointTime(point) {
  if (!S.tl) return null;
  const m = S.tl.markers.find((mm) => mm.name === point);
  if (m) return m.time_ns;
  const d = Date.parse(point);
  return Number.isNaN(d) ? null : d * 1e6;
}

function timeAt(evt) {
  const box = $("timeline");
  const r = box.getBoundingClientRect();
  const W = box.clientWidth, padL = 8, padR = 8;
  const frac = Math.min(1, Math.max(0, (evt.clientX - r.left - padL) / (W - padL - padR)));
  return S.tl.from_ns + frac * (S.tl.to_ns - S.tl.from_ns);
}

function nearMarker(evt) {
  const box = $("timeline");
  const r = box.getBoundingClientRect();
  const px = evt.clientX - r.left;
  let best = null;
  for (const m of S.tl.markers) {
    const d = Math.abs(box._x(m.time_ns) - px);
    if (d <= 4 && (!best || d < best.d)) best = { m, d };
  }
  return best && best.m;
}

function onTimelineClick(evt) {
  if (!S.tl) return;
  const m = nearMarker(evt);
  if (m) return openAt(m.name);
  const ns = timeAt(evt);
  const last = S.status && S.status.last_time_ns;
  if (last && ns >= last) return openAt("now");
  openAt(new Date(ns / 1e6).toISOString());
}

function onTimelineMove(evt) {
  if (!S.tl) return;
  const tip = $("timeline").querySelector(".tip");
  const ns = timeAt(evt);
  const b = S.tl.buckets.find((bb) => bb.start_ns <= ns && ns < bb.end_ns);
  const m = nearMarker(evt);
  const r = $("timeline").getBoundingClientRect();
  tip.hidden = false;
  tip.style.left = Math.min(evt.clientX - r.left + 10, r.width - 220) + "px";
  tip.style.top = "4px";
  tip.textContent = m ? `${m.name}${m.label ? " “" + m.label + "”" : ""} · ${fmtTime(m.time_ns)}`
    : `${fmtTime(ns)}` + (b ? ` · ${b.writes} writes, ${fmtBytes(b.bytes)}` +
      (b.entropy !== null ? `, suspect ${(100 * b.entropy).toFixed(0)}%` : "") : "");
}

function zoom(factor, centerNs) {
  if (!S.range) return;
  const now = S.tl ? S.tl.now_ns : Date.now() * 1e6;
  const c = centerNs === undefined ? (S.range.from + S.range.to) / 2 : centerNs;
  const span = Math.max(1e9, (S.range.to - S.range.from) * factor);
  let from = c - (c - S.range.from) * (span / (S.range.to - S.range.from));
  let to = from + span;
  if (to >= now) { to = now; from = now - span; S.follow = true; } else { S.follow = false; }
  S.range = { from, to };
  loadTimeline().catch(report);
}

function setRange(seconds) {
  if (seconds === "all") { S.range = null; S.follow = true; }
  else {
    const now = S.tl ? S.tl.now_ns : Date.now() * 1e6;
    S.range = { from: now - seconds * 1e9, to: now };
    S.follow = true;
  }
  loadTimeline().catch(report);
}

// ------------------------------------------------------------------ files, versions

function openAt(point) {
  S.at = point;
  $("at-text").textContent = point;
  if (S.tl) drawTimeline();
  loadFiles().catch(report);
}

function downloadHref(path, at) {
  return API + vpath("/restore?" + q({ path, at }));
}

async function loadFiles() {
  $("at-text").textContent = S.at;
  const crumbs = $("crumbs");
  crumbs.replaceChildren();
  const parts = S.path.split("/").filter(Boolean);
  crumbs.append(el("a", { onclick: () => browse("/"), text: "/" }));
  parts.forEach((p, i) => {
    const to = "/" + parts.slice(0, i + 1).join("/");
    crumbs.append(el("a", { onclick: () => browse(to), text: p }), document.createTextNode(i < parts.length - 1 ? " / " : ""));
  });
  const tbody = $("files").querySelector("tbody");
  let r;
  try {
    r = await api(vpath("/files?" + q({ at: S.at, path: S.path })));
  } catch (e) {
    tbody.replaceChildren();
    $("files-note").textContent = e.message;
    return;
  }
  $("files-note").textContent = (r.note ? r.note + " · " : "") + `@${r.seq}` +
    (r.from_catalog ? " (from the catalog)" : "");
  tbody.replaceChildren();
  if (S.path !== "/") {
    const up = S.path.replace(/\/[^/]*$/, "") || "/";
    tbody.append(el("tr", { class: "dir" }, el("td", { class: "name" }, el("a", { onclick: () => browse(up), text: ".." })),
      el("td"), el("td"), el("td")));
  }
  const rows = r.entries.filter((e) => !e.name.startsWith("$") || e.partition)
    .sort((a, b) => (a.type === b.type ? a.name.localeCompare(b.name) : a.type === "dir" ? -1 : 1));
  for (const e of rows) {
    const isDir = e.type === "dir";
    const name = el("a", { class: "entry", "data-name": e.name, "data-path": e.path,
                           onclick: () => (isDir ? browse(e.path) : showVersions(e.path)), text: e.name + (isDir ? "/" : "") });
    const actions = el("td");
    actions.append(el("a", { class: "download", href: downloadHref(e.path, S.at), download: isDir ? e.name + ".tar" : e.name,
                             "data-path": e.path, text: isDir ? "tar" : "download" }));
    if (!isDir) actions.append(el("a", { class: "vers", onclick: () => showVersions(e.path), text: "versions" }));
    tbody.append(el("tr", { class: isDir ? "dir" : "file" }, el("td", { class: "name" }, name),
      el("td", { class: "num", text: isDir ? "" : fmtBytes(e.size) }),
      el("td", { text: fmtTime(e.modified_ns) }), actions));
  }
}

function browse(path) {
  S.path = path;
  loadFiles().catch(report);
}

async function showVersions(path) {
  S.versionsPath = path;
  await loadVersions();
}

async function loadVersions() {
  const tbody = $("versions").querySelector("tbody");
  tbody.replaceChildren();
  $("versions-path").textContent = S.versionsPath || "(click a file)";
  if (!S.versionsPath) return;
  let r;
  try {
    r = await api(vpath("/versions?" + q({ path: S.versionsPath })));
  } catch (e) {
    tbody.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: e.message })));
    return;
  }
  for (const v of r.versions) {
    tbody.append(el("tr", { class: "version" },
      el("td", { text: `${v.from_marker}` }), el("td", { text: v.to_marker || "now" }),
      el("td", { class: "num", text: fmtBytes(v.size) }), el("td", { text: v.state }),
      el("td", {}, el("a", { class: "download", href: downloadHref(S.versionsPath, v.from_marker), text: "download" }))));
  }
}

// ------------------------------------------------------------------ markers and rewind

async function takeMarker() {
  const label = prompt("Label for the new marker (optional):", "");
  if (label === null) return;
  const m = await api(vpath("/markers"), { method: "POST", body: { label } });
  setStatus(`${S.vol}: ${m.name} taken`);
  await Promise.all([loadMarkers(), loadTimeline(), loadVolumes()]);
}

async function askRewind() {
  await loadStatus();
  $("rw-volume").textContent = S.vol;
  $("rw-point").textContent = S.at;
  $("rw-undo").textContent = `@${S.status.last_seq}`;
  const dlg = $("rewind-dialog");
  dlg.returnValue = "";
  dlg.showModal();
}

async function doRewind(to) {
  const r = await api(vpath("/rewind"), { method: "POST", body: { to } });
  if (r.changed) {
    $("undo-text").textContent = `${S.vol} rewound to ${r.to} (@${r.target_seq}); undo point: ${r.undo}`;
    $("undo-box").hidden = false;
    $("undo").dataset.undo = r.undo;
    setStatus(`${S.vol}: rewound to ${r.to}; undo with ${r.undo}`);
  } else {
    setStatus(`${S.vol}: already at ${r.to}; nothing written`);
  }
  S.at = "now";
  await Promise.all([loadStatus(), loadTimeline(), loadFiles(), loadVolumes()]);
  return r;
}

async function undoRewind() {
  const to = $("undo").dataset.undo;
  $("undo-box").hidden = true;
  await doRewind(to);
  $("undo-box").hidden = true;
  setStatus(`${S.vol}: rewind undone (back to ${to})`);
}

// ------------------------------------------------------------------ live updates

async function poll() {
  try {
    await loadVolumes();
    await loadAlerts();
    if (S.vol) {
      await loadStatus();
      if (S.follow) await loadTimeline();
    }
    setStatus(`updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    report(e);
  }
}

function report(e) {
  if (e instanceof ApiError && e.status === 401) {
    setStatus("not signed in: open the URL `cdpctl web` prints", true);
    $("empty-text").textContent = "This console needs its token: run `cdpctl web` on the appliance and open the URL it prints.";
  } else {
    setStatus(String(e.message || e), true);
  }
}

function wire() {
  const tl = $("timeline");
  tl.addEventListener("click", onTimelineClick);
  tl.addEventListener("mousemove", onTimelineMove);
  tl.addEventListener("mouseleave", () => { const t = tl.querySelector(".tip"); if (t) t.hidden = true; });
  tl.addEventListener("wheel", (e) => { e.preventDefault(); zoom(e.deltaY < 0 ? 0.5 : 2, timeAt(e)); }, { passive: false });
  $("zoom-in").onclick = () => zoom(0.5, S.at !== "now" ? pointTime(S.at) ?? undefined : undefined);
  $("zoom-out").onclick = () => zoom(2);
  for (const b of document.querySelectorAll("[data-range]")) {
    b.onclick = () => setRange(b.dataset.range === "all" ? "all" : Number(b.dataset.range));
  }
  for (const r of document.querySelectorAll("input[name=metric]")) {
    r.onchange = () => { S.metric = r.value; drawTimeline(); };
  }
  $("take-marker").onclick = () => takeMarker().catch(report);
  $("rewind").onclick = () => askRewind().catch(report);
  $("rewind-dialog").addEventListener("close", () => {
    if ($("rewind-dialog").returnValue === "ok") doRewind(S.at).catch(report);
  });
  $("undo").onclick = () => undoRewind().catch(report);
  window.addEventListener("resize", () => { if (S.tl) drawTimeline(); });
}

takeToken();
wire();
poll().then(() => setInterval(poll, POLL_MS));

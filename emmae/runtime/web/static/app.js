// The emmae web view: reads /api/status every REFRESH_MS and draws it. Read-only; no external assets.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const token = new URLSearchParams(location.search).get("token");
let chosen = null;  // the stem clicked in the list; null: follow the latest micrograph
let listed = "";    // what the list shows (redrawn only when it changes)
let timer = null;   // the next refresh

function address(path, params = {}) {
  const query = new URLSearchParams(params);
  if (token) query.set("token", token);
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

function number(value, digits = 0, unit = "") {
  return value === null || value === undefined ? "\u2013" : `${Number(value).toFixed(digits)}${unit}`;
}

function node(tag, text, attributes = {}) {
  const made = document.createElement(tag);
  if (text !== undefined && text !== null) made.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
  return made;
}

function shape(tag, attributes, text) {
  const made = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
  if (text !== undefined) made.textContent = text;
  return made;
}

function definitions(list, rows) {
  list.replaceChildren();
  for (const [term, value, bad] of rows) {
    list.append(node("dt", term));
    const detail = node("dd", value);
    if (bad) detail.className = "bad";
    list.append(detail);
  }
}

function showSummary(status) {
  const counts = status.counts;
  const summary = document.getElementById("summary");
  summary.textContent = `${counts.picked} picked, ${counts.failed} failed, ${counts.waiting} waiting | ` +
    `${counts.particles} particles, ${number(counts.particles_per_micrograph)} per micrograph`;
  summary.dataset.picked = counts.picked;
  summary.dataset.failed = counts.failed;
  document.getElementById("updated").textContent =
    `${status.live ? "live" : "recorded"}, ${new Date(status.time * 1000).toLocaleTimeString()}`;
  document.getElementById("folder").textContent = status.folder;
  const warning = document.getElementById("warning");
  warning.hidden = !status.pace.falling_behind;
  warning.textContent = status.pace.warning || "";
}

function showPace(pace) {
  definitions(document.getElementById("pace"), [
    ["throughput", `${number(pace.throughput_per_hour)} per hour`, pace.falling_behind],
    ["acquisition", `${number(pace.acquisition_per_hour)} per hour`],
    ["latency, last", number(pace.latency_last_s, 1, " s")],
    ["latency, p50 / p95", `${number(pace.latency_p50_s, 1)} / ${number(pace.latency_p95_s, 1, " s")}`],
    ["queue", pace.queued === null ? `${pace.waiting} waiting` : `${pace.queued} of ${pace.queue_depth}`],
    ["settling", number(pace.settling)],
  ]);
}

function axes(plot, width, height, margin, labels) {
  plot.append(shape("line", { class: "axis", x1: margin, y1: height - margin, x2: width - 6, y2: height - margin }));
  plot.append(shape("line", { class: "axis", x1: margin, y1: 6, x2: margin, y2: height - margin }));
  for (const [x, y, text, anchor] of labels) plot.append(shape("text", { x, y, "text-anchor": anchor }, text));
}

function showParticles(micrographs) {
  const plot = document.getElementById("particles-plot");
  const [width, height, margin] = [640, 220, 34];
  plot.replaceChildren();
  const points = micrographs.filter((m) => m.picked_at !== null && m.particles !== null);
  if (!points.length) {
    plot.append(shape("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no micrograph picked yet"));
    return;
  }
  const t0 = points[0].picked_at, t1 = points[points.length - 1].picked_at;
  const top = Math.max(1, ...points.map((m) => m.particles));
  const x = (t) => margin + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (width - margin - 10);
  const y = (n) => height - margin - (n / top) * (height - margin - 10);
  axes(plot, width, height, margin, [
    [margin - 4, 14, String(top), "end"], [margin - 4, height - margin, "0", "end"],
    [margin, height - 12, new Date(t0 * 1000).toLocaleTimeString(), "start"],
    [width - 6, height - 12, new Date(t1 * 1000).toLocaleTimeString(), "end"],
  ]);
  plot.append(shape("polyline", { class: "line", points: points.map((m) => `${x(m.picked_at)},${y(m.particles)}`).join(" ") }));
  for (const m of points.slice(-200)) {
    const dot = shape("circle", { class: "dot", cx: x(m.picked_at), cy: y(m.particles), r: 2.5 });
    dot.append(shape("title", {}, `${m.name}: ${m.particles} particles`));
    plot.append(dot);
  }
}

function showFigureOfMerit(histogram) {
  const plot = document.getElementById("fom-plot");
  const [width, height, margin] = [320, 220, 34];
  plot.replaceChildren();
  document.getElementById("fom-caption").textContent =
    `(${histogram.picks} picks of the last ${histogram.micrographs} micrographs)`;
  const top = Math.max(1, ...histogram.counts);
  const step = (width - margin - 10) / histogram.counts.length;
  axes(plot, width, height, margin, [
    [margin - 4, 14, String(top), "end"], [margin, height - 12, "0", "start"], [width - 6, height - 12, "1", "end"],
    [(width + margin) / 2, height - 12, "figure of merit", "middle"],
  ]);
  histogram.counts.forEach((count, i) => {
    const barHeight = (count / top) * (height - margin - 10);
    const bar = shape("rect", { class: "bar", x: margin + i * step + 1, y: height - margin - barHeight, width: step - 2, height: barHeight });
    bar.append(shape("title", {}, `${histogram.edges[i]}-${histogram.edges[i + 1]}: ${count}`));
    plot.append(bar);
  });
}

function showList(micrographs) {
  const key = `${micrographs.length}:${micrographs.length ? micrographs[micrographs.length - 1].picked_at : ""}:${chosen}`;
  if (key === listed) return;
  listed = key;
  const list = document.getElementById("micrographs");
  list.replaceChildren();
  for (const m of micrographs.slice().reverse()) {
    const item = node("li", `${m.name} \u2013 ${m.particles} particles`, { "data-stem": m.stem });
    if (m.stem === chosen) item.className = "chosen";
    item.addEventListener("click", () => choose(m.stem));
    list.append(item);
  }
  document.getElementById("list-caption").textContent = `(last ${micrographs.length}; click one to see its picks)`;
}

function setOverlay(stem, version, title, caption) {
  const image = document.getElementById("overlay");
  const source = address("overlay.png", { stem, v: version });
  if (image.getAttribute("src") !== source) image.setAttribute("src", source);
  image.dataset.stem = stem;
  document.getElementById("overlay-title").textContent = title;
  document.getElementById("overlay-caption").textContent = caption;
  document.getElementById("follow").hidden = chosen === null;
}

function showLatest(status) {
  if (chosen !== null) return;
  const latest = status.latest;
  if (!latest) {
    document.getElementById("overlay-caption").textContent = "no micrograph picked yet";
    return;
  }
  const last = status.micrographs[status.micrographs.length - 1] || {};
  setOverlay(latest.stem, last.picked_at || "", "Latest micrograph",
    `${latest.name}: ${latest.particles} particles, on disk ${number(last.latency_s, 1, " s")} after it was complete`);
}

async function choose(stem) {
  chosen = stem;
  listed = "";
  try {
    const answer = await fetch(address("api/micrograph", { stem }), { cache: "no-store" });
    if (!answer.ok) throw new Error(await answer.text());
    const m = await answer.json();
    setOverlay(stem, `${m.particles}-${m.recorded_particles}`, "Chosen micrograph",
      `${m.name}: ${m.particles} particles, mean figure of merit ${number(m.mean_figure_of_merit, 2)}`);
  } catch (error) {
    document.getElementById("overlay-caption").textContent = `cannot show ${stem}: ${error.message}`;
  }
}

function drawTemplate(profile) {
  const canvas = document.getElementById("template");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  document.getElementById("template-caption").textContent =
    profile && profile.length ? "particle template" : "template: once the session is fixed";
  if (!profile || !profile.length) return;
  const low = Math.min(...profile), high = Math.max(...profile);
  const size = canvas.width, centre = (size - 1) / 2, reach = (profile.length - 1) * 1.6;
  const image = context.createImageData(size, size);
  for (let row = 0; row < size; row++) {
    for (let column = 0; column < size; column++) {
      const r = Math.hypot(column - centre, row - centre) / centre * reach;
      const i = Math.min(Math.floor(r), profile.length - 1), f = Math.min(r - i, 1);
      const value = r >= profile.length - 1 ? profile[profile.length - 1] : profile[i] * (1 - f) + profile[i + 1] * f;
      const grey = high > low ? Math.round((value - low) / (high - low) * 255) : 128;
      image.data.set([grey, grey, grey, 255], (row * size + column) * 4);
    }
  }
  context.putImageData(image, 0, 0);
}

function showSession(session, model, adaptation) {
  drawTemplate(session.profile);
  const rows = [
    ["session", session.fixed ? `fixed (${session.id || ""})` : `provisional: ${session.samples} of ${session.samples_needed} samples`],
    ["fitted on", session.micrographs === undefined ? "\u2013" : `${session.micrographs} micrographs`],
    ["particle cluster", session.particle_cluster === undefined ? "\u2013" : `${session.particle_cluster} of k = ${session.k}`],
    ["confidence", number(session.confidence, 2) + (session.ambiguous ? " (ambiguous)" : ""), session.ambiguous],
    ["classes", session.classes ? `${session.classes.kept.length} of ${session.classes.count} kept` +
      (session.classes.judged ? "" : " (too faint to judge)") : "\u2013"],
    ["model", model || "\u2013"],
  ];
  if (adaptation) {
    rows.push(["adaptation", adaptation.progress || `${adaptation.state || "starting"}` +
      (adaptation.micrographs ? ` on ${adaptation.micrographs} micrographs` : ""), adaptation.state === "failed"]);
  }
  definitions(document.getElementById("session"), rows);
}

function showClasses(session) {
  const card = document.getElementById("classes-card");
  const classes = session.fixed && session.classes ? session.classes.each : null;
  card.hidden = !classes;
  if (!classes) return;
  const image = document.getElementById("classes-image");
  const source = `files/emmae-classes.png?session=${encodeURIComponent(session.id || "")}`;
  if (image.getAttribute("src") !== source) image.setAttribute("src", source);
  const body = document.querySelector("#classes tbody");
  body.replaceChildren();
  for (const c of classes) {
    const row = node("tr");
    row.append(node("td", String(c.class)), node("td", String(c.count)), node("td", c.kept ? "kept" : "dropped"), node("td", c.why));
    if (!c.kept) row.className = "bad";
    body.append(row);
  }
}

function showFailed(failed) {
  const body = document.querySelector("#failed tbody");
  body.replaceChildren();
  for (const f of failed.slice(0, 200)) {
    const row = node("tr");
    row.append(node("td", f.micrograph), node("td", f.kind), node("td", f.reason));
    body.append(row);
  }
  if (!failed.length) {
    const row = node("tr");
    row.append(node("td", "none"));
    body.append(row);
  }
  document.getElementById("failed-file").setAttribute("href", address("files/failed.txt"));
}

function show(status) {
  showSummary(status);
  showPace(status.pace);
  showParticles(status.micrographs);
  showFigureOfMerit(status.figure_of_merit);
  showList(status.micrographs);
  showLatest(status);
  showSession(status.session, status.model, status.adaptation);
  showClasses(status.session);
  showFailed(status.failed);
  document.body.dataset.ready = "1";
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const answer = await fetch(address("api/status"), { cache: "no-store" });
    if (!answer.ok) throw new Error(`${answer.status}: ${await answer.text()}`);
    show(await answer.json());
    error.hidden = true;
  } catch (failure) {
    error.textContent = `cannot read the picker's figures: ${failure.message}`;
    error.hidden = false;
  } finally {
    clearTimeout(timer);
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

document.getElementById("follow").addEventListener("click", () => { chosen = null; listed = ""; refresh(); });
refresh();

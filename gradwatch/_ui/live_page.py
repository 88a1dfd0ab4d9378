"""The page of `gradwatch serve`: one HTML document whose script polls `/api/state` and
draws the charts with plotly.js, served by the same server (`/plotly.min.js`)."""

from __future__ import annotations

import html

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 2rem 2rem; color: #222; }
header { position: sticky; top: 0; background: #fff; padding: .6rem 0;
  border-bottom: 1px solid #ddd; z-index: 10; }
h1 { font-size: 1.3rem; margin: .2rem 0; } h1 small { color: #666; font-weight: 400; }
h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
#status { margin: .2rem 0; } #step { font-size: 1.2rem; }
#error { color: #d62728; }
.verdict { padding: .5rem .8rem; border-left: 6px solid #888; background: #f6f6f6; }
.verdict.ok { border-color: #2ca02c; } .verdict.note { border-color: #1f77b4; }
.verdict.warning { border-color: #b8860b; } .verdict.problem { border-color: #d62728; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 1rem; }
.chart { height: 340px; } .tall { height: 480px; }
table { border-collapse: collapse; font-size: .9rem; }
td, th { border-bottom: 1px solid #e4e4e4; padding: .2rem .6rem; text-align: left;
  vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.error { color: #d62728; font-weight: 600; } .warning { color: #b8860b; font-weight: 600; }
.info { color: #555; }
"""

_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let version = null;
let received = null;
const KEEP = { uirevision: "keep", margin: { t: 10, r: 10, b: 40, l: 60 } };

function text(value) {
  if (value === null || value === undefined) return "-";
  if (typeof value === "number") {
    return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  }
  if (Array.isArray(value)) return value.length ? value.map(text).join(", ") : "-";
  return String(value);
}

function fill(table, head, rows) {
  const e = document.createElement("tbody");
  const h = document.createElement("thead");
  h.innerHTML = "<tr>" + head.map((c) => "<th>" + c + "</th>").join("") + "</tr>";
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c && typeof c === "object" && !Array.isArray(c)) {
        td.textContent = c.text;
        if (c.cls) td.className = c.cls;
        if (c.value !== undefined) td.dataset.value = String(c.value);
      } else {
        td.textContent = text(c);
      }
      tr.appendChild(td);
    }
    e.appendChild(tr);
  }
  table.replaceChildren(h, e);
}

function charts(s) {
  const sc = s.scalars;
  Plotly.react($("loss"), [
    { x: sc.step, y: sc.loss, name: "loss", mode: "lines" },
    { x: sc.step, y: sc.learning_rate, name: "learning rate", mode: "lines", yaxis: "y2" },
  ], { ...KEEP, xaxis: { title: { text: "step" } }, yaxis: { title: { text: "loss" } },
       yaxis2: { title: { text: "learning rate" }, overlaying: "y", side: "right" },
       legend: { orientation: "h" } }, { responsive: true });
  Plotly.react($("global"), [
    { x: sc.step, y: sc.global_norm, name: "global norm", mode: "lines" },
  ], { ...KEEP, xaxis: { title: { text: "step" } },
       yaxis: { title: { text: "global gradient norm" }, type: "log" } }, { responsive: true });
  const n = s.norms;
  Plotly.react($("by-layer"), s.layers.map((name, i) => ({
    x: n.step, y: n.layers[i], name: name, mode: "lines",
    hovertemplate: name + "<br>step %{x}<br>norm %{y:.4g}<extra></extra>",
  })), { ...KEEP, xaxis: { title: { text: "step" } },
         yaxis: { title: { text: "gradient norm" }, type: "log" } }, { responsive: true });
  const z = n.layers.map((row) => row.map((v) => (v === null || v <= 0 ? null : Math.log10(v))));
  Plotly.react($("heatmap"), [{
    type: "heatmap", x: n.step, y: s.layers, z: z, colorscale: "Viridis",
    colorbar: { title: { text: "log10 norm" } },
    hovertemplate: "%{y}<br>step %{x}<br>log10 norm %{z:.3f}<extra></extra>",
  }], { ...KEEP, margin: { t: 10, r: 10, b: 40, l: 160 }, xaxis: { title: { text: "step" } },
        yaxis: { autorange: "reversed", automargin: true } }, { responsive: true });
}

function doctor(d) {
  const box = $("verdict");
  if (!d) {
    box.className = "verdict";
    $("sentence").textContent = "The doctor reads the log once its first steps are in.";
    return;
  }
  if (d.error) { $("sentence").textContent = d.error; return; }
  box.className = "verdict " + d.verdict.level;
  $("sentence").textContent = d.verdict.sentence;
  $("doctor-step").textContent = d.step === null ? "" : "(as of step " + d.step + ")";
  const facts = $("facts");
  facts.replaceChildren(...d.verdict.facts.map((f) => {
    const li = document.createElement("li"); li.textContent = f; return li;
  }));
  fill($("findings"), ["severity", "finding", "steps", "variables", "evidence", "advice"],
    d.findings.map((f) => [
      { text: f.severity, cls: f.severity }, f.finding,
      f.first_step === null ? "-" : f.first_step + ".." + f.last_step,
      f.variables, f.evidence, f.advice]));
  const shown = d.alerts.rows.length;
  $("alert-count").textContent = d.alerts.count + " alert" + (d.alerts.count === 1 ? "" : "s") +
    (d.alerts.count > shown ? " (the newest " + shown + " shown)" : "");
  fill($("alerts"), ["step", "variable", "kind", "value"],
    d.alerts.rows.map((a) => [a.step, a.variable, a.kind, a.value]));
  fill($("origins"), ["step", "stage", "layer", "op", "detail"],
    d.origins.map((o) => [o.step, o.stage, o.layer, o.op, o.detail]));
}

function render(s) {
  if (!("layers" in s)) { $("error").textContent = s.error; return; }
  $("step").textContent = s.last_step === null ? "-" : String(s.last_step);
  $("count").textContent = s.steps_recorded;
  $("error").textContent = s.error || "";
  $("reading").textContent = s.parts_to_read ?
    " · reading the log: " + s.parts_to_read + " parts to go" : "";
  fill($("layers"), ["layer", "gradient norm at the last step"],
    s.layers.map((name, i) => [{ text: name }, {
      text: text(s.layer_last[i]), cls: "num", value: s.layer_last[i] }]));
  $("spikes").textContent = s.spikes.length ? s.spikes.join(", ") : "none";
  doctor(s.doctor);
  if (s.steps_recorded) charts(s);
}

async function poll() {
  try {
    const r = await fetch("/api/state" + (version === null ? "" : "?since=" + version),
                          { cache: "no-store" });
    const s = await r.json();
    if (!s.same) { version = s.version; render(s); }
    received = Date.now();
    $("link").textContent = "";
  } catch (e) {
    $("link").textContent = " · the server does not answer";
  } finally {
    setTimeout(poll, 1000);
  }
}

setInterval(() => {
  if (received === null) return;
  $("age").textContent = Math.round((Date.now() - received) / 1000) + " s ago";
}, 1000);
poll();
"""


def page(path: str) -> str:
    """The live page of the log at `path`."""
    e = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>gradwatch serve: {e(path)}</title>
<style>{_STYLE}</style>
<script src="/plotly.min.js"></script>
</head><body>
<header>
<h1>gradwatch <small>{e(path)}</small></h1>
<p id="status">Last recorded step <b id="step">-</b> · <span id="count">0</span> steps recorded
· read <span id="age">-</span><span id="reading"></span><span id="link"></span>
<span id="error"></span></p>
</header>
<section id="verdict" class="verdict"><h2>Verdict <small id="doctor-step"></small></h2>
<p id="sentence">Reading the log...</p><ul id="facts"></ul></section>
<div class="grid">
<section><h2>Loss and learning rate</h2><div id="loss" class="chart"></div></section>
<section><h2>Global gradient norm</h2><div id="global" class="chart"></div></section>
<section><h2>Gradient norm by layer</h2><div id="by-layer" class="chart tall"></div></section>
<section><h2>Layers by steps</h2><div id="heatmap" class="chart tall"></div></section>
</div>
<section><h2>Findings</h2><table id="findings"></table></section>
<section><h2>Alerts</h2><p id="alert-count"></p><table id="alerts"></table></section>
<section><h2>Spikes</h2><p>Steps: <span id="spikes">none</span></p></section>
<section><h2>Where NaN/Inf began</h2><table id="origins"></table></section>
<section><h2>Layers</h2><table id="layers"></table></section>
<script>{_SCRIPT}</script>
</body></html>
"""

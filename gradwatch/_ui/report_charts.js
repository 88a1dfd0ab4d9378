// The HTML report's interactive charts: the norms, the loss and the heatmap, drawn by
// plotly.js from the data that gradwatch/_ui/interactive.py writes into the page.
// It draws and formats; every number comes from the data, none is computed here.
(function () {
  "use strict";
  const RED = "#d62728";
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f",
                  "#bcbd22", "#17becf"];
  const CONFIG = { displaylogo: false, responsive: true, scrollZoom: false };
  const data = JSON.parse(document.getElementById("gradwatch-chart-data").textContent);

  function buffer(b64) {
    const text = atob(b64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out.buffer;
  }
  const orNull = (v) => (Number.isFinite(v) ? v : null);
  const steps = Array.from(new Float64Array(buffer(data.steps)));
  const Positions = data.atBytes === 2 ? Uint16Array : Int32Array;

  // A line's steps and values; a position at each recorded step where it has none.
  function points(line) {
    const values = Array.from(new Float32Array(buffer(line.values)), orNull);
    const at = line.at === null ? values.map((_, i) => i) : Array.from(new Positions(buffer(line.at)));
    return { x: at.map((p) => steps[p]), y: values };
  }
  // Plotly's hover labels read a little HTML: a name is shown as text.
  const escape = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/%/g, "&#37;");

  function spans(yref) {
    return data.spans.map(([first, last]) => ({
      type: "rect", xref: "x", yref: yref, x0: first - 0.5, x1: last + 0.5, y0: 0, y1: 1,
      // As gradwatch.plot marks them: a light red span, edged in red.
      fillcolor: "rgba(214, 39, 40, 0.25)", line: { color: RED, width: 1 }, layer: "below",
    }));
  }

  function norms() {
    const what = data.by;
    let rank = 0;
    const traces = data.norms.map((line) => {
      const p = points(line);
      const color = line.shown ? COLORS[rank++ % COLORS.length] : undefined;
      return {
        type: "scatter", mode: "lines", x: p.x, y: p.y, name: line.label,
        visible: line.shown ? true : "legendonly",
        line: color ? { color: color, width: 1.4 } : { width: 1 },
        hovertemplate: `<b>${escape(line.name)}</b><br>step %{x}<br>norm %{y:.4g}<extra></extra>`,
      };
    });
    const layout = {
      title: { text: `Gradient norms of ${data.norms.length} ${what}s` },
      xaxis: { title: { text: "step" } },
      yaxis: { title: { text: "gradient norm (L2)" }, type: "log", exponentformat: "power" },
      hovermode: "closest", shapes: spans("paper"), margin: { t: 50, r: 10 },
      legend: { title: { text: `${what} (click: show/hide)` } },
    };
    return Plotly.newPlot("gw-norms", traces, layout, CONFIG);
  }

  function loss() {
    if (!document.getElementById("gw-loss")) return Promise.resolve();
    const traces = [];
    const add = (line, yaxis, color, dash, word) => {
      const p = points(line);
      traces.push({
        type: "scatter", mode: "lines", x: p.x, y: p.y, name: line.name, yaxis: yaxis,
        line: { color: color, width: 1.2, dash: dash },
        hovertemplate: `step %{x}<br>${word} %{y:.4g}<extra></extra>`,
      });
    };
    add(data.loss, "y", COLORS[0], "solid", "loss");
    if (data.learningRate) add(data.learningRate, "y2", COLORS[5], "dash", "learning rate");
    add(data.globalNorm, "y3", COLORS[1], "solid", "global norm");
    const layout = {
      title: { text: "Loss, learning rate and global gradient norm" },
      xaxis: { title: { text: "step" }, anchor: "y3" },
      yaxis: { title: { text: "loss" }, domain: [0.42, 1], type: data.lossLog ? "log" : "linear" },
      yaxis2: { title: { text: "learning rate" }, overlaying: "y", side: "right",
                exponentformat: "power" },
      yaxis3: { title: { text: "global norm" }, domain: [0, 0.34], type: "log",
                exponentformat: "power" },
      hovermode: "closest", shapes: spans("paper"), margin: { t: 50 },
      legend: { orientation: "h", y: 1.08, x: 1, xanchor: "right" },
    };
    return Plotly.newPlot("gw-loss", traces, layout, CONFIG);
  }

  // The heatmap: the rows picked in its <select>, in model order.
  const heat = data.heat;
  const columns = heat.columns;
  const heatValues = Array.from(new Float32Array(buffer(heat.values)), orNull);
  const heatBad = new Uint8Array(buffer(heat.bad));
  const starts = [];
  const ends = [];
  for (let c = 0; c < columns; c++) {
    starts.push(steps[c * heat.size]);
    ends.push(steps[Math.min(steps.length, (c + 1) * heat.size) - 1]);
  }

  function heatTraces(rows) {
    const names = rows.map((r) => data.norms[r].name);
    const z = [];
    const custom = [];
    const red = [];
    for (const r of rows) {
      const zr = [];
      const cr = [];
      const br = [];
      for (let c = 0; c < columns; c++) {
        const v = heatValues[r * columns + c];
        zr.push(v !== null && v > 0 ? Math.log10(v) : null);
        cr.push([v, ends[c]]);
        br.push(heatBad[r * columns + c] ? 1 : null);
      }
      z.push(zr);
      custom.push(cr);
      red.push(br);
    }
    const span = heat.size === 1 ? "step %{x}" : "steps %{x}\u2013%{customdata[1]}";
    const word = heat.size === 1 ? "norm" : "largest norm";
    return [
      {
        type: "heatmap", x: starts, y: names, z: z, customdata: custom,
        colorscale: "Viridis", colorbar: { title: { text: "log10 norm" } },
        hoverongaps: false,
        hovertemplate: `<b>%{y}</b><br>${span}<br>${word} %{customdata[0]:.4g}<extra></extra>`,
      },
      {
        type: "heatmap", x: starts, y: names, z: red, showscale: false, hoverongaps: false,
        colorscale: [[0, RED], [1, RED]], customdata: custom,
        hovertemplate: `<b>%{y}</b><br>${span}<br>NaN/Inf gradient<extra></extra>`,
      },
    ];
  }

  function heatLayout(rows) {
    const labels = rows.map((r) => data.norms[r].label);
    const names = rows.map((r) => data.norms[r].name);
    return {
      title: { text: `Gradient norm by ${data.by}, ${rows.length} of ${data.norms.length}` },
      xaxis: { title: { text: "step" } },
      yaxis: { type: "category", autorange: "reversed", tickvals: names, ticktext: labels, automargin: true,
               title: { text: data.prefix ? `${data.by} (in ${data.prefix.replace(/\/$/, "")})` : data.by } },
      height: Math.max(320, Math.min(1600, 140 + 14 * rows.length)), margin: { t: 50 },
      plot_bgcolor: "#d9d9d9",  // no norm (0 or none recorded): grey, as gradwatch.plot draws it
    };
  }

  const picker = document.getElementById("gw-heatmap-layers");
  function picked() {
    return Array.from(picker.selectedOptions, (o) => Number(o.value));
  }
  function heatmap() {
    const rows = picked();
    return Plotly.react("gw-heatmap", heatTraces(rows), heatLayout(rows), CONFIG);
  }
  function pick(which) {
    for (const o of picker.options) o.selected = which(Number(o.value));
    return heatmap();
  }
  picker.addEventListener("change", heatmap);
  document.getElementById("gw-heatmap-all").addEventListener("click", () => pick(() => true));
  document.getElementById("gw-heatmap-first").addEventListener("click", () => pick((r) => heat.shown[r]));

  Promise.all([norms(), loss(), heatmap()]).then(() => {
    document.body.dataset.charts = "ready";
  }, (error) => {
    document.body.dataset.charts = "failed: " + error;
  });
})();

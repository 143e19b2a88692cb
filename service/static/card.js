// The model card: what GET /v1/models/{model} and /equivalence say about a bundle: classes,
// input spec, execution provider, files and checksums, the fold report, the equivalence
// measured at export, and the int8 variant's agreement and accuracy when the bundle has one.

import { formatSci, renderLayerChart } from "./chart.js";
import { h } from "./dom.js";

function table(caption, head, rows, cls = "") {
  // Each cell carries its column name, so narrow screens can show rows as stacked cards.
  for (const row of rows) {
    const cells = [...row.children];
    if (cells.length === head.length) cells.forEach((c, i) => c.setAttribute("data-label", head[i]));
  }
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: `stack ${cls}` },
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows),
    ),
  );
}

function definitions(pairs) {
  return h(
    "dl",
    { class: "kv" },
    pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))),
  );
}

function badge(ok, yes, no) {
  return h("span", { class: `badge ${ok ? "ok" : "bad"}` }, ok ? yes : no);
}

function inputSection(m) {
  const p = m.input.preprocess;
  return h(
    "section",
    { class: "card-part" },
    h("h3", {}, "Input and output"),
    definitions([
      ["Input tensor", `${m.input.name}: ${m.input.datatype} [${m.input.shape.join(", ")}]`],
      ["Layout", p.layout ?? "NCHW"],
      ["Color mode", p.color_mode === "L" ? "L (grayscale, 1 channel)" : "RGB (3 channels)"],
      ["Size", `${p.width}×${p.height} (${p.resample} resampling)`],
      ["Scale", String(p.scale)],
      ["Mean", `[${p.mean.join(", ")}]`],
      ["Std", `[${p.std.join(", ")}]`],
      ["Output tensor", `${m.output.name}: ${m.output.datatype} [${m.output.shape.join(", ")}]`],
      ["Output holds", m.output.probabilities ? "probabilities (shown as they are)" : "logits"],
    ]),
    h("h3", {}, `Classes (${m.classes.length})`),
    h("ul", { class: "chips", "aria-label": "Classes" }, m.classes.map((c, i) => h("li", { title: `index ${i}` }, c))),
  );
}

function runtimeSection(m) {
  const files = Object.entries(m.files).flatMap(([variant, f]) => [
    h(
      "tr",
      { "data-variant": variant, class: "has-hash" },
      h("th", { scope: "row" }, variant),
      h("td", {}, f.path),
      h("td", { class: "num" }, String(f.batchnorm_nodes)),
      h("td", { class: "num" }, String(f.opset)),
      h("td", {}, f.graph_optimization),
    ),
    h("tr", { class: "hash-row" },
      h("td", { colspan: 5, "data-role": "sha256", "data-variant": variant }, `sha256 ${f.sha256}`)),
  ]);
  const versions = Object.entries(m.versions ?? {}).map(([k, v]) => `${k} ${v}`).join(" · ");
  return h(
    "section",
    { class: "card-part wide" },
    h("h3", {}, "Runtime and files"),
    definitions([
      ["Execution provider", h("span", { "data-role": "providers" }, m.providers.join(", ") || "none")],
      ["Exported with", versions],
      ["Created", m.created],
    ]),
    table("ONNX files, verified against these sha256 checksums at start-up",
      ["Variant", "File", "BN nodes", "Opset", "Graph optimization"], files, "files"),
  );
}

function foldSection(m) {
  const s = m.fold_summary;
  const rows = s.layers.map((l) => {
    const scale = l.scale_min != null ? `${l.scale_min.toPrecision(3)} … ${l.scale_max.toPrecision(3)}` : "";
    const note = [l.reason, l.warning].filter(Boolean).join("; ");
    return h(
      "tr",
      { "data-bn": l.bn, class: l.folded ? "" : "refused" },
      h("th", { scope: "row" }, l.bn),
      h("td", {}, badge(l.folded, "folded", "refused")),
      h("td", {}, l.into ?? "—"),
      h("td", {}, l.direction ?? "—"),
      h("td", { class: "num" }, scale),
      h("td", {}, note || "—"),
    );
  });
  return h(
    "section",
    { class: "card-part wide" },
    h("h3", {}, `Fold report: ${s.folded} folded, ${s.refused} refused`),
    table("Each BatchNorm layer and what happened to it",
      ["BatchNorm", "Result", "Folded into", "Direction", "|γ/σ| range", "Reason / warning"], rows, "fold"),
  );
}

function equivalenceSection(eq) {
  const pairs = [
    ["folded vs unfolded", eq.folded_vs_unfolded],
    ["folded vs float64", eq.folded_vs_float64],
    ["unfolded vs float64", eq.unfolded_vs_float64],
  ];
  const rows = pairs.filter(([, d]) => d != null).map(([name, d]) =>
    h(
      "tr",
      {},
      h("th", { scope: "row" }, name),
      h("td", { class: "num" }, formatSci(d.max_abs_diff)),
      h("td", { class: "num" }, formatSci(d.mean_abs_diff)),
      h("td", { class: "num" }, formatSci(d.max_rel_diff)),
      h("td", { class: "num" }, d.top1_agreement == null ? "—" : `${(d.top1_agreement * 100).toFixed(2)}%`),
    ),
  );
  const chart = h("div", { class: "chart-box", id: "export-chart" });
  const part = h(
    "section",
    { class: "card-part wide" },
    h("h3", {}, "Equivalence measured at export ", badge(eq.passed, "passed", "failed")),
    h("p", { class: "hint" },
      `onnxruntime on ${eq.n_images} ${eq.split} images; pass threshold on max |Δ logit|: ${formatSci(eq.tolerance_abs)}.`),
    table("Logit differences", ["Comparison", "max |Δ|", "mean |Δ|", "max rel Δ", "Top-1 agreement"], rows, "equivalence"),
    h("figure", { class: "chart" }, chart,
      h("figcaption", { class: "hint" }, "Per layer at export: folded layer output vs the BatchNorm output it replaces (log scale).")),
  );
  const draw = () => {
    const layerRows = eq.per_layer.map((l) => ({ key: l.bn, label: l.bn, max: l.max_abs_diff, mean: l.mean_abs_diff }));
    layerRows.push({
      key: "logits",
      label: "logits (output)",
      max: eq.folded_vs_unfolded.max_abs_diff,
      mean: eq.folded_vs_unfolded.mean_abs_diff,
      separated: true,
    });
    renderLayerChart(chart, layerRows, {
      id: "export",
      title: "Folded minus unfolded per layer, measured at export",
      tolerance: eq.tolerance_abs,
    });
  };
  return { part, draw };
}

/** The int8 variant as measured at export: agreement with folded and accuracy, or why not. */
function int8Section(m, eq) {
  const r = eq?.int8;
  if (!r && !m.files?.int8) return null;
  const pct = (v, d = 2) => (v == null ? "—" : `${(v * 100).toFixed(d)}%`);
  const refused = m.variant_errors?.int8;
  const settings = m.files?.int8?.quantization?.settings ?? r?.settings;
  const d = r?.int8_vs_folded;
  return h(
    "section",
    { class: "card-part", id: "int8-card" },
    h("h3", {}, "INT8 after folding ", badge(Boolean(r?.passed) && !refused, "passed", refused ? "refused" : "not written")),
    refused ? h("p", { class: "error-text" }, `Not served: ${refused}`) : null,
    r && !r.passed ? h("p", { class: "error-text" }, r.reason) : null,
    definitions([
      ["Top-1 agreement", d ? `${pct(d.top1_agreement)} with folded (at least ${pct(r.min_top1_agreement, 0)} required)` : null],
      ["Accuracy", r?.accuracy_int8 == null ? null
        : `${pct(r.accuracy_folded)} float32 → ${pct(r.accuracy_int8)} int8 (drop ${r.accuracy_drop_points.toFixed(2)} points, at most ${r.max_accuracy_drop_points} allowed)`],
      ["max |Δ logit|", d ? `${formatSci(d.max_abs_diff)} (mean ${formatSci(d.mean_abs_diff)})` : null],
      ["Measured on", r ? `${r.n_images} ${r.split} images` : null],
      ["Quantization", settings ? `static ${settings.format}, per-channel int8 weights, ${settings.activation_type} activations, ${settings.calibration_method} on ${settings.calibration_source}` : null],
    ]),
  );
}

/** BatchNorm running statistics against data: per layer, flagged ones marked, likely causes. */
function statisticsSection(m) {
  const c = m.bn_statistics;
  const r = m.recalibration;
  if (!c && !r) return null;
  const pct = (v) => (v == null ? "—" : `${(v * 100).toFixed(2)}%`);
  const rows = (c?.layers ?? []).map((l) =>
    h(
      "tr",
      { class: l.flagged ? "flagged" : "" },
      h("th", { scope: "row" }, l.bn),
      h("td", { class: "num" }, String(l.channels)),
      h("td", { class: "num" }, l.mean_shift_rms.toFixed(3)),
      h("td", { class: "num" }, l.var_ratio_median.toFixed(3)),
      h("td", {}, l.flagged ? "flagged" : "in line"),
    ),
  );
  return h(
    "section",
    { class: "card-part wide", id: "bn-statistics" },
    h("h3", {}, "BatchNorm statistics vs data ",
      c?.checked ? badge(c.flagged.length === 0, "in line", `${c.flagged.length} flagged`) : null),
    c && !c.checked ? h("p", { class: "note" }, `Not checked: ${c.note}`) : null,
    c?.checked ? h("p", { class: "hint" },
      `On ${c.inputs}; flagged above ${c.mean_shift_threshold.toFixed(2)} running stds of mean shift or ${c.log_var_ratio_threshold.toFixed(2)} of log variance ratio (RMS over channels).`) : null,
    rows.length ? table("Each BatchNorm layer's statistics against the data, in graph order",
      ["BatchNorm", "Channels", "Mean shift (RMS, stds)", "Variance ratio (median)", "Verdict"], rows, "bn-statistics") : null,
    ...(c?.causes ?? []).map((cause) => h("p", { class: "error-text" }, `Likely cause: ${cause}`)),
    r ? definitions([
      ["Recalibrated on", r.inputs],
      ["Layers re-estimated", String(r.layers)],
      ["Top-1 agreement with the original", pct(r.top1_agreement)],
      ["Accuracy", r.accuracy_before == null ? null : `${pct(r.accuracy_before)} → ${pct(r.accuracy_after)}`],
      ["Original sha256", r.original_sha256],
    ]) : null,
  );
}

function importSection(m) {
  const r = m.imported;
  if (!r) return null;
  return h(
    "section",
    { class: "card-part" },
    h("h3", {}, "Imported model"),
    definitions([
      ["Source", r.source],
      ["Producer", r.producer],
      ["IR version", String(r.ir_version)],
      ["sha256", r.sha256],
      ...(r.external_data.length ? [["Weight files", r.external_data.join(", ")]] : []),
    ]),
    h("p", { class: "note" }, r.changes.length ? "Changed for serving:" : "Unchanged for serving."),
    r.changes.length ? h("ul", { "data-role": "import-changes" }, r.changes.map((c) => h("li", {}, c))) : null,
  );
}

function trainingSection(m) {
  const t = m.training ?? {};
  const fmt = (v) => {
    if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(4);
    if (v !== null && typeof v === "object") {
      // The training configuration: key=value pairs, nested values as JSON.
      const part = ([k, x]) => `${k}=${x !== null && typeof x === "object" ? JSON.stringify(x) : x}`;
      return Object.entries(v).map(part).join(", ");
    }
    return String(v);
  };
  const pairs = Object.entries(t).map(([k, v]) => [k.replaceAll("_", " "), fmt(v)]);
  if (pairs.length === 0) return null;
  return h("section", { class: "card-part" }, h("h3", {}, "Training run"), definitions(pairs));
}

/**
 * Fill `container` with the card of model `m` (and its export-time report `eq`, null when the
 * model is not ready). Returns a function that redraws the card's chart at the current width.
 */
export function renderModelCard(container, m, eq) {
  const head = h(
    "div",
    { class: "card-head" },
    h("span", { class: "card-name" }, m.name),
    h("span", { class: "card-version" }, `version ${m.version ?? "?"}`),
    badge(m.status === "ready", "ready", m.status),
  );
  if (m.status !== "ready" || !m.input) {
    container.replaceChildren(head, h("p", { class: "error-text" }, m.error ?? "This model is not served."));
    return () => {};
  }
  const equivalence = eq ? equivalenceSection(eq) : null;
  const parts = [
    inputSection(m),
    importSection(m),
    trainingSection(m),
    runtimeSection(m),
    foldSection(m),
    statisticsSection(m),
    equivalence?.part,
    int8Section(m, eq),
  ].filter(Boolean);
  container.replaceChildren(head, h("div", { class: "card-grid" }, parts));
  equivalence?.draw();
  return equivalence ? equivalence.draw : () => {};
}

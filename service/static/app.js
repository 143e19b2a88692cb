// The bnfold page: pick a model, draw or upload an image, and compare the folded model with the
// unfolded one through POST /v1/models/{model}/compare. Plain ES modules, no build step; every
// byte comes from this server. The model card is card.js, the chart chart.js, the drawing pad
// draw.js, and the browser's copy of the server's resize pixels.js.

import { renderModelCard } from "./card.js";
import { formatSci, renderLayerChart } from "./chart.js";
import { api, h } from "./dom.js";
import { DrawingPad } from "./draw.js";
import { planesToImageData, toModelPixels } from "./pixels.js";

const FLOAT32_EPS = 2 ** -23; // spacing of float32 numbers just above 1.0

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  topK: $("top-k"),
  modelStatus: $("model-status"),
  draw: $("draw-canvas"),
  clear: $("clear"),
  predict: $("predict"),
  file: $("file"),
  dropZone: $("drop-zone"),
  preview: $("preview"),
  previewCaption: $("preview-caption"),
  status: $("status"),
  error: $("error"),
  results: $("results"),
  chart: $("layer-chart"),
  chartCaption: $("layer-chart-caption"),
  card: $("card-body"),
};

const state = {
  model: null, // GET /v1/models/{model}
  equivalence: null, // GET /v1/models/{model}/equivalence
  source: null, // {kind: "drawing"} or {kind: "file", file}
  result: null, // the last /compare answer
  redrawCard: null, // redraws the model card's chart at the current width
  pad: null, // the DrawingPad
  request: 0, // id of the newest request; older answers are dropped
};

const modelPath = (name) => `/v1/models/${encodeURIComponent(name)}`;
const percent = (p, digits = 2) => `${(p * 100).toFixed(digits)}%`;

// ------------------------------------------------------------------ status, errors

function setStatus(text, busy = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("busy", busy);
  ui.results.setAttribute("aria-busy", String(busy));
}

function showError(message) {
  ui.error.replaceChildren(h("strong", {}, "No prediction: "), h("span", { "data-role": "message" }, message));
  ui.error.hidden = false;
  ui.results.hidden = true;
  setStatus("No prediction: the error is shown above.");
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

function resetResults(message = "No prediction yet.") {
  state.result = null;
  ui.results.hidden = true;
  clearError();
  setStatus(message);
}

// ------------------------------------------------------------------ models

async function loadModels() {
  let list;
  try {
    list = await api("/v1/models");
  } catch (err) {
    ui.model.replaceChildren(h("option", { value: "" }, "No models"));
    ui.modelStatus.textContent = `Could not list the models: ${err.message}`;
    return;
  }
  const models = list.models;
  if (models.length === 0) {
    ui.model.replaceChildren(h("option", { value: "" }, "No models"));
    ui.modelStatus.textContent = "This server has no model bundles in its models folder.";
    return;
  }
  ui.model.replaceChildren(
    ...models.map((m) =>
      h("option", { value: m.name }, m.status === "ready" ? m.name : `${m.name} (${m.status})`),
    ),
  );
  const wanted = new URLSearchParams(location.search).get("model");
  const first = models.find((m) => m.name === wanted) ?? models.find((m) => m.status === "ready") ?? models[0];
  ui.model.value = first.name;
  ui.model.disabled = false;
  await selectModel(first.name);
}

async function selectModel(name) {
  state.model = null;
  state.equivalence = null;
  ui.predict.disabled = true;
  ui.modelStatus.textContent = `Loading ${name}…`;
  try {
    state.model = await api(modelPath(name));
    if (state.model.status === "ready") state.equivalence = await api(`${modelPath(name)}/equivalence`);
  } catch (err) {
    ui.modelStatus.textContent = err.message;
    return;
  }
  const m = state.model;
  const ready = m.status === "ready";
  ui.modelStatus.replaceChildren(
    h("span", { class: `badge ${ready ? "ok" : "bad"}` }, m.status),
    ready ? ` ${describeInput(m)} · ${m.providers.join(", ") || "no provider"}` : ` ${m.error ?? ""}`,
  );
  ui.topK.max = String(m.classes?.length ?? 1000);
  if (m.classes && Number(ui.topK.value) > m.classes.length) ui.topK.value = String(m.classes.length);
  state.redrawCard = renderModelCard(ui.card, m, state.equivalence);
  if (m.input) {
    ui.preview.width = m.input.preprocess.width;
    ui.preview.height = m.input.preprocess.height;
  }
  resetResults();
  clearPreview();
  if (ready && state.source) await predict();
}

function describeInput(m) {
  const p = m.input.preprocess;
  const mode = p.color_mode === "L" ? "grayscale" : "RGB";
  return `${p.width}×${p.height} ${mode} input, ${m.classes.length} classes`;
}

// ------------------------------------------------------------------ input: drawing and files

function wireDrawing() {
  state.pad = new DrawingPad(ui.draw, $("canvas-wrap"), () => {
    state.source = { kind: "drawing" };
    ui.file.value = "";
    predict();
  });
  ui.clear.addEventListener("click", () => {
    state.pad.clear();
    if (state.source?.kind === "drawing") {
      state.source = null;
      state.request += 1; // drop an answer still on its way
      clearPreview();
      resetResults();
    }
  });
}

function useFile(file) {
  if (!file) return;
  state.source = { kind: "file", file };
  predict();
}

function wireUpload() {
  ui.file.addEventListener("change", () => useFile(ui.file.files[0]));
  ui.dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    ui.dropZone.classList.add("dragging");
  });
  ui.dropZone.addEventListener("dragleave", () => ui.dropZone.classList.remove("dragging"));
  ui.dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.dropZone.classList.remove("dragging");
    useFile(event.dataTransfer.files[0]);
  });
}

// ------------------------------------------------------------------ what the model sees

function clearPreview() {
  const ctx = ui.preview.getContext("2d");
  ctx.clearRect(0, 0, ui.preview.width, ui.preview.height);
  ui.preview.classList.add("empty");
  ui.previewCaption.textContent = "Draw or upload an image.";
}

function showPreview(pixels, caption) {
  ui.preview.width = pixels.width;
  ui.preview.height = pixels.height;
  ui.preview.getContext("2d").putImageData(planesToImageData(pixels), 0, 0);
  ui.preview.classList.remove("empty");
  ui.previewCaption.textContent = caption;
}

function normalizationNote(p) {
  const list = (v) => v.map((x) => +x.toFixed(4)).join(", ");
  return `The server then scales by ${+p.scale.toFixed(6)}, subtracts [${list(p.mean)}] and divides by [${list(p.std)}].`;
}

/** The drawing at model resolution: shown, and sent as a PNG of exactly those pixels. */
async function drawingUpload(spec) {
  const { rgba, width, height } = state.pad.pixels();
  const pixels = toModelPixels(rgba, width, height, spec);
  showPreview(pixels, `Your drawing, reduced to ${pixels.width}×${pixels.height} with the ${spec.resample} filter: these exact pixels are sent. ${normalizationNote(spec)}`);
  const blob = await new Promise((resolve) => ui.preview.toBlob(resolve, "image/png"));
  return { blob, name: "drawing.png" };
}

/** A file is sent as it is; the preview repeats the server's resize in the browser. */
async function fileUpload(file, spec) {
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    // The browser cannot decode it either; the server will say why.
  }
  if (bitmap) {
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(bitmap, 0, 0);
    const rgba = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
    const pixels = toModelPixels(rgba, bitmap.width, bitmap.height, spec);
    const resized = bitmap.width === spec.width && bitmap.height === spec.height
      ? "already at the model's size"
      : `${bitmap.width}×${bitmap.height} resized to ${pixels.width}×${pixels.height} (${spec.resample})`;
    showPreview(pixels, `${file.name}: ${resized}, as the server does it. ${normalizationNote(spec)}`);
    bitmap.close();
  } else {
    clearPreview();
    ui.previewCaption.textContent = `${file.name}: the browser cannot show this file as an image.`;
  }
  return { blob: file, name: file.name || "upload" };
}

// ------------------------------------------------------------------ predict and compare

async function predict() {
  const m = state.model;
  if (!m || m.status !== "ready" || !state.source) return;
  const request = ++state.request;
  const spec = m.input.preprocess;
  clearError();
  setStatus("Running both models…", true);
  ui.predict.disabled = true;
  try {
    const upload = state.source.kind === "drawing"
      ? await drawingUpload(spec)
      : await fileUpload(state.source.file, spec);
    const form = new FormData();
    form.append("files", upload.blob, upload.name);
    const topK = Math.max(1, Math.round(Number(ui.topK.value)) || 3);
    const result = await api(`${modelPath(m.name)}/compare?top_k=${topK}`, { method: "POST", body: form });
    if (request !== state.request) return; // a newer input replaced this one
    state.result = result;
    renderResult(result);
    // On a phone the results sit below the input: bring them up after an upload (not after a
    // stroke, which would pull the pad away mid-drawing).
    if (state.source.kind === "file" && matchMedia("(max-width: 820px)").matches) {
      ui.results.closest("section").scrollIntoView({ behavior: "smooth", block: "start" });
    }
    const int8 = result.int8 ? `, int8 says ${result.int8.predictions[0].label}` : "";
    setStatus(`${m.name}: folded says ${result.folded[0].label}, unfolded says ${result.unfolded[0].label}${int8}.`);
  } catch (err) {
    if (request !== state.request) return;
    showError(err.message);
  } finally {
    if (request === state.request) {
      ui.status.classList.remove("busy");
      ui.results.setAttribute("aria-busy", "false");
      ui.predict.disabled = false;
    }
  }
}

function renderVariant(article, prediction) {
  article.querySelector("[data-role=label]").textContent = prediction.label;
  article.querySelector("[data-role=probability]").textContent = percent(prediction.probability, 4);
  article.querySelector("[data-role=probability]").title = `p = ${prediction.probability}`;
  const items = prediction.top_k.map((c) => {
    const fill = h("span", { class: "fill" });
    fill.style.width = `${Math.max(c.probability * 100, 0.5)}%`;
    return h(
      "li",
      { "data-label": c.label, "data-probability": c.probability, title: `p = ${c.probability}` },
      h("span", { class: "class-label" }, c.label),
      h("span", { class: "bar", "aria-hidden": "true" }, fill),
      h("span", { class: "class-prob" }, percent(c.probability)),
    );
  });
  article.querySelector("[data-role=topk]").replaceChildren(...items);
}

function setMetric(id, value, text, note, tone) {
  const metric = $(id);
  const dd = metric.querySelector("[data-role=value]");
  dd.textContent = text;
  dd.dataset.value = String(value);
  metric.querySelector("[data-role=note]").textContent = note;
  metric.dataset.tone = tone ?? "";
}

/** int8 beside the float32 pair: its agreement with folded, never a float32 tolerance. */
function renderInt8(r) {
  const article = $("int8");
  const line = article.querySelector("[data-role=agreement]");
  article.classList.toggle("absent", !r.int8);
  if (!r.int8) {
    line.textContent = `Not served: ${r.int8_note ?? "the bundle has no int8 variant"}.`;
    line.dataset.tone = "";
    return;
  }
  const q = r.int8;
  renderVariant(article, q.predictions[0]);
  const agree = q.top1_agreement === 1;
  const atExport = q.export_top1_agreement == null ? ""
    : ` At export: ${percent(q.export_top1_agreement)} agreement on the held-out images` +
      (q.min_top1_agreement == null ? "." : ` (at least ${percent(q.min_top1_agreement, 0)} required).`);
  line.textContent = `${agree ? "Agrees with" : "Differs from"} folded on this input (max |Δ logit| ${formatSci(q.max_abs_diff)}).${atExport}`;
  line.dataset.tone = agree ? "ok" : "bad";
}

function renderResult(r) {
  renderVariant($("folded"), r.folded[0]);
  renderVariant($("unfolded"), r.unfolded[0]);
  renderInt8(r);
  const agree = r.top1_agreement === 1;
  setMetric("m-agreement", r.top1_agreement, percent(r.top1_agreement, 0),
    agree ? "same top class" : "the top classes differ", agree ? "ok" : "bad");
  setMetric("m-max-abs", r.max_abs_diff, formatSci(r.max_abs_diff),
    `${r.within_tolerance ? "within" : "over"} the bundle's tolerance ${formatSci(r.tolerance_abs)}`,
    r.within_tolerance ? "ok" : "bad");
  const logits = r.n_images * (state.model.classes?.length ?? 1);
  setMetric("m-mean-abs", r.mean_abs_diff, formatSci(r.mean_abs_diff), `over ${logits} logits`);
  setMetric("m-max-rel", r.max_rel_diff, formatSci(r.max_rel_diff),
    `≈ ${(r.max_rel_diff / FLOAT32_EPS).toFixed(1)} × float32 ε (${formatSci(FLOAT32_EPS)})`);
  ui.results.hidden = false;
  drawLiveChart();
}

function foldedInto(bn) {
  const row = state.model.fold_summary?.layers.find((l) => l.bn === bn);
  return row?.into ?? "?";
}

function drawLiveChart() {
  const r = state.result;
  if (!r || ui.results.hidden) return;
  const exported = new Map((state.equivalence?.per_layer ?? []).map((l) => [l.bn, l]));
  const rows = r.per_layer.map((l) => ({
    key: l.bn,
    label: `${l.bn} → ${foldedInto(l.bn)}`,
    detail: `${l.folded_tensor} vs ${l.unfolded_tensor}`,
    max: l.max_abs_diff,
    mean: l.mean_abs_diff,
    reference: exported.get(l.bn)?.max_abs_diff,
  }));
  rows.push({
    key: "logits",
    label: "logits (output)",
    max: r.max_abs_diff,
    mean: r.mean_abs_diff,
    reference: state.equivalence?.folded_vs_unfolded.max_abs_diff,
    separated: true,
  });
  renderLayerChart(ui.chart, rows, {
    id: "live",
    title: "Folded minus unfolded, per folded layer, for this input",
    tolerance: r.tolerance_abs,
    referenceLabel: "export-time max",
  });
  const note = r.per_layer.length === 0 && r.per_layer_note ? ` Per-layer outputs unavailable: ${r.per_layer_note}` : "";
  const eq = state.equivalence;
  const exportSet = eq ? `${eq.n_images} ${eq.split} images` : "the held-out images";
  ui.chartCaption.textContent =
    `|folded − unfolded| over each layer's outputs for this input, on a log scale; the diamond is the max over ${exportSet} at export. ` +
    `Float32 rounding lands around 1e-7 to 1e-5; a folding mistake would reach the dashed tolerance line and beyond.${note}`;
}

// ------------------------------------------------------------------ start

function init() {
  wireDrawing();
  wireUpload();
  ui.model.addEventListener("change", () => selectModel(ui.model.value));
  ui.predict.addEventListener("click", () => predict());
  ui.topK.addEventListener("change", () => state.result && predict());
  // Charts are drawn at the width they get: redraw when it changes (rotation, resizing).
  let lastWidth = ui.card.clientWidth;
  new ResizeObserver(() => {
    if (ui.card.clientWidth === lastWidth) return;
    lastWidth = ui.card.clientWidth;
    drawLiveChart();
    state.redrawCard?.();
  }).observe(ui.card);
  loadModels();
}

init();

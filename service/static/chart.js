// Per-layer difference chart: one row per folded layer (and the logits), horizontal bars on a
// log10 axis, drawn as inline SVG. Float32 rounding noise sits around 1e-7..1e-5 while a real
// folding mistake is 1e-2 or more, so a log axis shows both at a glance.

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatSci(v) {
  if (v === 0) return "0";
  if (!Number.isFinite(v)) return String(v);
  return v.toExponential(2);
}

// Whole decades [lo, hi] covering every positive value, at least 4 decades wide.
function decades(values) {
  const positive = values.filter((v) => v > 0 && Number.isFinite(v));
  if (positive.length === 0) return [-9, -3];
  let lo = Math.floor(Math.log10(Math.min(...positive)));
  let hi = Math.ceil(Math.log10(Math.max(...positive)));
  if (hi === lo) hi += 1;
  while (hi - lo < 4) lo -= 1;
  return [lo, hi];
}

/**
 * Draw the chart into `container` (emptied first).
 * rows: [{key, label, detail, max, mean, reference?, separated?}], values >= 0.
 *   `reference` (optional) is drawn as a hollow diamond, e.g. the export-time max.
 * options: {tolerance?, title, referenceLabel?}
 */
export function renderLayerChart(container, rows, options) {
  container.replaceChildren();
  const width = Math.max(container.clientWidth, 280);
  const narrow = width < 560; // labels above the bars instead of beside them
  // Labels are monospace, about 7 px a character at 11.5 px.
  const longest = Math.max(...rows.map((r) => r.label.length));
  const labelW = narrow ? 0 : Math.min(longest * 7 + 12, Math.round(width * 0.45));
  const valueW = 64;
  const rowH = narrow ? 46 : 30;
  const top = 26;
  const axisH = 30;
  const plotX0 = labelW + 14; // room for the first decade's label
  const plotX1 = width - valueW - 6;
  const height = top + rows.length * rowH + (rows.some((r) => r.separated) ? 8 : 0) + axisH;

  const all = rows.flatMap((r) => [r.max, r.mean, r.reference ?? 0]);
  if (options.tolerance) all.push(options.tolerance);
  const [lo, hi] = decades(all);
  const x = (v) => plotX0 + ((Math.log10(v) - lo) / (hi - lo)) * (plotX1 - plotX0);

  const svg = el("svg", {
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    class: "layer-chart",
    "aria-labelledby": "chart-title-" + options.id,
  });
  svg.append(el("title", { id: "chart-title-" + options.id }, options.title));
  const summary = rows.map((r) => `${r.label}: max ${formatSci(r.max)}, mean ${formatSci(r.mean)}`);
  svg.append(el("desc", {}, `Log scale. ${summary.join("; ")}.`));

  // Decade grid and axis labels.
  const grid = el("g", { class: "grid" });
  for (let d = lo; d <= hi; d++) {
    const gx = x(10 ** d);
    grid.append(el("line", { x1: gx, x2: gx, y1: top - 6, y2: height - axisH + 4 }));
    grid.append(el("text", { x: gx, y: height - axisH + 18, "text-anchor": "middle" }, `1e${d}`));
  }
  svg.append(grid);

  if (options.tolerance > 0) {
    const tx = x(options.tolerance);
    const tol = el("g", { class: "tolerance" });
    tol.append(el("line", { x1: tx, x2: tx, y1: top - 10, y2: height - axisH + 4 }));
    const label = `tolerance ${formatSci(options.tolerance)}`;
    const anchor = tx > (plotX0 + plotX1) / 2 ? "end" : "start";
    tol.append(el("text", { x: tx + (anchor === "end" ? -4 : 4), y: top - 12, "text-anchor": anchor }, label));
    svg.append(tol);
  }

  let y = top;
  for (const r of rows) {
    if (r.separated) {
      svg.append(el("line", { class: "separator", x1: 0, x2: width, y1: y + 4, y2: y + 4 }));
      y += 8;
    }
    const g = el("g", {
      class: "row",
      "data-key": r.key,
      "data-max-abs-diff": r.max,
      "data-mean-abs-diff": r.mean,
    });
    const barY = narrow ? y + 20 : y + 7;
    const barH = 14;
    const titleParts = [`${r.label}${r.detail ? ` (${r.detail})` : ""}`,
      `max |Δ| ${formatSci(r.max)}`, `mean |Δ| ${formatSci(r.mean)}`];
    if (r.reference !== undefined) titleParts.push(`${options.referenceLabel} ${formatSci(r.reference)}`);
    g.append(el("title", {}, titleParts.join(" · ")));

    const labelX = narrow ? plotX0 : labelW;
    const labelY = narrow ? y + 13 : barY + 11;
    const anchor = narrow ? "start" : "end";
    g.append(el("text", { class: "label", x: labelX, y: labelY, "text-anchor": anchor }, r.label));

    if (r.max > 0) {
      g.append(el("rect", { class: "bar", x: plotX0, y: barY, width: Math.max(x(r.max) - plotX0, 1), height: barH, rx: 2 }));
    }
    if (r.mean > 0) {
      g.append(el("rect", { class: "mean", x: x(r.mean) - 1.5, y: barY - 2, width: 3, height: barH + 4 }));
    }
    if (r.reference > 0) {
      const rx = x(r.reference);
      const cy = barY + barH / 2;
      g.append(el("path", { class: "reference", d: `M${rx} ${cy - 6} L${rx + 6} ${cy} L${rx} ${cy + 6} L${rx - 6} ${cy} Z` }));
    }
    const value = r.max > 0 ? formatSci(r.max) : "0 (exact)";
    g.append(el("text", { class: "value", x: width - 2, y: barY + 11, "text-anchor": "end" }, value));
    svg.append(g);
    y += rowH;
  }
  container.append(svg);
  return svg;
}

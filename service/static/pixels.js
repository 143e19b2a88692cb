// Image -> model-resolution pixels, the way bnfold/preprocess.py `image_to_tensor` does it
// before scaling and normalizing: composite transparency on black, convert to the bundle's
// color mode, resize with its Pillow filter. The page uses it to show what the model receives,
// and to turn a drawing into an image at the model's resolution (what is shown is what is sent).
//
// The integer arithmetic follows Pillow (libImaging/Resample.c, Convert.c) so the preview matches
// the server pixel for pixel on opaque images; tests/e2e/test_browser.py checks that against
// the service's own preprocessing. Transparent pixels may differ by one level: the browser keeps
// canvas pixels premultiplied by alpha.

const PRECISION_BITS = 22; // Resample.c: 32 bits - 8 for the value - 2 for overshoot
const ONE = 2 ** PRECISION_BITS;

function sinc(x) {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
}

// Pillow's convolution filters: weight(x) and support (half-width in source pixels at scale 1).
const FILTERS = {
  box: { support: 0.5, weight: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0) },
  bilinear: {
    support: 1,
    weight: (x) => {
      x = Math.abs(x);
      return x < 1 ? 1 - x : 0;
    },
  },
  bicubic: {
    support: 2,
    weight: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
  lanczos: {
    support: 3,
    weight: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0),
  },
};

export const RESAMPLE_FILTERS = ["nearest", ...Object.keys(FILTERS)];

// Fixed-point weights for each output position: {first, weights}. (precompute_coeffs)
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filter.support * filterScale;
  const rows = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const first = Math.max(Math.trunc(center - support + 0.5), 0);
    const count = Math.min(Math.trunc(center + support + 0.5), inSize) - first;
    const w = new Float64Array(count);
    let total = 0;
    for (let x = 0; x < count; x++) {
      w[x] = filter.weight((x + first - center + 0.5) / filterScale);
      total += w[x];
    }
    const weights = new Int32Array(count);
    for (let x = 0; x < count; x++) {
      const k = total !== 0 ? w[x] / total : w[x];
      weights[x] = Math.trunc(k < 0 ? -0.5 + k * ONE : 0.5 + k * ONE);
    }
    rows.push({ first, weights });
  }
  return rows;
}

function clip8(acc) {
  return Math.min(255, Math.max(0, Math.floor(acc / ONE)));
}

// One pass along x (stride 1) or y (stride = width) of a single-channel plane.
function resamplePass(src, width, height, outW, outH, horizontal, filter) {
  const out = new Uint8Array(outW * outH);
  const coeffs = coefficients(horizontal ? width : height, horizontal ? outW : outH, filter);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const { first, weights } = coeffs[horizontal ? x : y];
      let acc = ONE / 2;
      for (let i = 0; i < weights.length; i++) {
        const sx = horizontal ? first + i : x;
        const sy = horizontal ? y : first + i;
        acc += src[sy * width + sx] * weights[i];
      }
      out[y * outW + x] = clip8(acc);
    }
  }
  return out;
}

function resizeConvolution(plane, width, height, outW, outH, filter) {
  // Two passes, rounding to 8 bits in between. Pillow runs the vertical pass first when the
  // height shrinks by more than twice what the width does (Pillow >= 13), else horizontal first.
  const horizontal = (p, h) => resamplePass(p, width, h, outW, h, true, filter);
  const vertical = (p, w) => resamplePass(p, w, height, w, outH, false, filter);
  const needH = outW !== width;
  const needV = outH !== height;
  if (outH < height && height - outH > (width - outW) * 2) {
    const p = vertical(plane, width);
    return needH ? horizontal(p, outH) : p;
  }
  const p = needH ? horizontal(plane, height) : plane;
  return needV ? vertical(p, outW) : p;
}

function nearestIndices(inSize, outSize) {
  // Geometry.c ImagingScaleAffine: accumulate the source position in double, truncate.
  const step = inSize / outSize;
  const idx = new Int32Array(outSize);
  let pos = step * 0.5;
  for (let i = 0; i < outSize; i++) {
    idx[i] = Math.min(Math.trunc(pos), inSize - 1);
    pos += step;
  }
  return idx;
}

function resizeNearest(plane, width, height, outW, outH) {
  const xs = nearestIndices(width, outW);
  const ys = nearestIndices(height, outH);
  const out = new Uint8Array(outW * outH);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) out[y * outW + x] = plane[ys[y] * width + xs[x]];
  }
  return out;
}

// RGBA (as from getImageData) -> channel planes in the bundle's color mode.
function toPlanes(rgba, n, colorMode) {
  const r = new Uint8Array(n);
  const g = new Uint8Array(n);
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const a = rgba[4 * i + 3];
    // Transparent pixels are background: composite on black, as the service does.
    r[i] = a === 255 ? rgba[4 * i] : Math.round((rgba[4 * i] * a) / 255);
    g[i] = a === 255 ? rgba[4 * i + 1] : Math.round((rgba[4 * i + 1] * a) / 255);
    b[i] = a === 255 ? rgba[4 * i + 2] : Math.round((rgba[4 * i + 2] * a) / 255);
  }
  if (colorMode === "RGB") return [r, g, b];
  const gray = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    // Pillow's ITU-R 601-2 luma in 16-bit fixed point (Convert.c L24).
    gray[i] = (r[i] * 19595 + g[i] * 38470 + b[i] * 7471 + 0x8000) >>> 16;
  }
  return [gray];
}

/**
 * Pixels the model receives (before scale/mean/std) from RGBA pixels of any size.
 * Returns {width, height, planes: Uint8Array[]} with one plane per channel.
 */
export function toModelPixels(rgba, width, height, preprocess) {
  const { width: outW, height: outH, color_mode: colorMode, resample } = preprocess;
  let planes = toPlanes(rgba, width * height, colorMode);
  if (outW !== width || outH !== height) {
    if (resample === "nearest") {
      planes = planes.map((p) => resizeNearest(p, width, height, outW, outH));
    } else {
      const filter = FILTERS[resample];
      if (!filter) throw new Error(`unknown resample filter ${resample}`);
      planes = planes.map((p) => resizeConvolution(p, width, height, outW, outH, filter));
    }
  }
  return { width: outW, height: outH, planes };
}

/** Channel planes -> opaque RGBA ImageData, for drawing on a canvas. */
export function planesToImageData(pixels) {
  const { width, height, planes } = pixels;
  const data = new ImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    data.data[4 * i] = planes[0][i];
    data.data[4 * i + 1] = planes[planes.length === 3 ? 1 : 0][i];
    data.data[4 * i + 2] = planes[planes.length === 3 ? 2 : 0][i];
    data.data[4 * i + 3] = 255;
  }
  return data;
}

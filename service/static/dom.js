// Two small helpers the page's modules share: building elements, and calling the API.

/** Create an element: h("li", {class: "x", "data-k": 1}, child, "text", [more]). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

export class ApiError extends Error {}

/** fetch + JSON; a non-2xx answer throws with the API's own {"error": ...} message. */
export async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(`The server could not be reached (${err.message}).`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: handled below
  }
  if (!response.ok) {
    const message = body && typeof body.error === "string" ? body.error : text.trim();
    throw new ApiError(message || `HTTP ${response.status} ${response.statusText}`);
  }
  if (body === null) throw new ApiError(`${path} did not answer JSON.`);
  return body;
}

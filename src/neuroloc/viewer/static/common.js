// Shared helpers of the viewer's pages. Every piece of data goes into the page as text (textContent),
// never as HTML, so names from the results or from the user cannot inject markup.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return body;
}

function fmt(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toFixed(digits);
}

function pct(value) {
  if (value === null || value === undefined) return "–";
  return `${(100 * value).toFixed(1)}%`;
}

// Absolutely positioned box on a picture, in % of the original image size (so it fits any display size).
function boxDiv(box, width, height, kind, label) {
  const [x0, y0, x1, y1] = box;
  const div = el("div", { class: `box ${kind}` });
  div.style.left = `${(100 * x0) / width}%`;
  div.style.top = `${(100 * y0) / height}%`;
  div.style.width = `${(100 * Math.max(0, x1 - x0)) / width}%`;
  div.style.height = `${(100 * Math.max(0, y1 - y0)) / height}%`;
  if (label) div.append(el("span", { class: "box-label", text: label }));
  return div;
}

// A dot at a point (where the class's votes peak), in % of the original image size like boxDiv.
function pointDiv(point, width, height, kind) {
  const div = el("div", { class: `point ${kind}`, title: "where the class's votes peak" });
  div.style.left = `${(100 * point[0]) / width}%`;
  div.style.top = `${(100 * point[1]) / height}%`;
  return div;
}

function setAspect(node, width, height) {
  if (width && height) node.style.aspectRatio = `${width} / ${height}`;
}

async function uploadFile(file, statusNode, extraParams) {
  const info = window.viewerInfo || (await api("/api/info"));
  if (file.size > info.max_upload_bytes) {
    statusNode.textContent = `${file.name}: ${file.size.toLocaleString()} bytes is over the upload limit of ${info.max_upload_bytes.toLocaleString()}`;
    statusNode.className = "status error";
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  for (const [key, value] of Object.entries(extraParams || {})) if (value !== "" && value !== null) form.append(key, value);
  statusNode.textContent = `Localizing ${file.name}… (the first run loads the model)`;
  statusNode.className = "status busy";
  try {
    const result = await api("/api/upload", { method: "POST", body: form, headers: { "X-Neuroloc": "1" } });
    window.location.href = result.url;
  } catch (err) {
    statusNode.textContent = `Upload refused: ${err.message}`;
    statusNode.className = "status error";
  }
}

// Drop an image anywhere on the page, or pick one with the file input, to localize it.
function setupUpload(input, statusNode, paramsFn) {
  input.addEventListener("change", () => { if (input.files.length) uploadFile(input.files[0], statusNode, paramsFn && paramsFn()); });
  const overlay = el("div", { class: "drop-overlay", text: "Drop an image to localize it" });
  overlay.hidden = true;
  document.body.append(overlay);
  let depth = 0;
  window.addEventListener("dragenter", (e) => { if (e.dataTransfer && [...e.dataTransfer.types].includes("Files")) { depth++; overlay.hidden = false; e.preventDefault(); } });
  window.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) overlay.hidden = true; });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    const files = e.dataTransfer ? e.dataTransfer.files : [];
    if (files.length) uploadFile(files[0], statusNode, paramsFn && paramsFn());
  });
}

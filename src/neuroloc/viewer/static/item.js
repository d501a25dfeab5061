// One image: the recorded result, and the result recomputed by the server for any class and settings.
"use strict";

const itemId = parseInt(location.pathname.split("/").pop(), 10);
let item = null;
let info = null;
let current = null;   // the last computed result
let computeNumber = 0;
let overlayChosen = false;  // until the user picks an overlay, the page picks one per result

function knobsForm() { return document.getElementById("knobs"); }

function knobParams() {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(knobsForm())) if (String(value).trim() !== "") params.set(key, String(value).trim());
  return params;
}

function setKnobs(values) {
  for (const field of knobsForm().elements) {
    if (!field.name) continue;
    field.value = values[field.name] === undefined || values[field.name] === null ? "" : values[field.name];
  }
  if (!knobsForm().elements.preset.value) knobsForm().elements.preset.value = "default";
  showPresetValues();
}

// Empty fields mean "the preset's value": show that value as the placeholder.
function showPresetValues() {
  const preset = info.presets[knobsForm().elements.preset.value] || {};
  for (const name of ["kmax", "k", "percentile", "level", "similarity"]) knobsForm().elements[name].placeholder = preset[name];
  knobsForm().elements.layer.placeholder = preset.layer || "model's default";
  knobsForm().elements.mode.options[0].textContent = `preset's (${preset.mode})`;
  knobsForm().elements.rescoring.options[0].textContent = `preset's (${preset.rescoring})`;
  knobsForm().elements.refine.options[0].textContent = `preset's (${preset.refine})`;
}

function drawBoxes() {
  const boxes = document.getElementById("boxes");
  boxes.replaceChildren();
  const w = item.width || (current && current.result.width);
  const h = item.height || (current && current.result.height);
  if (!w || !h) return;
  if (document.getElementById("show-gt").checked) for (const truth of item.gt) boxes.append(boxDiv(truth, w, h, "gt", "ground truth"));
  if (document.getElementById("show-recorded").checked) {
    for (const pred of item.boxes) {
      boxes.append(boxDiv(pred.box, w, h, "pred", pred.name || ""));
      if (pred.point) boxes.append(pointDiv(pred.point, w, h, "pred"));
    }
  }
  if (current && document.getElementById("show-new").checked) {
    const r = current.result;
    boxes.append(boxDiv(r.box, r.width, r.height, "new", `${r.short_name} ${pct(r.probability)}`));
    if (r.point) boxes.append(pointDiv(r.point, r.width, r.height, "new"));
  }
}

function drawOverlay() {
  const overlay = document.getElementById("overlay");
  const kind = document.getElementById("overlay-kind").value;
  const url = current && kind !== "none" ? current.pictures[kind] : null;
  overlay.hidden = !url;
  if (url) overlay.src = url;
}

function factsTable(node, rows) {
  node.replaceChildren(...rows.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", {}, v instanceof Node ? v : String(v)))));
}

// "62.0% (stability 80.0% · concentration 45.0% · agreement –)": the parts of a confidence, when written.
function confidenceParts(parts) {
  if (!parts || typeof parts !== "object") return null;
  return ["stability", "concentration", "agreement"].map((name) => `${name} ${pct(parts[name])}`).join(" · ");
}

function showItem() {
  document.title = `neuroloc view: ${item.name}`;
  document.getElementById("title").textContent = item.name;
  if (item.source !== "upload") document.getElementById("back").href = `/?source=${encodeURIComponent(item.source)}`;
  const stage = document.getElementById("stage");
  setAspect(stage, item.width, item.height);
  if (item.width && item.height) stage.style.maxWidth = `calc(80vh * ${item.width / item.height})`;  // tall images fit the screen
  const picture = document.getElementById("picture");
  picture.src = `/api/items/${item.id}/thumb?size=1280`;
  picture.addEventListener("error", () => stage.classList.add("missing"));
  const record = item.record || {};
  const first = (record.predictions || [])[0] || {};
  factsTable(document.getElementById("record"), [
    ["image", item.image],
    ["results", item.source],
    ["size", item.width && item.height ? `${item.width} × ${item.height}` : null],
    ["model", record.model],
    ["class in the results", first.name ? `${first.name} (${first.label})` : null],
    ["score", item.score !== null ? pct(item.score) : null],
    ["confidence", item.confidence !== null && item.confidence !== undefined ? pct(item.confidence) : null],
    ["confidence parts", confidenceParts(first.confidence_parts)],
    ["box", Array.isArray(first.box) ? first.box.map((v) => fmt(v, 1)).join(", ") : null],
    ["IoU with ground truth", item.iou !== null ? fmt(item.iou, 3) : null],
    ["top-1 class correct", item.correct === null ? null : (item.correct ? "yes" : "no")],
    ["error", item.error],
    ["image file", item.image_found ? null : "not found: only the recorded boxes can be shown"],
  ]);
  document.getElementById("show-gt").closest("label").hidden = !item.gt.length;
  document.getElementById("show-recorded").closest("label").hidden = !item.boxes.length;
  drawBoxes();
}

function showResult(data) {
  current = data;
  const r = data.result;
  const top5 = document.getElementById("top5");
  top5.replaceChildren(el("span", { class: "muted", text: "top-5:" }), ...r.top5.map((c) =>
    el("button", { type: "button", class: `chip${c.label === r.label ? " active" : ""}`, title: `${c.synset} (${c.label})`,
      onclick: () => { document.getElementById("cls").value = String(c.label); compute(); } }, `${c.name} ${pct(c.probability)}`)));
  factsTable(document.getElementById("summary"), [
    ["class", `${r.name} (${r.label}, ${r.synset})`],
    ["probability", pct(r.probability)],
    ["confidence", r.confidence !== null && r.confidence !== undefined ? pct(r.confidence) : null],
    ["confidence parts", confidenceParts(r.confidence_parts)],
    ["box", r.box.map((v) => fmt(v, 1)).join(", ") + (r.empty ? " (no region: whole image)" : "")],
    ["mode", r.mode],
    ["layer", r.layer],
    ["settings", Object.entries(r.config).filter(([k, v]) => v !== null && ["kmax", "k", "percentile", "level", "similarity", "rescoring", "morphology", "score", "density_layers", "refine"].includes(k))
      .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("+") : v}`).join(" · ")],
    ["feature directions", r.directions ? r.directions : (r.mode === "density" ? "none: no objectness map" : null)],
    ["model", r.model],
  ]);
  const overlayKind = document.getElementById("overlay-kind");
  overlayKind.options[2].disabled = !data.pictures.density;
  if (!overlayChosen) overlayKind.value = data.pictures.density ? "density" : "mask";  // the most telling one
  if (!data.pictures.density && overlayKind.value === "density") overlayKind.value = "mask";
  drawOverlay();
  drawBoxes();
  showNeurons(data);
}

function showNeurons(data) {
  const r = data.result;
  const keptMeans = r.mode === "density" ? "inside the region" : "blob in the union";
  document.getElementById("neurons-note").textContent = `${r.layer}; kept = ${keptMeans}`;
  const head = el("tr", {}, ...["#", "channel", "y", "x", "DAM score", "re-scoring score", "blob share", "kept"].map((t) => el("th", { text: t })));
  const rows = r.neurons.map((n, j) => el("tr", { class: n.kept ? "kept" : "" },
    el("td", { text: j + 1 }), el("td", { text: n.channel }), el("td", { text: n.y }), el("td", { text: n.x }),
    el("td", { text: n.dam_score.toPrecision(3) }), el("td", { text: n.region_score === null ? "–" : n.region_score.toPrecision(3) }),
    el("td", { text: pct(n.blob_fraction) }), el("td", { text: n.kept ? "yes" : "no" })));
  document.getElementById("neurons").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  const grid = document.getElementById("neuron-grid");
  grid.replaceChildren(...r.neurons.map((n, j) => {
    const pics = el("div", { class: "pair" });
    if (data.pictures.maps[j]) {
      const a = el("div", { class: "pic" }); setAspect(a, r.width, r.height);
      a.append(el("img", { src: data.pictures.maps[j], alt: `guided-backprop map of neuron ${j + 1}`, title: "guided backprop: red positive, blue negative" }));
      const b = el("div", { class: "pic" }); setAspect(b, r.width, r.height);
      b.append(el("img", { src: data.pictures.blobs[j], alt: `blob of neuron ${j + 1}`, title: "blob" }));
      pics.append(a, b);
    }
    return el("div", { class: `card neuron${n.kept ? " kept" : ""}` }, pics,
      el("div", { class: "caption" },
        el("div", { class: "name", text: `#${j + 1} ch${n.channel} (${n.y},${n.x})${n.kept ? " · kept" : ""}` }),
        el("div", { class: "muted", text: `DAM ${n.dam_score.toPrecision(3)}` + (n.region_score === null ? "" : ` · re-score ${n.region_score.toPrecision(3)}`) })));
  }));
}

let computing = null;  // the AbortController of the request in flight: a new one cancels it

async function compute() {
  const params = knobParams();
  history.replaceState(null, "", `?${params}`);
  const status = document.getElementById("compute-status");
  const mine = ++computeNumber;
  status.textContent = "Computing… (the first run loads the model)";
  status.className = "status busy";
  if (computing) computing.abort();
  computing = new AbortController();
  try {
    const data = await api(`/api/items/${itemId}/explain?${params}`, { signal: computing.signal });
    if (mine !== computeNumber) return;
    status.textContent = "";
    status.className = "status";
    showResult(data);
  } catch (err) {
    if (mine !== computeNumber) return;
    status.textContent = err.message;
    status.className = "status error";
  }
}

async function suggestClasses() {
  const text = document.getElementById("cls").value.trim();
  if (text.length < 2) return;
  const found = await api(`/api/classes?q=${encodeURIComponent(text)}`);
  document.getElementById("class-list").replaceChildren(...found.classes.map((c) => el("option", { value: c.name }, `${c.label} ${c.synset}`)));
}

async function start() {
  info = await api("/api/info");
  window.viewerInfo = info;
  const preset = document.getElementById("preset");
  preset.replaceChildren(...Object.keys(info.presets).map((name) => el("option", { value: name }, name)));
  item = await api(`/api/items/${itemId}`);
  showItem();
  const params = new URLSearchParams(location.search);
  const initial = [...params.keys()].length ? Object.fromEntries(params) : item.suggested_knobs;
  setKnobs(initial);
  const beyond = Object.entries(item.settings_beyond_knobs || {});
  if (beyond.length) {
    document.getElementById("knobs-note").textContent = "The evaluated method also set " +
      beyond.map(([name, value]) => `${name} = ${value}`).join(", ") +
      ", which these settings cannot give: a recomputed box can differ from the recorded one.";
  }
  knobsForm().elements.preset.addEventListener("change", showPresetValues);
  knobsForm().addEventListener("submit", (e) => { e.preventDefault(); compute(); });
  document.getElementById("reset").addEventListener("click", () => { setKnobs(item.suggested_knobs); compute(); });
  let typing = null;
  document.getElementById("cls").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(() => suggestClasses().catch(() => {}), 250); });
  for (const id of ["show-recorded", "show-gt", "show-new"]) document.getElementById(id).addEventListener("change", drawBoxes);
  document.getElementById("overlay-kind").addEventListener("change", () => { overlayChosen = true; drawOverlay(); });
  // a new picture gets this page's knobs but not its class: it is localized for its own top-1 class
  setupUpload(document.getElementById("file"), document.getElementById("upload-status"), () => {
    const params = Object.fromEntries(knobParams());
    delete params.cls;
    return params;
  });
  if (item.image_found) compute();
  else {
    const status = document.getElementById("compute-status");
    status.textContent = "The image file is not found, so nothing can be recomputed.";
    status.className = "status error";
  }
}

document.addEventListener("DOMContentLoaded", () => start().catch((err) => {
  const status = document.getElementById("compute-status");
  status.textContent = err.message;
  status.className = "status error";
}));

// The gallery: pages of results fetched from /api/items (the server sorts, filters and pages).
"use strict";

const form = () => document.getElementById("controls");
let info = null;
let offset = 0;
let requestNumber = 0;

function formParams() {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(form())) if (value !== "") params.set(key, value);
  return params;
}

function restoreForm(params) {
  for (const field of form().elements) {
    if (field.name && params.has(field.name)) field.value = params.get(field.name);
  }
  offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
}

function card(item, size) {
  const pic = el("div", { class: "pic" });
  setAspect(pic, item.width, item.height);
  if (item.width && item.height) {
    const img = el("img", { src: `/api/items/${item.id}/thumb?size=${size}`, loading: "lazy", alt: item.name });
    img.addEventListener("error", () => { img.remove(); pic.classList.add("missing"); });
    pic.append(img);
  } else {
    pic.classList.add("missing");
  }
  if (item.width && item.height) {
    for (const truth of item.gt) pic.append(boxDiv(truth, item.width, item.height, "gt"));
    for (const pred of item.boxes) {
      pic.append(boxDiv(pred.box, item.width, item.height, "pred"));
      if (pred.point) pic.append(pointDiv(pred.point, item.width, item.height, "pred"));
    }
  }
  const badges = el("div", { class: "badges" });
  if (item.score !== null) badges.append(el("span", { class: "badge", title: "class probability", text: pct(item.score) }));
  if (item.confidence !== null && item.confidence !== undefined) {
    badges.append(el("span", { class: "badge confidence", title: "localization confidence: how far to trust the box", text: `conf ${pct(item.confidence)}` }));
  }
  if (item.iou !== null) badges.append(el("span", { class: `badge ${item.iou >= 0.5 ? "good" : "bad"}`, title: "IoU with the ground truth", text: `IoU ${fmt(item.iou)}` }));
  if (item.correct === false) badges.append(el("span", { class: "badge bad", title: "the top-1 class is not the ground truth", text: "wrong class" }));
  if (item.empty) badges.append(el("span", { class: "badge warn", text: "empty" }));
  const caption = el("div", { class: "caption" },
    el("div", { class: "name", title: item.image, text: item.name }),
    item.error ? el("div", { class: "error", text: item.error }) : el("div", { class: "class", text: item.class || "–" }),
    badges);
  return el("a", { class: `card${item.error ? " failed" : ""}`, href: `/item/${item.id}` }, pic, caption);
}

function pager(node, total, limit) {
  node.replaceChildren();
  const last = Math.max(0, Math.ceil(total / limit) - 1) * limit;
  const go = (to) => () => { offset = Math.min(Math.max(0, to), last); load(); window.scrollTo(0, 0); };
  const shown = total ? `${(offset + 1).toLocaleString()}–${Math.min(total, offset + limit).toLocaleString()} of ${total.toLocaleString()}` : "no results";
  node.append(
    el("button", { type: "button", onclick: go(0), disabled: offset === 0 }, "« first"),
    el("button", { type: "button", onclick: go(offset - limit), disabled: offset === 0 }, "‹ previous"),
    el("span", { class: "count", text: shown }),
    el("button", { type: "button", onclick: go(offset + limit), disabled: offset + limit >= total }, "next ›"),
    el("button", { type: "button", onclick: go(last), disabled: offset + limit >= total }, "last »"));
}

async function load() {
  const params = formParams();
  params.set("offset", offset);
  history.replaceState(null, "", `?${params}`);
  const mine = ++requestNumber;
  const gallery = document.getElementById("gallery");
  gallery.classList.add("loading");
  try {
    const page = await api(`/api/items?${params}`);
    if (mine !== requestNumber) return;
    if (page.total && offset >= page.total) { offset = Math.floor((page.total - 1) / page.limit) * page.limit; return load(); }
    gallery.replaceChildren(...page.items.map((item) => card(item, 320)));
    if (!page.items.length) gallery.append(el("p", { class: "muted", text: "Nothing matches these filters." }));
    pager(document.getElementById("pager-top"), page.total, page.limit);
    pager(document.getElementById("pager-bottom"), page.total, page.limit);
  } catch (err) {
    gallery.replaceChildren(el("p", { class: "status error", text: err.message }));
  } finally {
    gallery.classList.remove("loading");
  }
}

async function loadSummary(source) {
  const summary = await api(`/api/summary?source=${encodeURIComponent(source)}`);
  const select = document.getElementById("label");
  const wanted = select.value;
  select.replaceChildren(el("option", { value: "" }, `all classes (${summary.classes.length})`),
    ...summary.classes.map((c) => el("option", { value: c.label }, `${c.name} (${c.count})`)));
  select.value = wanted;
  if (select.value !== wanted) select.value = "";
  document.querySelector(".score-filter").hidden = !summary.has_score;
  document.querySelector(".iou-filter").hidden = !summary.has_iou;
  document.querySelector(".confidence-filter").hidden = !summary.has_confidence;
  for (const node of document.querySelectorAll(".confidence-sort")) node.hidden = !summary.has_confidence;
  for (const option of document.getElementById("status-filter").options) {
    if (["miss", "hit"].includes(option.value)) option.hidden = !summary.has_iou;
    if (option.value === "wrong_class") option.hidden = !summary.wrong_class;
  }
  if (info.mode === "evaluation" && source !== "upload") loadCases(source);
}

async function loadMetrics() {
  const metrics = await api("/api/metrics");
  const run = metrics.run || {};
  document.getElementById("run").textContent =
    Object.entries(run).map(([key, value]) => `${key}: ${value}`).join(" · ");
  const table = document.getElementById("metrics");
  const head = el("tr", {}, el("th", { text: "method" }), ...metrics.columns.map(([, title]) => el("th", { text: title })));
  const rows = Object.entries(metrics.methods).map(([name, row]) => el("tr", {},
    el("th", {}, el("a", { href: `?source=${encodeURIComponent(name)}`, text: name })),
    ...metrics.columns.map(([key]) => {
      const value = row[key];
      const text = value === null || value === undefined ? "–"
        : (key === "mean_iou" || key === "seconds_per_image") ? fmt(value, 3) : fmt(value, 1);
      return el("td", { text });
    })));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  const plots = document.getElementById("plots");
  plots.replaceChildren(...metrics.plots.map((url) => el("a", { href: url, target: "_blank", rel: "noopener" }, el("img", { src: url, alt: url.split("/").pop() }))));
  const links = [[metrics.report, "report.md"], [metrics.per_class, "per_class.csv (every class)"]]
    .filter(([href]) => href)
    .map(([href, text]) => el("a", { href, target: "_blank", rel: "noopener", text }));
  document.getElementById("report-link").replaceChildren(...links.flatMap((a, i) => (i ? [" · ", a] : [a])));
}

async function loadCases(source) {
  const cases = await api(`/api/cases?source=${encodeURIComponent(source)}&n=8`);
  document.getElementById("cases-source").textContent = `(${source})`;
  document.getElementById("best").replaceChildren(...cases.best.map((item) => card(item, 320)));
  document.getElementById("worst").replaceChildren(...cases.worst.map((item) => card(item, 320)));
}

async function start() {
  info = await api("/api/info");
  window.viewerInfo = info;
  document.getElementById("results").textContent = info.results + (info.dataset ? ` · ground truth: ${info.dataset}` : "");
  document.getElementById("warnings").replaceChildren(...info.warnings.map((w) => el("li", { text: w })));
  const source = document.getElementById("source");
  source.replaceChildren(...info.sources.map((s) => el("option", { value: s.name }, `${s.name} (${s.count.toLocaleString()})`)));
  source.value = info.default_source;
  const params = new URLSearchParams(location.search);
  restoreForm(params);
  if (!info.sources.some((s) => s.name === source.value)) source.value = info.default_source;
  source.closest("label").hidden = info.sources.length < 2;
  if (info.mode === "evaluation") {
    document.getElementById("evaluation").hidden = false;
    loadMetrics().catch((err) => document.getElementById("run").replaceChildren(el("span", { class: "error", text: err.message })));
  }
  await loadSummary(source.value);
  restoreForm(params);  // the class list exists now
  form().addEventListener("change", async (event) => {
    offset = 0;
    if (event.target.name === "source") { document.getElementById("label").value = ""; await loadSummary(source.value); }
    load();
  });
  form().addEventListener("submit", (event) => { event.preventDefault(); offset = 0; load(); });
  document.getElementById("review").addEventListener("click", () => {
    form().elements.sort.value = "confidence";
    form().elements.order.value = "asc";  // the least confident first: the boxes most worth checking
    offset = 0;
    load();
  });
  let typing = null;
  form().elements.q.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(() => { offset = 0; load(); }, 300); });
  setupUpload(document.getElementById("file"), document.getElementById("upload-status"));
  load();
}

document.addEventListener("DOMContentLoaded", () => start().catch((err) => {
  document.getElementById("gallery").replaceChildren(el("p", { class: "status error", text: err.message }));
}));

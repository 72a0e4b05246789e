// MLSAE explorer page: vanilla JS over the JSON API (/openapi.json). The URL holds the state:
// /prompt/<text>?pos=..&layer=..&latent=..&factor=..&mode=..&threshold=..&agg=token|sum
"use strict";

const state = {
  info: null,
  prompt: "",
  result: null, // /api/prompt response
  pos: null,
  layer: null,
  latent: null,
  factor: 2,
  mode: "scale",
  threshold: 0.001,
  agg: "token",
  normalise: true,
};

// ----- helpers ------------------------------------------------------------------------------
function heatColour(t) {
  // white -> dark blue
  t = Math.max(0, Math.min(1, t));
  const r = Math.round(255 - t * (255 - 16));
  const g = Math.round(255 - t * (255 - 60));
  const b = Math.round(255 - t * (255 - 150));
  return `rgb(${r},${g},${b})`;
}

// Ignore responses of superseded requests, per view.
const tickets = {};
function ticket(view) {
  tickets[view] = (tickets[view] || 0) + 1;
  const mine = tickets[view];
  return () => tickets[view] === mine;
}

// ----- URL state ----------------------------------------------------------------------------
function readURL() {
  const path = window.location.pathname;
  const m = path.match(/^\/prompt\/(.*)$/s);
  let prompt = "";
  if (m) {
    try {
      prompt = decodeURIComponent(m[1]);
    } catch (e) {
      prompt = m[1];
    }
  }
  const q = new URLSearchParams(window.location.search);
  const int = (k) => (q.has(k) && /^\d+$/.test(q.get(k)) ? parseInt(q.get(k), 10) : null);
  const num = (k, d) => (q.has(k) && isFinite(parseFloat(q.get(k))) ? parseFloat(q.get(k)) : d);
  state.prompt = prompt;
  state.pos = int("pos");
  state.layer = int("layer");
  state.latent = int("latent");
  state.factor = num("factor", 2);
  state.mode = q.get("mode") === "add" ? "add" : "scale";
  state.threshold = Math.max(0, num("threshold", 0.001));
  state.agg = q.get("agg") === "sum" ? "sum" : "token";
  state.normalise = q.get("norm") !== "0";
}

function writeURL(push) {
  if (!state.prompt) return;
  const q = new URLSearchParams();
  if (state.pos !== null) q.set("pos", state.pos);
  if (state.layer !== null) q.set("layer", state.layer);
  if (state.latent !== null) q.set("latent", state.latent);
  q.set("factor", state.factor);
  q.set("mode", state.mode);
  q.set("threshold", state.threshold);
  q.set("agg", state.agg);
  if (!state.normalise) q.set("norm", "0");
  const url = `/prompt/${encodeURIComponent(state.prompt)}?${q.toString()}`;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

function syncControls() {
  $("#prompt").value = state.prompt;
  if (state.layer !== null) $("#layer").value = String(state.layer);
  $("#latent").value = state.latent === null ? "" : String(state.latent);
  $("#factor").value = String(state.factor);
  $("#factor-range").value = String(Math.max(-10, Math.min(10, state.factor)));
  $("#mode").value = state.mode;
  $("#threshold").value = String(state.threshold);
  $("#normalise").checked = state.normalise;
  for (const r of document.querySelectorAll('input[name="agg"]')) r.checked = r.value === state.agg;
}

// ----- loading ------------------------------------------------------------------------------
async function loadInfo() {
  const info = await api("GET", "/api/info");
  state.info = info;
  const s = info.sae;
  $("#model-info").textContent =
    `${info.model_name} · ${s.n_latents} latents (×${s.expansion_factor}), k=${s.k} · ` +
    `layers ${s.layers[0]}–${s.layers[s.layers.length - 1]} (${s.layers.length}) · ` +
    (info.examples.available ? `${info.examples.rows} examples` : "no examples");
  const sel = $("#layer");
  sel.textContent = "";
  for (const l of s.layers) sel.appendChild(el("option", { value: String(l) }, String(l)));
  $("#latent").max = String(s.n_latents - 1);
  bindLatentSearch(s.n_latents);
  $("#prompt").maxLength = info.limits.max_prompt_chars;
  const f = info.limits.max_factor;
  $("#factor").min = String(-f);
  $("#factor").max = String(f);
}

async function analyse(push) {
  const prompt = state.prompt;
  if (!prompt.trim()) {
    showError("Type a prompt first.");
    return;
  }
  const fresh = ticket("prompt");
  let res;
  try {
    res = await api("POST", "/api/prompt", { prompt });
  } catch (e) {
    if (fresh()) {
      showError(e.message);
      $("#views").hidden = true;
    }
    return;
  }
  if (!fresh()) return;
  showError(null);
  state.result = res;
  const layers = state.info.sae.layers;
  if (state.pos === null || state.pos >= res.n_tokens) state.pos = res.n_tokens - 1;
  if (state.layer === null || !layers.includes(state.layer)) {
    state.layer = layers[Math.floor(layers.length / 2)];
  }
  if (state.latent !== null && state.latent >= state.info.sae.n_latents) state.latent = null;
  syncControls();
  writeURL(push);
  $("#views").hidden = false;
  renderMetrics();
  refreshAll();
}

function refreshAll() {
  renderTokens(null);
  renderSelection();
  loadHeatmap();
  loadHistograms();
  loadActivations();
  loadExamples();
  loadLogits();
}

function renderSelection() {
  const r = state.result;
  if (!r) return;
  const tok = showToken(r.tokens[state.pos]);
  const box = $("#selection");
  box.textContent = `position ${state.pos} “${tok}” · layer ${state.layer} · `;
  if (state.latent === null) box.append("no latent selected (click a heatmap cell)");
  else box.append(latentLink(state.latent, `latent ${state.latent} (its page)`));
}

// ----- tokens -------------------------------------------------------------------------------
function renderTokens(acts) {
  const r = state.result;
  const box = $("#tokens");
  box.textContent = "";
  const values = acts ? acts.values : null;
  const max = acts ? acts.max_value : 0;
  r.tokens.forEach((t, i) => {
    const span = el("span", { class: "token", "data-pos": String(i) }, showToken(t));
    if (r.special[i]) span.classList.add("special");
    if (i === state.pos) span.classList.add("selected");
    const v = values ? values[i] : null;
    span.style.background = actColour(v, max);
    span.title = `position ${i}, id ${r.token_ids[i]}` + (values ? `, activation ${fmt(v)}` : "");
    span.addEventListener("click", () => selectPosition(i));
    box.appendChild(span);
  });
  $("#tokens-legend").textContent = acts
    ? `shaded by latent ${acts.latent} at layer ${acts.layer} (max on this prompt at any layer: ${fmt(max)}); click a token to select it`
    : "click a token to select it; select a latent to shade the tokens by its activation";
}

async function loadActivations() {
  if (state.latent === null) return renderTokens(null);
  const fresh = ticket("acts");
  try {
    const acts = await api("POST", "/api/activations", {
      prompt: state.prompt, latent: state.latent, layer: state.layer,
    });
    if (fresh()) renderTokens(acts);
  } catch (e) {
    if (fresh()) showError(e.message);
  }
}

// ----- heatmap ------------------------------------------------------------------------------
async function loadHeatmap() {
  const fresh = ticket("heatmap");
  const body = { prompt: state.prompt, threshold: state.threshold };
  if (state.agg === "token") body.position = state.pos;
  try {
    const hm = await api("POST", "/api/heatmap", body);
    if (fresh()) renderHeatmap(hm);
  } catch (e) {
    if (fresh()) showError(e.message);
  }
}

function renderHeatmap(hm) {
  const box = $("#heatmap");
  box.textContent = "";
  const links = $("#heatmap-links");
  links.textContent = "";
  if (hm.latents.length) links.append("latent pages: ");
  for (const j of hm.latents) links.append(latentLink(j), " ");
  const m = hm.latents.length;
  const where = hm.position === null ? "summed over tokens" : `at position ${hm.position}`;
  let note = `${m} latents ${where} with a value ≥ ${hm.threshold}, sorted by mean layer`;
  if (hm.truncated) note += ` (the ${m} largest of ${hm.n_above_threshold})`;
  note += ". Click a cell to select its latent and layer.";
  $("#heatmap-note").textContent = note;
  if (m === 0) {
    box.appendChild(el("div", { class: "muted" }, "no latent above the threshold"));
    return;
  }
  const L = hm.layers.length;
  const cw = Math.max(5, Math.min(22, Math.floor(1100 / m)));
  const ch = Math.max(8, Math.min(18, Math.floor(360 / L)));
  const left = 54, top = 6, bottom = 42;
  const width = left + cw * m + 10, height = top + ch * L + bottom;
  const s = svg("svg", { width, height, role: "img", "aria-label": "latents by layers heatmap" });
  const grid = state.normalise ? hm.share : hm.values;
  const gmax = state.normalise ? 1 : hm.max_value || 1;
  for (let li = 0; li < L; li++) {
    const label = svg("text", { x: left - 6, y: top + li * ch + ch * 0.75, "text-anchor": "end", "font-size": Math.min(11, ch) });
    label.textContent = `L${hm.layers[li]}`;
    s.appendChild(label);
    for (let j = 0; j < m; j++) {
      const v = grid[li][j] || 0;
      const raw = hm.values[li][j] || 0;
      const rect = svg("rect", {
        x: left + j * cw, y: top + li * ch, width: cw - 1, height: ch - 1,
        fill: heatColour(v / gmax), class: "cell",
        "data-latent": String(hm.latents[j]), "data-layer": String(hm.layers[li]),
      });
      if (hm.latents[j] === state.latent && hm.layers[li] === state.layer) rect.classList.add("selected");
      const t = svg("title");
      t.textContent = `latent ${hm.latents[j]}, layer ${hm.layers[li]}: ${fmt(raw)} (share ${fmt(hm.share[li][j] || 0)}); mean layer ${fmt(hm.layer_mean[j], 2)}`;
      rect.appendChild(t);
      rect.addEventListener("click", () => selectCell(hm.latents[j], hm.layers[li]));
      s.appendChild(rect);
    }
  }
  const every = Math.max(1, Math.ceil(14 / cw));
  for (let j = 0; j < m; j += every) {
    const x = left + j * cw + cw / 2, y = top + L * ch + 6;
    const t = svg("text", { x, y, "font-size": 10, transform: `rotate(60 ${x} ${y})` });
    t.textContent = String(hm.latents[j]);
    s.appendChild(t);
  }
  box.appendChild(s);
}

// ----- histograms ---------------------------------------------------------------------------
async function loadHistograms() {
  const fresh = ticket("hist");
  try {
    const h = await api("POST", "/api/histograms", { prompt: state.prompt, bins: 20 });
    if (fresh()) renderHistograms(h);
  } catch (e) {
    if (fresh()) showError(e.message);
  }
}

function renderHistograms(h) {
  const box = $("#histograms");
  box.textContent = "";
  const W = 150, H = 56, B = h.edges.length - 1;
  let cmax = 1;
  for (const c of h.counts) for (const v of c) cmax = Math.max(cmax, v);
  const lmax = Math.log1p(cmax);
  h.layers.forEach((layer, li) => {
    const wrap = el("div", { class: "hist", "data-layer": String(layer) });
    if (layer === state.layer) wrap.classList.add("selected");
    wrap.appendChild(el("div", null, `layer ${layer} · ${h.n_active[li]} active`));
    const s = svg("svg", { width: W, height: H });
    const bw = W / B;
    h.counts[li].forEach((c, b) => {
      if (!c) return;
      const bh = Math.max(1, (Math.log1p(c) / lmax) * (H - 2));
      const r = svg("rect", { x: b * bw, y: H - bh, width: Math.max(1, bw - 1), height: bh, fill: "#6b8fd6" });
      const t = svg("title");
      t.textContent = `${fmt(h.edges[b])}–${fmt(h.edges[b + 1])}: ${c}`;
      r.appendChild(t);
      s.appendChild(r);
    });
    wrap.appendChild(s);
    wrap.title = `latent values at layer ${layer} over all tokens (log count); x from 0 to ${fmt(h.edges[B])}`;
    box.appendChild(wrap);
  });
}

// ----- examples -----------------------------------------------------------------------------
async function loadExamples() {
  const box = $("#examples");
  if (state.latent === null) {
    box.textContent = "";
    box.appendChild(el("div", { class: "muted" }, "Select a latent (click a heatmap cell)."));
    return;
  }
  const fresh = ticket("examples");
  try {
    const q = new URLSearchParams({ latent: state.latent, layer: state.layer, limit: 16 });
    const ex = await api("GET", `/api/examples?${q}`);
    if (fresh()) renderExamples(ex);
  } catch (e) {
    if (fresh()) showError(e.message);
  }
}

function renderExamples(ex) {
  const box = $("#examples");
  box.textContent = "";
  const head = el("div", { class: "muted small" });
  head.append(latentLink(ex.latent, `latent ${ex.latent}`), ` at layer ${ex.layer}` + (ex.available && ex.total ? ` · top ${ex.examples.length} of ${ex.total}` : ""));
  box.appendChild(head);
  if (!ex.available || ex.examples.length === 0) {
    box.appendChild(el("div", { class: "muted", id: "examples-message" }, ex.message || "no examples"));
    return;
  }
  const max = ex.examples[0].activation || 1;
  for (const e of ex.examples) box.appendChild(exampleRow(e, max));
}

// ----- logits -------------------------------------------------------------------------------
async function loadLogits() {
  const fresh = ticket("logits");
  const body = {
    prompt: state.prompt, position: state.pos, layer: state.layer,
    factor: state.factor, mode: state.mode, top_k: 10,
  };
  if (state.latent !== null) body.latent = state.latent;
  try {
    const lg = await api("POST", "/api/logits", body);
    if (fresh()) renderLogits(lg);
  } catch (e) {
    if (fresh()) showError(e.message);
  }
}

function topTable(rows) {
  const t = el("table");
  const head = el("tr");
  for (const h of ["token", "logit", "prob"]) head.appendChild(el("th", null, h));
  t.appendChild(head);
  for (const r of rows) {
    const tr = el("tr");
    tr.appendChild(el("td", { class: "tok" }, showToken(r.token)));
    tr.appendChild(el("td", null, fmt(r.logit, 2)));
    tr.appendChild(el("td", null, r.prob === null ? "–" : `${(100 * r.prob).toFixed(1)}%`));
    t.appendChild(tr);
  }
  return t;
}

function diffColumn(box, title, d) {
  box.appendChild(el("h3", null, title));
  box.appendChild(el("div", { class: "muted small" }, `KL(clean‖this) ${fmt(d.kl, 4)} · max |Δlogit| ${fmt(d.max_abs_delta)}`));
  box.appendChild(topTable(d.top.slice(0, 5)));
  box.appendChild(el("div", { class: "sub up" }, "largest increases"));
  box.appendChild(deltaTable(d.increases.slice(0, 5), "increases"));
  box.appendChild(el("div", { class: "sub down" }, "largest decreases"));
  box.appendChild(deltaTable(d.decreases.slice(0, 5), "decreases"));
}

function renderLogits(lg) {
  const c = $("#logits-clean"), r = $("#logits-recons"), s = $("#logits-steer");
  for (const b of [c, r, s]) b.textContent = "";
  c.appendChild(el("h3", null, `clean · next token after “${showToken(lg.token)}” (position ${lg.position})`));
  c.appendChild(topTable(lg.clean.top));
  diffColumn(r, `layer ${lg.layer} replaced by its reconstruction`, lg.recons);
  if (lg.steer) {
    const st = lg.steer;
    let how = st.mode === "scale"
      ? `latent ${st.latent} × ${st.factor} at layer ${lg.layer}`
      : `latent ${st.latent} + ${st.factor} × ${fmt(st.scale)} at layer ${lg.layer}`;
    diffColumn(s, `steered: ${how}`, st);
    if (st.scale_source) s.appendChild(el("div", { class: "muted small" }, `activation scale from ${st.scale_source}`));
  } else {
    s.appendChild(el("h3", null, "steered"));
    s.appendChild(el("div", { class: "muted" }, "Select a latent (click a heatmap cell) to steer it."));
  }
}

// ----- metrics ------------------------------------------------------------------------------
function renderMetrics() {
  const r = state.result;
  const box = $("#metrics");
  box.textContent = "";
  const t = el("table");
  const head = el("tr");
  for (const h of ["layer", "FVU", "FVU w/o pos 0", "pos 0 share", "L0", "MSE"]) head.appendChild(el("th", null, h));
  t.appendChild(head);
  for (const m of r.metrics) {
    const tr = el("tr");
    for (const v of [String(m.layer), fmt(m.fvu), fmt(m.fvu_nofirst), fmt(m.first_share), fmt(m.l0, 1), fmt(m.mse)]) tr.appendChild(el("td", null, v));
    t.appendChild(tr);
  }
  const mm = r.metrics_mean;
  const tr = el("tr", { class: "mean" });
  for (const v of ["mean", fmt(mm.fvu), fmt(mm.fvu_nofirst), fmt(mm.first_share), fmt(mm.l0, 1), fmt(mm.mse)]) tr.appendChild(el("td", null, v));
  t.appendChild(tr);
  box.appendChild(t);
  box.appendChild(el("div", { class: "muted small" }, `${r.n_tokens} tokens; FVU = Σ‖r−x‖² / Σ‖x−x̄‖² over this prompt's tokens (null below 2 tokens), also without position 0, whose share of Σ‖x−x̄‖² is shown; L0 = latents > ${state.info.sae.dead_threshold} per token`));
}

// ----- selection changes --------------------------------------------------------------------
function selectPosition(i) {
  state.pos = i;
  writeURL(false);
  renderSelection();
  for (const t of document.querySelectorAll("#tokens .token")) t.classList.toggle("selected", Number(t.dataset.pos) === i);
  if (state.agg === "token") loadHeatmap();
  loadLogits();
}

function selectCell(latent, layer) {
  state.latent = latent;
  state.layer = layer;
  syncControls();
  writeURL(false);
  renderSelection();
  for (const c of document.querySelectorAll("#heatmap rect.cell")) {
    c.classList.toggle("selected", Number(c.dataset.latent) === latent && Number(c.dataset.layer) === layer);
  }
  for (const h of document.querySelectorAll("#histograms .hist")) h.classList.toggle("selected", Number(h.dataset.layer) === layer);
  loadActivations();
  loadExamples();
  loadLogits();
}

let factorTimer = null;
function setFactor(v) {
  if (!isFinite(v)) return;
  const f = state.info ? state.info.limits.max_factor : 1000;
  state.factor = Math.max(-f, Math.min(f, v));
  $("#factor").value = String(state.factor);
  $("#factor-range").value = String(Math.max(-10, Math.min(10, state.factor)));
  writeURL(false);
  clearTimeout(factorTimer);
  factorTimer = setTimeout(loadLogits, 120);
}

function bind() {
  $("#prompt-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = $("#prompt").value;
    if (p !== state.prompt) {
      state.pos = null;
    }
    state.prompt = p;
    analyse(true);
  });
  $("#prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      $("#prompt-form").requestSubmit();
    }
  });
  $("#layer").addEventListener("change", () => {
    state.layer = parseInt($("#layer").value, 10);
    selectCell(state.latent, state.layer);
  });
  $("#latent").addEventListener("change", () => {
    const v = $("#latent").value.trim();
    const n = state.info.sae.n_latents;
    if (v === "") state.latent = null;
    else if (/^\d+$/.test(v) && parseInt(v, 10) < n) state.latent = parseInt(v, 10);
    else {
      showError(`latent must be an integer in 0..${n - 1}`);
      return;
    }
    showError(null);
    selectCell(state.latent, state.layer);
  });
  $("#factor").addEventListener("change", () => setFactor(parseFloat($("#factor").value)));
  $("#factor-range").addEventListener("input", () => setFactor(parseFloat($("#factor-range").value)));
  $("#mode").addEventListener("change", () => {
    state.mode = $("#mode").value;
    writeURL(false);
    loadLogits();
  });
  $("#threshold").addEventListener("change", () => {
    const v = parseFloat($("#threshold").value);
    if (!(v >= 0)) return showError("threshold must be a number ≥ 0");
    showError(null);
    state.threshold = v;
    writeURL(false);
    loadHeatmap();
  });
  $("#normalise").addEventListener("change", () => {
    state.normalise = $("#normalise").checked;
    writeURL(false);
    loadHeatmap();
  });
  for (const r of document.querySelectorAll('input[name="agg"]')) {
    r.addEventListener("change", () => {
      state.agg = r.value;
      writeURL(false);
      loadHeatmap();
    });
  }
  window.addEventListener("popstate", () => {
    readURL();
    syncControls();
    if (state.prompt) analyse(false);
  });
}

async function main() {
  bind();
  try {
    await loadInfo();
  } catch (e) {
    showError(`cannot reach the explorer API: ${e.message}`);
    return;
  }
  readURL();
  syncControls();
  if (state.prompt) analyse(false);
}

main();

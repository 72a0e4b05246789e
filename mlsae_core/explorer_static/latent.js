// A latent's page, /latent/<id>: everything from one GET /api/latent/<id> (schema LatentOut).
"use strict";

// Vertical bars with a label under each and a tooltip; `values` >= 0.
function barChart(values, labels, titles, colour = "#6b8fd6") {
  const n = values.length, bw = Math.max(6, Math.min(28, Math.floor(520 / Math.max(n, 1))));
  const H = 110, left = 4, bottom = 18, W = left + bw * n + 4;
  const s = svg("svg", { width: W, height: H + bottom, role: "img" });
  const max = Math.max(...values.map((v) => v || 0), 1e-12);
  const every = Math.max(1, Math.ceil(24 / bw));
  values.forEach((v, i) => {
    const h = Math.max(v > 0 ? 1 : 0, ((v || 0) / max) * (H - 4));
    const r = svg("rect", { x: left + i * bw, y: H - h, width: bw - 1, height: h, fill: colour, class: "bar" });
    const t = svg("title");
    t.textContent = titles[i];
    r.appendChild(t);
    s.appendChild(r);
    if (i % every === 0) {
      const lab = svg("text", { x: left + i * bw + bw / 2, y: H + 13, "text-anchor": "middle", "font-size": 10 });
      lab.textContent = labels[i];
      s.appendChild(lab);
    }
  });
  return s;
}

function renderDists(d) {
  const stats = $("#dist-stats");
  stats.textContent = "";
  if (!d.per_layer.length) {
    stats.append(el("span", { class: "muted" }, d.message || "no layer distribution"));
    return;
  }
  stats.append(`layer_mean ${fmt(d.layer_mean, 2)} · layer_std ${fmt(d.layer_std, 2)} (in layer-index units) · ${d.live ? "live" : "dead"}`);
  stats.append(el("div", { class: "muted" }, `share of its total activation at each layer; from ${d.dists_source}`));
  const labels = d.per_layer.map((r) => `L${r.layer}`);
  $("#dist-chart").appendChild(barChart(d.per_layer.map((r) => r.p), labels,
    d.per_layer.map((r) => `layer ${r.layer}: p ${fmt(r.p)}`)));
  $("#density-chart").appendChild(barChart(d.per_layer.map((r) => r.density), labels,
    d.per_layer.map((r) => `layer ${r.layer}: fires on ${fmt(100 * r.density, 3)}% (${r.count} of ${d.n_tokens} tokens)`), "#e07a2e"));
  const peak = Math.max(...d.per_layer.map((r) => r.density));
  $("#density-note").textContent = `fraction of ${d.n_tokens} tokens it fires on at each layer (peak ${fmt(100 * peak, 3)}%)`;
}

function renderValues(d) {
  const h = d.histogram;
  if (!h) {
    $("#values-note").textContent = d.message || "no held-out sample";
    return;
  }
  const B = h.edges.length - 1;
  const pooled = Array.from({ length: B }, (_, b) => h.counts.reduce((a, c) => a + c[b], 0));
  const total = pooled.reduce((a, c) => a + c, 0);
  $("#values-chart").appendChild(barChart(pooled, h.edges.slice(0, B).map((e) => fmt(e, 2)),
    pooled.map((c, b) => `${fmt(h.edges[b])}–${fmt(h.edges[b + 1])}: ${c}`), "#7b5cc4"));
  $("#values-note").textContent = `${total} fired values over all layers on ${d.sample_tokens} held-out tokens, from 0 to ${fmt(h.edges[B])}`;
}

function renderEffects(d) {
  const box = $("#effects");
  for (const e of d.output_effects) {
    const col = el("div", { class: "logit-col effect" });
    col.appendChild(el("h3", null, e.layer === null ? "decoder direction (every layer)" : `layer ${e.layer}`));
    col.appendChild(el("div", { class: "sub up" }, "promotes"));
    col.appendChild(deltaTable(e.positive, "increases"));
    col.appendChild(el("div", { class: "sub down" }, "suppresses"));
    col.appendChild(deltaTable(e.negative, "decreases"));
    box.appendChild(col);
  }
}

function exampleGroup(box, title, examples, cls) {
  const group = el("div", { class: `example-group ${cls}` });
  group.appendChild(el("h3", null, title));
  if (!examples.length) group.appendChild(el("div", { class: "muted small" }, "no examples"));
  const max = examples.length ? Math.max(...examples.map((e) => e.activation || 0)) : 1;
  for (const e of examples) group.appendChild(exampleRow(e, max));
  box.appendChild(group);
}

function renderExamples(d) {
  const box = $("#max-examples");
  if (!d.max_examples.length) box.appendChild(el("div", { class: "muted" }, d.message || "no examples"));
  else box.appendChild(el("div", { class: "muted small" }, `from ${d.examples_source}`));
  for (const g of d.max_examples) exampleGroup(box, `layer ${g.layer}`, g.examples, "layer-examples");
  const q = $("#quantile-examples");
  if (!d.quantile_examples.length) q.appendChild(el("div", { class: "muted" }, d.message || "it never fires on the held-out sample"));
  for (const g of d.quantile_examples) {
    exampleGroup(q, `quantile ${g.quantile} (activation ${fmt(g.activation)})`, g.examples, "quantile-examples");
  }
}

function renderNeighbours(d) {
  const t = el("table");
  const head = el("tr");
  for (const h of ["latent", "cosine", "layer_mean"]) head.appendChild(el("th", null, h));
  t.appendChild(head);
  for (const n of d.neighbours) {
    const tr = el("tr");
    const td = el("td");
    td.appendChild(latentLink(n.latent));
    tr.appendChild(td);
    tr.appendChild(el("td", null, fmt(n.cosine)));
    tr.appendChild(el("td", null, fmt(n.layer_mean, 2)));
    t.appendChild(tr);
  }
  $("#neighbours").appendChild(t);
}

async function main() {
  const m = window.location.pathname.match(/^\/latent\/(.*)$/);
  const id = m ? decodeURIComponent(m[1]) : "";
  $("#latent-title").textContent = `Latent ${id}`;
  document.title = `MLSAE latent ${id}`;
  let info;
  try {
    info = await api("GET", "/api/info");
  } catch (e) {
    showError(`cannot reach the explorer API: ${e.message}`);
    return;
  }
  const s = info.sae;
  $("#model-info").textContent = `${info.model_name} · ${s.n_latents} latents, k=${s.k} · layers ${s.layers.join(", ")}`;
  bindLatentSearch(s.n_latents);
  $("#latent-id").value = id;
  const n = parseInt(id, 10);
  $("#prev-latent").href = `/latent/${Math.max(0, n - 1)}`;
  $("#next-latent").href = `/latent/${Math.min(s.n_latents - 1, n + 1)}`;
  let d;
  try {
    d = await api("GET", `/api/latent/${encodeURIComponent(id)}`);
  } catch (e) {
    showError(e.message);
    return;
  }
  $("#latent-note").textContent = d.message || `held-out sample: ${d.sample_tokens} tokens`;
  renderDists(d);
  renderValues(d);
  renderEffects(d);
  renderExamples(d);
  renderNeighbours(d);
  $("#latent-views").hidden = false;
}

main();

// Shared by the explorer's pages (index.html, latent.html): DOM and API helpers, token
// display, example rows, the latent search box.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVGNS = "http://www.w3.org/2000/svg";

// ----- helpers ------------------------------------------------------------------------------
let pending = 0;
function busy(delta) {
  pending += delta;
  document.body.dataset.pending = String(pending);
  $("#status").textContent = pending > 0 ? "computing…" : "";
}

async function api(method, path, body) {
  busy(1);
  try {
    const opts = { method, headers: {} };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const res = await fetch(path, opts);
    let data = null;
    try {
      data = await res.json();
    } catch (e) {
      data = { detail: `${res.status} ${res.statusText}` };
    }
    if (!res.ok) throw new Error(data && data.detail ? data.detail : `HTTP ${res.status}`);
    return data;
  } finally {
    busy(-1);
  }
}

function showError(msg) {
  const el = $("#error");
  if (msg) {
    el.textContent = msg;
    el.hidden = false;
  } else {
    el.hidden = true;
    el.textContent = "";
  }
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  if (attrs) for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  if (attrs) for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// Token text shown literally, with invisible characters made visible.
function showToken(t) {
  if (t === null || t === undefined || t === "") return "∅";
  return t.replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (Math.abs(x) >= 1000 || (Math.abs(x) > 0 && Math.abs(x) < 0.001)) return x.toExponential(2);
  return x.toFixed(digits);
}

function actColour(v, max) {
  if (!v || !max || v <= 0) return "transparent";
  const a = Math.min(1, v / max);
  return `rgba(255, 110, 20, ${(0.1 + 0.85 * a).toFixed(3)})`;
}

// ----- shared views -------------------------------------------------------------------------
// A max_examples row: context tokens shaded by the latent's activation, the example token
// underlined (class "centre").
function exampleRow(e, max) {
  const row = el("div", { class: "example" });
  let meta = `#${e.rank} ${fmt(e.activation)}`;
  if (e.genre) meta += ` · ${e.genre}`;
  row.appendChild(el("span", { class: "meta" }, meta));
  e.context_tokens.forEach((t, i) => {
    const a = e.context_activations[i];
    const span = el("span", { class: "ctx" + (i === e.centre ? " centre" : "") }, showToken(t));
    span.style.background = actColour(a, max);
    span.title = `activation ${fmt(a)}`;
    row.appendChild(span);
  });
  if (e.document) row.title = `document ${e.document}`;
  return row;
}

function deltaTable(rows, cls) {
  const t = el("table", { class: cls });
  for (const r of rows) {
    const tr = el("tr", { title: `token id ${r.token_id}` });
    tr.appendChild(el("td", { class: "tok" }, showToken(r.token)));
    tr.appendChild(el("td", { class: r.delta >= 0 ? "up" : "down" }, (r.delta >= 0 ? "+" : "") + fmt(r.delta, 3)));
    t.appendChild(tr);
  }
  return t;
}

function latentLink(id, text) {
  return el("a", { href: `/latent/${id}`, class: "latent-link", "data-latent": String(id) }, text ?? String(id));
}

// The header's search box: open /latent/<id>, refusing an id outside 0..n-1.
function bindLatentSearch(nLatents) {
  const input = $("#latent-id");
  input.max = String(nLatents - 1);
  $("#latent-search").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = input.value.trim();
    if (!/^\d+$/.test(v) || parseInt(v, 10) >= nLatents) {
      showError(`latent must be an integer in 0..${nLatents - 1}`);
      return;
    }
    window.location.href = `/latent/${parseInt(v, 10)}`;
  });
}

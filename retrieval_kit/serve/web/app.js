// rkit search page: vanilla JS, no build step. Untrusted text only ever reaches the DOM through textContent.
"use strict";

const TOKEN_KEY = "rkit-token";
const STOP = new Set("a an and are as at be by do does for from how i in is it of on or the to was what when where which who why with".split(" "));
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
};

const state = { indexes: [], defaultIndex: null, seq: 0, lastIndex: null, query: "" };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ---- access token (asked for on a 401, kept for the tab's session) ----
let tokenWaiter = null;
function askToken(rejected) {
  if (!tokenWaiter) {
    tokenWaiter = new Promise((resolve) => {
      const form = $("token-form");
      $("token-note").textContent = rejected ? "That token was refused; try again." : "";
      form.hidden = false;
      $("token").value = "";
      $("token").focus();
      form.onsubmit = (ev) => {
        ev.preventDefault();
        const value = $("token").value.trim();
        if (!value) return;
        sessionStorage.setItem(TOKEN_KEY, value);
        form.hidden = true;
        tokenWaiter = null;
        resolve();
        $("q").focus();
      };
    });
  }
  return tokenWaiter;
}

async function api(path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  let resp;
  try {
    resp = await fetch(path, { method: body === undefined ? "GET" : "POST", headers,
                               body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, "Cannot reach the server.");
  }
  let data = null;
  try { data = await resp.json(); } catch (err) { /* not JSON */ }
  if (resp.status === 401) {
    if (token) sessionStorage.removeItem(TOKEN_KEY);
    await askToken(Boolean(token));
    return api(path, body);
  }
  if (!resp.ok) {
    const message = (data && data.error && data.error.message) || `HTTP ${resp.status} ${resp.statusText}`.trim();
    throw new ApiError(resp.status, message);
  }
  return data;
}

// ---- highlighting: split the text on the query's words, wrap matches in <mark> ----
// a crude stem per word (rotated → rotat), matched at a word's start to the word's end: rotate, rotation, rotating
function queryTerms(query) {
  const words = (query.toLowerCase().match(/[\p{L}\p{N}]+/gu) || []).filter((w) => w.length > 1 && !STOP.has(w));
  const stems = words.map((w) => {
    const stem = w.replace(/(ations?|ions?|ing|ed|es|s|ly)$/u, "");
    return stem.length >= 3 ? stem : w;
  });
  return [...new Set(stems)].sort((a, b) => b.length - a.length);
}

function highlighted(text, terms) {
  const frag = document.createDocumentFragment();
  text = text == null ? "" : String(text);
  if (!terms.length) { frag.append(text); return frag; }
  const alternatives = terms.map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|");
  const pattern = new RegExp(`((?<![\\p{L}\\p{N}])(?:${alternatives})[\\p{L}\\p{N}]*)`, "giu");
  text.split(pattern).forEach((part, i) => {
    if (!part) return;
    frag.append(i % 2 ? el("mark", null, part) : document.createTextNode(part));
  });
  return frag;
}

// ---- small renderers ----
function setBusy(section, busy) { $(section).setAttribute("aria-busy", busy ? "true" : "false"); }
function status(text) { $("status").textContent = text; }
function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}
function replace(id, ...nodes) { $(id).replaceChildren(...nodes); }

function chunkLabel(hit) {
  const m = /#(\d+)$/.exec(hit.chunk_id || "");
  return (hit.source || hit.doc_id || "") + (m ? ` · chunk ${m[1]}` : "");
}

function renderHit(hit, terms) {
  const li = el("li", "hit");
  li.tabIndex = 0;
  li.dataset.chunkId = hit.chunk_id;
  const head = el("div", "hit-head");
  head.append(el("span", "rank", hit.rank), el("span", "title", hit.title || hit.source || hit.chunk_id));
  head.append(el("span", "score", typeof hit.score === "number" ? hit.score.toFixed(3) : ""));
  const meta = el("div", "hit-meta");
  meta.append(el("span", "source", chunkLabel(hit)));
  const signals = Object.entries(hit.signals || {}).sort((a, b) => (a[1] ?? 1e9) - (b[1] ?? 1e9));
  if (signals.length) {
    const badges = el("span", "badges");
    badges.append(el("span", "visually-hidden", "found by "));
    for (const [name, rank] of signals) badges.append(el("span", "badge", rank == null ? name : `${name} #${rank}`));
    meta.append(badges);
  }
  const snippet = el("p", "snippet");
  snippet.append(highlighted(hit.snippet, terms));
  li.append(head, meta, snippet);
  li.setAttribute("aria-label", `${hit.rank}. ${hit.title || hit.source || hit.chunk_id}`);
  li.addEventListener("click", () => openHit(li));
  return li;
}

// ---- search ----
async function search(query) {
  const seq = ++state.seq;
  state.query = query;
  // the address names the search, so it can be shared or reloaded (/?q=…; read back at start-up)
  history.replaceState(null, "", `${location.pathname}?q=${encodeURIComponent(query)}`);
  const explain = $("explain").checked;
  const index = $("index").value || null;
  const body = { query, k: Number($("k").value), index, query_mode: $("mode").value || null, explain: false, filters: null };
  $("hint").hidden = true;
  showError("");
  $("empty").hidden = true;
  setBusy("results", true);
  setBusy("explanation", false);
  status("Searching…");
  replace("hits");
  replace("detail-body", el("p", "muted", "Select a hit to read its full text."));
  replace("explanation-body", el("p", "muted", explain ? "Waiting for the results…" : "Explanation is off."));
  let data;
  try {
    data = await api("/search", body);
  } catch (err) {
    if (seq !== state.seq) return;
    setBusy("results", false);
    status("Search failed.");
    showError(err.message);
    replace("explanation-body", el("p", "muted", "No explanation: the search failed."));
    return;
  }
  if (seq !== state.seq) return;
  setBusy("results", false);
  state.lastIndex = data.index;
  const terms = queryTerms(query);
  const hits = data.hits || [];
  const took = typeof data.took_ms === "number" ? `${data.took_ms.toFixed(1)} ms` : "";
  const facts = [`mode ${data.query_mode}`, took, data.index && state.indexes.length > 1 ? `index ${data.index}` : "",
                 ...(data.notes || [])].filter(Boolean).join(" · ");
  if (!hits.length) {
    status(`No results for “${query}” · ${facts}`);
    $("empty").textContent = `No results for “${query}”.`;
    $("empty").hidden = false;
  } else {
    status(`${hits.length} result${hits.length === 1 ? "" : "s"} for “${query}” · ${facts}`);
    replace("hits", ...hits.map((h) => renderHit(h, terms)));
  }
  if (explain) explainQuery(seq, query, data.index);
}

async function explainQuery(seq, query, index) {
  setBusy("explanation", true);
  replace("explanation-body", el("p", "loading", "Decoding the query embedding…"));
  let data;
  try {
    data = await api("/explain", { query, index, tokens: null });
  } catch (err) {
    if (seq !== state.seq) return;
    setBusy("explanation", false);
    replace("explanation-body", el("p", "error", err.message));
    return;
  }
  if (seq !== state.seq) return;
  setBusy("explanation", false);
  const nodes = [];
  const facts = [data.decoded_from && `decoded from the ${data.decoded_from} vector`,
                 typeof data.rouge_l === "number" && `ROUGE-L ${data.rouge_l.toFixed(2)}`].filter(Boolean).join(" · ");
  if (data.shown) {
    nodes.push(el("blockquote", "decoded", data.text));
    if (data.note) nodes.push(el("p", "note", data.note));
  } else {
    nodes.push(el("p", "note", data.note || "The decoded text is not shown."));
    if (data.text) {
      const details = el("details");
      details.append(el("summary", null, "show anyway"), el("blockquote", "decoded", data.text));
      nodes.push(details);
    }
  }
  if (facts) nodes.push(el("p", "muted small", facts));
  const lens = data.lens || {};
  if (Array.isArray(lens.words) && lens.words.length) {
    nodes.push(el("h3", null, "Logit lens"));
    nodes.push(el("p", "muted small", "the backbone's next-token guesses at the compression tokens"));
    nodes.push(el("p", "lens-words", lens.words.map(([w, p]) => `${w} ${p.toFixed(2)}`).join(" · ")));
  }
  if (Array.isArray(lens.latent) && lens.latent.length) {
    nodes.push(el("h3", null, "Latent lens"));
    nodes.push(el("p", "muted small", "training-pool answers nearest to the generative embedding"));
    const list = el("ul", "lens");
    for (const near of lens.latent) list.append(el("li", null, `${near.cos.toFixed(3)} · ${near.query} → ${near.answer}`));
    nodes.push(list);
  }
  replace("explanation-body", ...nodes);
}

async function openHit(li) {
  document.querySelectorAll(".hit[aria-current]").forEach((n) => n.removeAttribute("aria-current"));
  li.setAttribute("aria-current", "true");
  const seq = state.seq;
  const chunkId = li.dataset.chunkId;
  setBusy("detail", true);
  replace("detail-body", el("p", "loading", "Loading the chunk…"));
  const qs = state.lastIndex ? `?index=${encodeURIComponent(state.lastIndex)}` : "";
  try {
    const doc = await api(`/documents/${encodeURIComponent(chunkId)}${qs}`);
    if (seq !== state.seq || li.getAttribute("aria-current") !== "true") return;
    const m = /#(\d+)$/.exec(doc.chunk_id || "");
    const text = el("div", "fulltext");
    text.append(highlighted(doc.text, queryTerms(state.query)));
    replace("detail-body", el("h3", "doc-title", doc.title || doc.source),
            el("p", "muted small", (doc.source || doc.doc_id) + (m ? ` · chunk ${m[1]}` : "")), text);
  } catch (err) {
    if (seq !== state.seq) return;
    replace("detail-body", el("p", "error", err.message));
  } finally {
    setBusy("detail", false);
  }
}

// ---- start-up: wait for the models, then list the indexes ----
async function waitReady() {
  for (;;) {
    let resp = null, data = null;
    try {
      resp = await fetch("/health", { headers: { Accept: "application/json" } });
      data = await resp.json();
    } catch (err) { /* unreachable or not JSON */ }
    if (resp && resp.ok && data && data.status === "ready") break;
    const loading = data && data.status === "loading";
    if (data && data.status === "failed") {
      $("banner").textContent = `The server could not load its models: ${data.error || "see its log"}`;
      $("banner").hidden = false;
      $("go").disabled = true;
      return;
    }
    $("banner").textContent = loading ? "models loading…" : "Cannot reach the server — retrying…";
    $("banner").hidden = false;
    $("go").disabled = true;
    await new Promise((r) => setTimeout(r, loading ? 1000 : 2000));
  }
  $("banner").hidden = true;
  $("go").disabled = false;
  try {
    await loadIndexes();
  } catch (err) {
    showError(err.message);
  }
}

function fillModes() {
  const info = state.indexes.find((i) => i.name === $("index").value);
  const first = $("mode").options[0];
  first.textContent = info && info.default_query_mode ? `index default (${info.default_query_mode})` : "index default";
}

async function loadIndexes() {
  const data = await api("/indexes");
  state.indexes = data.indexes || [];
  state.defaultIndex = data.default;
  const select = $("index");
  select.replaceChildren(...state.indexes.map((i) => {
    const option = el("option", null, `${i.name} (${i.chunks} chunks)`);
    option.value = i.name;
    option.selected = i.name === data.default;
    return option;
  }));
  $("index-field").hidden = state.indexes.length < 2;
  const mode = $("mode");
  mode.replaceChildren(mode.options[0], ...(data.query_modes || []).map((m) => {
    const option = el("option", null, m);
    option.value = m;
    return option;
  }));
  fillModes();
}

// ---- keyboard ----
function hitNodes() { return [...document.querySelectorAll("#hits .hit")]; }

document.addEventListener("keydown", (ev) => {
  const target = ev.target;
  const typing = target instanceof HTMLInputElement || target instanceof HTMLSelectElement || target instanceof HTMLTextAreaElement;
  if (ev.key === "/" && !typing && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
    ev.preventDefault();
    $("q").focus();
    $("q").select();
    return;
  }
  const hits = hitNodes();
  const at = hits.indexOf(target);
  if (ev.key === "ArrowDown" && (at >= 0 || target === $("q")) && hits.length) {
    ev.preventDefault();
    hits[Math.min(at + 1, hits.length - 1)].focus();
  } else if (ev.key === "ArrowUp" && at >= 0) {
    ev.preventDefault();
    if (at === 0) $("q").focus(); else hits[at - 1].focus();
  } else if (ev.key === "Enter" && at >= 0) {
    ev.preventDefault();
    openHit(hits[at]);
  }
});

document.addEventListener("DOMContentLoaded", () => {
  const q = $("q");
  q.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") { ev.preventDefault(); q.value = ""; }
  });
  $("index").addEventListener("change", fillModes);
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const query = q.value.trim();
    if (!query) { q.focus(); return; }
    if ($("go").disabled) { status("The models are still loading…"); return; }
    search(query);
  });
  q.focus();
  waitReady().then(() => {  // a shared link: /?q=… searches as soon as the models are ready
    const asked = (new URLSearchParams(location.search).get("q") || "").trim();
    if (asked && !$("go").disabled && state.indexes.length) {
      q.value = asked;
      search(asked);
    }
  });
});

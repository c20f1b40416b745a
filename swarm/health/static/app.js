// swarm health: polls api/v1/state and renders it. Every value from the swarm is untrusted: it reaches the page
// only through textContent and attribute setters (never innerHTML), and every accessor tolerates odd types.
"use strict";

(function () {
  const POLL_MS = 3000;
  const STATES = ["online", "joining", "offline", "gone"];
  let fetchedAt = 0;

  // ---- safe accessors ----------------------------------------------------------------------------------------

  const arr = (v) => (Array.isArray(v) ? v : []);
  const obj = (v) => (v !== null && typeof v === "object" && !Array.isArray(v) ? v : {});
  const str = (v) => (typeof v === "string" ? v : v === null || v === undefined ? "" : String(v));
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
  const int = (v) => (Number.isInteger(v) ? v : null);

  function fmt(v, digits, unit) {
    const n = num(v);
    if (n === null) return "—";
    const text = n >= 100 || digits === 0 ? Math.round(n).toLocaleString("en-US") : n.toFixed(digits);
    return unit ? text + " " + unit : text;
  }

  function ago(seconds) {
    const s = num(seconds);
    if (s === null) return "never";
    if (s < 1.5) return "just now";
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = str(text);
    return node;
  }

  function blockRange(start, end) {
    const a = int(start), b = int(end);
    if (a === null || b === null) return "?";
    return b - a === 1 ? "block " + a : "blocks " + a + "–" + (b - 1);
  }

  // ---- rendering ---------------------------------------------------------------------------------------------

  function renderSummary(state, models, age) {
    const list = document.getElementById("summary");
    const crawl = obj(state.crawl);
    const counts = obj(state.peer_states);
    const dropped = obj(state.dropped_records);
    const broken = models.filter((m) => m.state !== "healthy").length;
    const items = [];
    items.push([models.length + (models.length === 1 ? " model" : " models"),
                broken ? "bad" : models.length ? "good" : ""]);
    for (const s of STATES) {
      const n = int(counts[s]) || 0;
      if (n || s === "online") items.push([n + " " + s, s === "online" ? "good" : s === "gone" ? "warn" : ""]);
    }
    const lastDropped = int(dropped.last_crawl) || 0;
    items.push([lastDropped + " bad record" + (lastDropped === 1 ? "" : "s"), lastDropped ? "warn" : "",
                "malformed or hostile DHT records ignored by the last crawl; " + (int(dropped.total) || 0) +
                " since start"]);
    const started = num(crawl.started_at);
    items.push([started === null ? "first crawl running…" :
                "crawled " + ago(age(started)) + " in " + fmt(crawl.duration_s, 2, "s"), crawl.error ? "bad" : "",
                crawl.error ? "last crawl failed: " + str(crawl.error) : "every " + fmt(crawl.refresh_s, 0, "s")]);
    list.replaceChildren(...items.map(([text, cls, title]) => {
      const li = el("li", "chip" + (cls ? " " + cls : ""), text);
      if (title) li.title = title;
      return li;
    }));
  }

  function renderCoverage(model) {
    const n = int(model.num_blocks) || 0;
    const cov = arr(model.coverage);
    const reach = arr(model.coverage_reachable);
    const map = el("div", "covmap" + (n > 128 ? " dense" : n <= 48 ? " fit" + (n <= 12 ? " few" : "") : ""));
    if (n <= 48) map.style.setProperty("--cols", String(Math.max(n, 1)));  // small models: cells fill the row
    map.setAttribute("role", "list");
    map.setAttribute("aria-label", "coverage map: ONLINE peers per block");
    for (let b = 0; b < n && b < 4096; b++) {
      const c = int(cov[b]) || 0;
      const r = int(reach[b]) || 0;
      const cell = el("div", "cell cov-" + Math.min(c, 3) + (c > 0 && r === 0 ? " unverified" : ""));
      cell.setAttribute("role", "listitem");
      cell.dataset.block = String(b);
      cell.dataset.peers = String(c);
      cell.title = "block " + b + ": " + (c === 0 ? "NOT COVERED" : c + " online peer" + (c === 1 ? "" : "s")) +
        (c > 0 ? ", " + r + " answered a ping" : "");
      if (n <= 128) cell.textContent = String(b);
      map.append(cell);
    }
    return map;
  }

  function legend() {
    const box = el("div", "legend");
    for (const [cls, text] of [["cov-0", "no peer"], ["cov-1", "1 peer"], ["cov-2", "2 peers"], ["cov-3", "3+ peers"],
                               ["cov-1 unverified", "no ping answer"]]) {
      const item = el("span", "key");
      item.append(el("span", "swatch cell " + cls), text);
      box.append(item);
    }
    return box;
  }

  const COLUMNS = ["Peer", "Name", "Blocks", "State", "Throughput", "Free slots", "Device", "Version", "Ping",
                   "Last seen"];

  function peerRow(p, n, age) {
    const tr = el("tr", "peer state-" + str(p.state).replace(/[^a-z]/g, ""));
    const cell = (i, content, cls) => {
      const td = el("td", cls);
      td.dataset.label = COLUMNS[i];
      if (content instanceof Node) td.append(content); else td.textContent = str(content);
      tr.append(td);
      return td;
    };
    const id = cell(0, p.short_id, "mono");
    id.title = str(p.peer_id);
    cell(1, str(p.public_name) || "—", "name");
    const blocks = el("div", "span");
    blocks.append(el("span", "span-text", int(p.start) !== null ? p.start + ":" + p.end : "?"));
    const bar = el("span", "span-bar");
    const fill = el("span", "span-fill");
    const a = int(p.start), b = int(p.end);
    if (n > 0 && a !== null && b !== null) {
      fill.style.left = (100 * Math.max(0, a) / n) + "%";
      fill.style.width = (100 * Math.max(0, Math.min(b, n) - a) / n) + "%";
    }
    bar.append(fill);
    blocks.append(bar);
    cell(2, blocks);
    cell(3, el("span", "badge " + str(p.state).replace(/[^a-z]/g, ""), p.state));
    cell(4, fmt(p.throughput, 1, "tok/s"), "num");
    cell(5, int(p.free_slots) === null ? "—" : p.free_slots, "num");
    cell(6, [str(p.device), str(p.dtype)].filter(Boolean).join(" · ") || "—");
    cell(7, str(p.version) || "—", "mono");
    let ping;
    if (p.reachable === true) ping = el("span", "ok", fmt(p.ping_ms, 1, "ms"));
    else if (p.reachable === false) ping = el("span", "bad", "unreachable");
    else ping = el("span", "muted", p.state === "gone" ? "—" : "not pinged");
    if (p.ping_error) ping.title = str(p.ping_error);
    cell(8, ping, "num");
    const seen = cell(9, p.last_seen === null ? "never" : ago(age(num(p.last_seen))), "num");
    seen.title = "last answer to a ping" + (num(p.last_announced) !== null ?
      "; record last seen " + ago(age(num(p.last_announced))) : "");
    return tr;
  }

  function renderModel(model, peers, age) {
    const m = obj(model);
    const n = int(m.num_blocks) || 0;
    const mine = peers.filter((p) => p.model === m.name);
    const online = mine.filter((p) => p.state === "online").length;
    const healthy = m.state === "healthy";
    const card = el("section", "model " + (healthy ? "healthy" : "broken"));
    const head = el("div", "model-head");
    head.append(el("h2", "", str(m.name) || "(unnamed)"), el("span", "badge " + (healthy ? "online" : "broken"),
                                                             healthy ? "healthy" : "broken"));
    card.append(head);
    const facts = el("p", "facts");
    facts.append(el("span", "", n + " blocks"), el("span", "", online + " online peer" + (online === 1 ? "" : "s")),
                 el("span", "", "min coverage " + (int(m.min_coverage) ?? "—")),
                 el("span", "", "throughput " + fmt(m.throughput, 1, "tok/s")));
    if (m.announced === false) facts.append(el("span", "bad", "record expired"));
    card.append(facts);
    const gaps = arr(m.uncovered).filter((r) => int(arr(r)[0]) !== null).map((r) => blockRange(r[0], r[1]));
    if (gaps.length) card.append(el("p", "problem", "Not covered by any ONLINE peer: " + gaps.join(", ")));
    card.append(renderCoverage(m), legend());
    if (mine.length) {
      const wrap = el("div", "table-wrap");
      const table = el("table", "peers");
      const thead = el("thead");
      const hr = el("tr");
      for (const c of COLUMNS) hr.append(el("th", "", c));
      thead.append(hr);
      const tbody = el("tbody");
      for (const p of mine) tbody.append(peerRow(p, n, age));
      table.append(thead, tbody);
      wrap.append(table);
      card.append(wrap);
    } else {
      card.append(el("p", "placeholder", "No peer serves this model."));
    }
    return card;
  }

  function render(state) {
    const now = num(state.now) ?? Date.now() / 1000;
    // ages on the server's clock, ticking on ours since the fetch: a skewed browser clock does not matter
    const age = (t) => (num(t) === null ? null : Math.max(0, now - t + (Date.now() - fetchedAt) / 1000));
    const peers = arr(state.peers).map(obj).filter((p) => typeof p.peer_id === "string");
    const models = arr(state.models).map(obj).filter((m) => typeof m.name === "string");
    renderSummary(state, models, age);
    const main = document.getElementById("models");
    if (!models.length) {
      const crawled = int(obj(state.crawl).count) || 0;
      main.replaceChildren(el("p", "placeholder", crawled ? "No model is announced in this swarm." :
                                                           "Crawling the swarm for the first time…"));
    } else {
      main.replaceChildren(...models.map((m) => renderModel(m, peers, age)));
    }
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function banner(text) {
    const b = document.getElementById("banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  async function poll() {
    try {
      const response = await fetch("api/v1/state", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const state = obj(await response.json());
      fetchedAt = Date.now();
      render(state);
      banner("");
    } catch (e) {
      banner("Cannot refresh the swarm's state (" + str(e && e.message) + "); retrying every " +
             POLL_MS / 1000 + " s.");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();

// The kiosk page: search, one product's stock here / nearby / online / at its sources, its
// sales limit, live updates. Reads only the agent's own API (same origin, relative URLs); no
// external assets, so it works offline. It keeps its last answers in localStorage, and a
// service worker (/kiosk/kiosk-sw.js) keeps the page itself, so a reload while the agent is down
// shows the last figures, marked as such, instead of a browser error page.
"use strict";

(function () {
  const REFRESH_MS = 5000;     // re-read figures and the sync state (snapshot age, link)
  const TYPE_DELAY_MS = 200;   // debounce for search as you type
  const FETCH_TIMEOUT_MS = 4000;   // an agent that hangs counts as one that does not answer
  const KEPT_KEY = "edge-kiosk:last";   // localStorage is per origin, so per agent
  const KEPT_ANSWERS = 20;     // the last answers kept, most recent first
  const KIND_ORDER = { warehouse: 0, partner: 1, supplier: 2 };

  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("search-form"), input: $("search-input"), results: $("results"),
    summary: $("results-summary"), detail: $("detail"), title: $("detail-title"),
    sku: $("detail-sku"), available: $("here-available"), floor: $("here-floor"),
    backroom: $("here-backroom"), reserved: $("here-reserved"), nearby: $("nearby"),
    online: $("online"), snapshot: $("snapshot"), link: $("link-status"),
    cap: $("cap"), sources: $("sources"), lastKnown: $("last-known"),
  };

  const state = {
    query: "", items: [], selected: null, names: {}, availability: null,
    fetchedAt: 0, sync: null, streamUp: false, agentUp: true, typeTimer: null, searchSeq: 0,
    asked: null,       // the query of a search someone asked for, while it is on its way
    fromKept: false,   // the figures shown were kept from before this page load
    kept: {},          // sku -> {answer, at}: the last answers, saved in localStorage
  };

  // Every request is a same-origin relative URL. The page only reads; a write would send
  // its JSON body with Content-Type: application/json (the API refuses writes without it).
  async function request(path, { method = "GET", body } = {}) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    try {
      const response = await fetch(path, {
        method, cache: "no-store", credentials: "same-origin", headers, signal: controller.signal,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const parsed = await response.json().catch(() => null);
      return { status: response.status, body: parsed };
    } finally {
      clearTimeout(timer);
    }
  }
  const getJSON = (path) => request(path);

  function text(el, value) { if (el.textContent !== value) el.textContent = value; }

  function formatAge(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
    return Math.floor(s / 86400) + " days ago";
  }

  // A coarse span for text inside the live region: it changes at most once a minute
  // beyond the first minute, so a screen reader is not told every second.
  function formatSpan(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h";
    const d = Math.floor(s / 86400);
    return d + (d === 1 ? " day" : " days");
  }

  function formatLead(seconds) {
    const s = Number(seconds) || 0;
    if (s <= 0) return "no lead time";
    if (s <= 3600) return "delivery within 1 h";
    if (s < 86400) return "delivery in " + Math.ceil(s / 3600) + " h";
    const d = Math.ceil(s / 86400);
    return "delivery in " + d + (d === 1 ? " day" : " days");
  }

  const pad = (n) => String(n).padStart(2, "0");
  function clockTime(ms) {
    const d = new Date(ms);
    return pad(d.getHours()) + ":" + pad(d.getMinutes());
  }

  function formatDay(iso) {
    const d = new Date(iso);
    if (isNaN(d.getTime())) return "";
    return d.toLocaleDateString("en-GB", { weekday: "short", day: "numeric", month: "short" }) +
      " " + clockTime(d.getTime());
  }

  // ---------------------------------------------------------------- kept answers

  function loadKept() {
    try {
      const kept = JSON.parse(localStorage.getItem(KEPT_KEY) || "null");
      return kept && kept.v === 1 ? kept : null;
    } catch (err) {
      return null;
    }
  }

  function saveKept() {
    const skus = Object.keys(state.kept).sort((x, y) => state.kept[y].at - state.kept[x].at);
    for (const sku of skus.slice(KEPT_ANSWERS)) delete state.kept[sku];
    const names = {};
    for (const sku of [...Object.keys(state.kept), ...state.items.map((item) => item.sku)]) {
      if (state.names[sku]) names[sku] = state.names[sku];
    }
    try {
      localStorage.setItem(KEPT_KEY, JSON.stringify({
        v: 1, query: state.query, items: state.items, selected: state.selected, names, answers: state.kept }));
    } catch (err) {
      // Storage full or disabled: the page still works, it only forgets across reloads.
    }
  }

  function restoreKept() {
    const kept = loadKept();
    if (!kept) return;
    state.kept = kept.answers || {};
    Object.assign(state.names, kept.names || {});
    state.query = kept.query || "";
    els.input.value = state.query;
    state.items = Array.isArray(kept.items) ? kept.items : [];
    renderResults();
    if (state.query) text(els.summary, "Last search: “" + state.query + "”.");
    const last = kept.selected && state.kept[kept.selected];
    if (last) {
      state.selected = kept.selected;
      showKept(kept.selected);
    }
  }

  function showKept(sku) {
    const last = state.kept[sku];
    if (!last) return false;
    state.availability = last.answer;
    state.fetchedAt = last.at;
    state.fromKept = true;
    els.detail.hidden = false;
    text(els.sku, sku);
    renderDetail();
    return true;
  }

  // ---------------------------------------------------------------- search

  async function runSearch(query, { quiet = false } = {}) {
    const q = query.trim();
    // A quiet refresh (live update, reconnect) never supersedes a search someone asked for
    // that is still on its way: that one summarises and opens an exact SKU.
    if (quiet && state.asked !== null && state.asked === q) return;
    state.query = q;
    const mine = ++state.searchSeq;
    if (!quiet) state.asked = q;
    if (!q) {
      state.asked = null;
      state.items = [];
      renderResults();
      text(els.summary, "");
      return;
    }
    let answer;
    try {
      answer = await getJSON("/v1/search?q=" + encodeURIComponent(q) + "&limit=20");
    } catch (err) {
      markAgent(false);
      if (mine === state.searchSeq) {
        state.asked = null;
        if (!quiet) text(els.summary, "Cannot search: the stock service does not answer.");
      }
      return;
    }
    if (mine !== state.searchSeq) return;  // a newer search has started
    state.asked = null;
    markAgent(true);
    state.items = (answer.body && answer.body.items) || [];
    for (const item of state.items) if (item.name) state.names[item.sku] = item.name;
    renderResults();
    saveKept();
    if (!quiet) {
      const n = state.items.length;
      text(els.summary, n === 0 ? "No product matches “" + q + "”." :
        n === 1 ? "1 product matches “" + q + "”." : n + " products match “" + q + "”.");
    }
    const exact = state.items.find((item) => item.sku.toLowerCase() === q.toLowerCase());
    if (!quiet && exact && state.items.length === 1) select(exact.sku, { focus: false });
  }

  function renderResults() {
    const list = els.results;
    list.replaceChildren();
    for (const item of state.items) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "result";
      button.dataset.sku = item.sku;
      if (item.sku === state.selected) button.setAttribute("aria-current", "true");
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = item.name || item.sku;
      const sku = document.createElement("span");
      sku.className = "sku";
      sku.textContent = item.sku;
      const avail = document.createElement("span");
      avail.className = "avail" + (item.available > 0 ? "" : " none");
      avail.textContent = item.available > 0 ? item.available + " here" : "none here";
      button.append(name, sku, avail);
      button.addEventListener("click", () => select(item.sku, { focus: true }));
      li.append(button);
      list.append(li);
    }
  }

  // ---------------------------------------------------------------- one product

  async function select(sku, { focus = false } = {}) {
    state.selected = sku;
    state.availability = null;
    state.fromKept = false;
    for (const button of els.results.querySelectorAll("button.result")) {
      if (button.dataset.sku === sku) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
    els.detail.hidden = false;
    text(els.title, state.names[sku] || sku);
    text(els.sku, sku);
    // Never the previous product's figures under this one's name. While the agent does not
    // answer: the last ones kept for this product, marked as such.
    if (state.agentUp || !showKept(sku)) clearDetail();
    await refreshDetail();
    if (focus) els.title.focus();
  }

  async function refreshDetail() {
    const sku = state.selected;
    if (!sku) return;
    let answer;
    try {
      answer = await getJSON("/v1/availability/" + encodeURIComponent(sku));
    } catch (err) {
      markAgent(false);
      return;
    }
    if (sku !== state.selected) return;
    markAgent(true);
    if (answer.status === 404) {
      state.availability = { sku, here: { floor: 0, backroom: 0, reserved: 0, available: 0 },
        nearby: [], online: null, snapshot: null, sources: [], cap: null, unknown: true };
    } else if (answer.status === 200 && answer.body) {
      state.availability = answer.body;
    } else {
      return;
    }
    state.fetchedAt = Date.now();
    state.fromKept = false;
    state.kept[sku] = { answer: state.availability, at: state.fetchedAt };
    saveKept();
    renderDetail();
  }

  function renderDetail() {
    const a = state.availability;
    if (!a) return;
    text(els.title, state.names[a.sku] || a.sku);
    els.detail.dataset.sku = a.sku;
    text(els.available, String(a.here.available));
    text(els.floor, String(a.here.floor));
    text(els.backroom, String(a.here.backroom));
    text(els.reserved, String(a.here.reserved));
    els.available.closest(".big").classList.toggle("none", a.here.available <= 0);

    els.nearby.replaceChildren();
    if (!a.nearby || a.nearby.length === 0) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = a.snapshot ? "No nearby store has it." : "Not known yet.";
      els.nearby.append(li);
    } else {
      for (const store of a.nearby) {
        const li = document.createElement("li");
        li.dataset.storeId = store.store_id;
        const name = document.createElement("span");
        name.textContent = store.store_id;
        const n = document.createElement("strong");
        n.textContent = String(store.available);
        li.append(name, n);
        if (store.available <= 0) li.classList.add("none");
        els.nearby.append(li);
      }
    }
    text(els.online, a.online === null || a.online === undefined ? "Not known" :
      a.online > 0 ? a.online + " available online" : "Out of stock online");
    renderCap(a.cap);
    renderSources();
    renderSnapshot();
    renderFreshness();
    renderLink();
  }

  function clearDetail() {
    for (const el of [els.available, els.floor, els.backroom, els.reserved, els.online]) text(el, "–");
    els.nearby.replaceChildren();
    els.sources.replaceChildren();
    renderCap(null);
    renderFreshness();
  }

  // The cap as the agent counts it now: the allowance for the period and what is left.
  function renderCap(cap) {
    const el = els.cap;
    if (!cap) {
      el.hidden = true;
      el.removeAttribute("data-left");
      return;
    }
    const period = cap.period || "period";
    const left = typeof cap.left === "number" ? cap.left : cap.allowance;
    const leftText = left > 0 ? left + " left" : "none left";
    const limit = cap.scope === "chain"
      ? "Limit " + cap.allowance + " per " + period + " at this store (" + cap.limit + " across the chain)"
      : "Limit " + cap.limit + " per " + period;
    const resets = cap.period_end ? formatDay(cap.period_end) : "";
    text(el, limit + ", " + leftText + (resets ? " · resets " + resets : ""));
    el.dataset.left = String(left);
    el.classList.toggle("none", !(left > 0));
    el.hidden = false;
  }

  function sourceAge(source) {
    if (typeof source.age_s === "number") return source.age_s + (Date.now() - state.fetchedAt) / 1000;
    const at = Date.parse(source.updated_at);
    return isNaN(at) ? null : Math.max(0, (Date.now() - at) / 1000);
  }

  // "Supplier X: 40, delivery in 3 days, updated 2 h ago"; a stale source says for how
  // long it has not been updated and carries a "stale" badge. Rows are updated in place
  // (keyed by source) so the live region announces changes, not a rebuilt list.
  function renderSources() {
    const a = state.availability;
    if (!a) return;
    const list = els.sources;
    const sources = (Array.isArray(a.sources) ? a.sources.slice() : []).sort((x, y) =>
      ((KIND_ORDER[x.kind] ?? 9) - (KIND_ORDER[y.kind] ?? 9)) || String(x.name).localeCompare(String(y.name)));
    if (sources.length === 0) {
      const message = a.snapshot ? "None lists this product." : "Not known yet.";
      if (list.children.length !== 1 || !list.firstElementChild.classList.contains("empty")) {
        const li = document.createElement("li");
        li.className = "empty";
        list.replaceChildren(li);
      }
      text(list.firstElementChild, message);
      return;
    }
    const ids = sources.map((s) => String(s.source_id));
    const current = Array.from(list.children).map((li) => li.dataset.sourceId);
    if (ids.join("\n") !== current.join("\n")) {
      list.replaceChildren(...ids.map((id) => {
        const li = document.createElement("li");
        li.dataset.sourceId = id;
        li.className = "source";
        const name = document.createElement("span");
        name.className = "source-name";
        const count = document.createElement("strong");
        count.className = "source-available";
        const meta = document.createElement("span");
        meta.className = "source-meta";
        const badge = document.createElement("span");
        badge.className = "badge";
        li.append(name, ": ", count, meta, " ", badge);
        return li;
      }));
    }
    sources.forEach((source, i) => {
      const li = list.children[i];
      const age = sourceAge(source);
      const stale = !!source.stale ||
        (typeof source.stale_after_s === "number" && age !== null && age > source.stale_after_s);
      li.dataset.kind = String(source.kind || "");
      li.dataset.stale = String(stale);
      li.classList.toggle("stale", stale);
      li.classList.toggle("none", !(source.available > 0));
      text(li.querySelector(".source-name"), source.name || source.source_id);
      text(li.querySelector(".source-available"), source.available > 0 ? String(source.available) : "none");
      const when = age === null ? "update time not known"
        : stale ? "not updated for " + formatSpan(age)
        : age < 60 ? "updated just now" : "updated " + formatSpan(age) + " ago";
      text(li.querySelector(".source-meta"), ", " + formatLead(source.lead_time_s) + ", " + when);
      const badge = li.querySelector(".badge");
      text(badge, stale ? "stale" : "");
      badge.hidden = !stale;
    });
  }

  // Figures not confirmed by the agent since this page loaded, or while it does not answer,
  // say when they were last known.
  function renderFreshness() {
    const a = state.availability;
    const live = state.agentUp && !state.fromKept;
    els.detail.dataset.freshness = live ? "live" : "last-known";
    if (!a) {
      // A product opened while the agent does not answer, with nothing kept for it.
      els.lastKnown.hidden = state.agentUp || !state.selected;
      if (!els.lastKnown.hidden) text(els.lastKnown, "Not known here: cannot reach the stock service");
      return;
    }
    if (live) {
      els.lastKnown.hidden = true;
      return;
    }
    text(els.lastKnown, "Last known at " + clockTime(state.fetchedAt) +
      (state.agentUp ? " · checking the stock service…" : " · cannot reach the stock service"));
    els.lastKnown.hidden = false;
  }

  function snapshotAge() {
    const a = state.availability;
    if (!a || !a.snapshot) return null;
    return a.snapshot.age_s + (Date.now() - state.fetchedAt) / 1000;
  }

  function renderSnapshot() {
    const a = state.availability;
    const el = els.snapshot;
    if (!a) return;
    if (!a.snapshot) {
      el.dataset.state = "none";
      text(el, "Nearby and online figures: not received from head office yet.");
      els.detail.classList.remove("stale");
      return;
    }
    const stale = !!a.snapshot.stale;
    el.dataset.state = stale ? "stale" : "fresh";
    els.detail.classList.toggle("stale", stale);
    const age = formatAge(snapshotAge());
    text(el, stale
      ? "Offline / stale: nearby and online figures are from " + age + " and may have changed."
      : "Nearby and online figures updated " + age + ".");
  }

  // ---------------------------------------------------------------- link state

  function markAgent(up) {
    if (state.agentUp !== up) {
      state.agentUp = up;
      renderLink();
      renderFreshness();
    }
  }

  function renderLink() {
    const el = els.link;
    const a = state.availability;
    let mode, message;
    if (!state.agentUp) {
      mode = "down";
      message = "Cannot reach the stock service · figures may be out of date";
    } else if (state.sync && state.sync.connected === false) {
      mode = "offline";
      message = "Offline · this store's figures are live";
    } else if (a && a.snapshot && a.snapshot.stale) {
      mode = "stale";
      message = "Stale · no recent head-office update";
    } else if (state.sync) {
      mode = "online";
      message = state.streamUp ? "Live" : "Online";
    } else {
      mode = "unknown";
      message = "Connecting…";
    }
    el.dataset.state = mode;
    text(el, message);
    document.body.dataset.link = mode;
  }

  async function refreshSync() {
    try {
      const answer = await getJSON("/v1/sync");
      markAgent(true);
      state.sync = answer.status === 200 ? answer.body : null;
    } catch (err) {
      markAgent(false);
    }
    renderLink();
  }

  // ---------------------------------------------------------------- live updates

  function refreshResultsFor(skus) {
    if (!state.query) return;
    if (skus === null || state.items.some((item) => skus.includes(item.sku))) {
      runSearch(state.query, { quiet: true });
    }
  }

  function connectStream() {
    if (!window.EventSource) return;
    const source = new EventSource("/v1/stream");
    source.addEventListener("open", () => { state.streamUp = true; markAgent(true); renderLink(); });
    source.addEventListener("error", () => { state.streamUp = false; refreshSync(); });
    source.addEventListener("hello", () => { refreshDetail(); refreshResultsFor(null); });
    source.addEventListener("resync", () => { refreshDetail(); refreshResultsFor(null); });
    source.addEventListener("stock", (message) => {
      let data;
      try { data = JSON.parse(message.data); } catch (err) { return; }
      const skus = Array.isArray(data.skus) ? data.skus : null;
      if (state.selected && (skus === null || skus.includes(state.selected))) refreshDetail();
      refreshResultsFor(skus);
    });
  }

  // ---------------------------------------------------------------- wiring

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(state.typeTimer);
    runSearch(els.input.value);
  });
  els.input.addEventListener("input", () => {
    clearTimeout(state.typeTimer);
    const q = els.input.value.trim();
    if (q.length >= 2 || q.length === 0) {
      state.typeTimer = setTimeout(() => runSearch(els.input.value), TYPE_DELAY_MS);
    }
  });
  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") { els.input.value = ""; runSearch(""); }
    if (event.key === "ArrowDown") {
      const first = els.results.querySelector("button.result");
      if (first) { event.preventDefault(); first.focus(); }
    }
  });
  els.results.addEventListener("keydown", (event) => {
    const buttons = Array.from(els.results.querySelectorAll("button.result"));
    const at = buttons.indexOf(document.activeElement);
    if (at < 0) return;
    if (event.key === "ArrowDown" && at + 1 < buttons.length) { event.preventDefault(); buttons[at + 1].focus(); }
    if (event.key === "ArrowUp") { event.preventDefault(); (at > 0 ? buttons[at - 1] : els.input).focus(); }
  });

  if ("serviceWorker" in navigator) {
    // Needs a secure context: http://127.0.0.1 or http://localhost, or https (docs/kiosk.md).
    navigator.serviceWorker.register("/kiosk/kiosk-sw.js", { scope: "/" }).catch((err) => {
      console.warn("kiosk: the offline shell is not available:", err);
    });
  }
  setInterval(() => { refreshSync(); refreshDetail(); }, REFRESH_MS);
  setInterval(() => { renderSnapshot(); renderSources(); }, 1000);
  const fromUrl = new URLSearchParams(location.search).get("q");
  if (fromUrl) { els.input.value = fromUrl; runSearch(fromUrl); } else restoreKept();
  refreshSync();
  connectStream();
  if (state.selected) refreshDetail();
  if (state.query && !fromUrl) runSearch(state.query, { quiet: true });
})();

// The kiosk page: search, one product's stock here / nearby / online, live updates.
// Reads only the agent's own API (same origin); no external assets, so it works offline.
"use strict";

(function () {
  const REFRESH_MS = 5000;     // re-read figures and the sync state (snapshot age, link)
  const TYPE_DELAY_MS = 200;   // debounce for search as you type

  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("search-form"), input: $("search-input"), results: $("results"),
    summary: $("results-summary"), detail: $("detail"), title: $("detail-title"),
    sku: $("detail-sku"), available: $("here-available"), floor: $("here-floor"),
    backroom: $("here-backroom"), reserved: $("here-reserved"), nearby: $("nearby"),
    online: $("online"), snapshot: $("snapshot"), link: $("link-status"),
  };

  const state = {
    query: "", items: [], selected: null, names: {}, availability: null,
    fetchedAt: 0, sync: null, streamUp: false, agentUp: true, typeTimer: null, searchSeq: 0,
  };

  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
    const body = await response.json().catch(() => null);
    return { status: response.status, body };
  }

  function text(el, value) { if (el.textContent !== value) el.textContent = value; }

  function formatAge(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
    return Math.floor(s / 86400) + " days ago";
  }

  // ---------------------------------------------------------------- search

  async function runSearch(query, { quiet = false } = {}) {
    const q = query.trim();
    state.query = q;
    const mine = ++state.searchSeq;
    if (!q) {
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
      return;
    }
    if (mine !== state.searchSeq) return;  // a newer search has started
    markAgent(true);
    state.items = (answer.body && answer.body.items) || [];
    for (const item of state.items) if (item.name) state.names[item.sku] = item.name;
    renderResults();
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
    for (const button of els.results.querySelectorAll("button.result")) {
      if (button.dataset.sku === sku) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
    els.detail.hidden = false;
    text(els.title, state.names[sku] || sku);
    text(els.sku, sku);
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
        nearby: [], online: null, snapshot: null, unknown: true };
    } else if (answer.status === 200 && answer.body) {
      state.availability = answer.body;
    } else {
      return;
    }
    state.fetchedAt = Date.now();
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
    renderSnapshot();
    renderLink();
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

  setInterval(() => { refreshSync(); refreshDetail(); }, REFRESH_MS);
  setInterval(renderSnapshot, 1000);
  refreshSync();
  connectStream();
  const fromUrl = new URLSearchParams(location.search).get("q");
  if (fromUrl) { els.input.value = fromUrl; runSearch(fromUrl); }
})();

// The kiosk's service worker: keeps the page shell (page, script, style) so that a reload
// while the agent is down still shows the page, which then shows the last figures it kept
// (localStorage, see kiosk.js) and "cannot reach the stock service".
//
// The shell is fetched from the network first (a kiosk always gets the agent's current
// page when the agent answers) and from this cache only when the network fails or hangs.
// The API is never answered from here: a figure comes from the agent or is shown as the
// page's last known one, never silently replayed. VERSION names the release of the shell
// (agent/kiosk.py fills it in); a new one installs a new worker whose activation deletes
// the older caches.
"use strict";

const VERSION = "{{version}}";
const PREFIX = "edge-kiosk-shell-";
const CACHE = PREFIX + VERSION;
const SHELL = ["/", "/kiosk/kiosk.css", "/kiosk/kiosk.js"];
const NETWORK_TIMEOUT_MS = 4000;   // an agent that hangs (stopped, not dead) falls back too
const UNANSWERED_MS = 10000;       // after a fallback, the rest of the shell comes from the cache at once
let unansweredAt = -Infinity;

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    await cache.addAll(SHELL.map((path) => new Request(path, { cache: "no-store" })));
    await self.skipWaiting();
  })());
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith(PREFIX) && name !== CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

function shellKey(request) {
  if (request.method !== "GET") return null;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin) return null;
  if (request.mode === "navigate") return url.pathname === "/" ? "/" : null;
  return SHELL.includes(url.pathname) && url.search === "" ? url.pathname : null;
}

async function fromNetwork(request) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), NETWORK_TIMEOUT_MS);
  try {
    // By URL: a navigation's own Request cannot be re-made with options.
    return await fetch(request.url, { signal: controller.signal, cache: "no-store" });
  } finally {
    clearTimeout(timer);
  }
}

async function shell(request, key) {
  const cache = await caches.open(CACHE);
  if (request.mode !== "navigate" && Date.now() - unansweredAt < UNANSWERED_MS) {
    // The agent did not answer a moment ago: the page's script and style should not wait
    // out the timeout again. A navigation always asks the agent first.
    const kept = await cache.match(key);
    if (kept) return kept;
  }
  try {
    const response = await fromNetwork(request);
    unansweredAt = -Infinity;
    if (response.ok && response.type === "basic") await cache.put(key, response.clone());
    return response;
  } catch (err) {
    unansweredAt = Date.now();
    const kept = await cache.match(key);
    if (kept) return kept;
    throw err;
  }
}

self.addEventListener("fetch", (event) => {
  const key = shellKey(event.request);
  if (key !== null) event.respondWith(shell(event.request, key));
});

// The p2pfiles status page, live.  The node renders a snapshot; this script
// then follows api/watch (Server-Sent Events: "status" on connect and on
// every change, "event" as events happen), polls api/transfers for progress
// and refetches api/files when the cluster changes.  Every value from the
// node is shown as text (textContent, never HTML), control and bidi
// characters made visible, exactly as the node escapes its snapshot.
"use strict";

(() => {
  const KEPT_EVENTS = 200;
  const FILES_EVERY = 30000; // ms: files can change without an event
  const REFRESH_KINDS = new Set(["leader", "member-up", "member-down", "transfer-done"]);
  const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069\u{d800}-\u{dfff}]/gu;

  const state = {
    status: null,
    events: [],
    files: null,
    transfers: [],
    samples: new Map(), // transfer key -> {t, bytes, rate}
    filesTimer: null,
  };

  const $ = (id) => document.getElementById(id);

  function visible(value) {
    return String(value).replace(INVISIBLE, (c) => {
      const code = c.codePointAt(0);
      return code < 0x100 ? "\\x" + code.toString(16).padStart(2, "0") : "\\u" + code.toString(16).padStart(4, "0");
    });
  }

  // el("td", {class: "num"}, "text", childNode, ...): attributes and text are
  // never parsed as markup.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, visible(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : visible(child));
    }
    return node;
  }

  function setText(id, value) {
    const node = $(id);
    if (node) node.textContent = visible(value);
  }

  const isNumber = (n) => typeof n === "number" && isFinite(n);

  function humanSize(n) {
    if (!isNumber(n)) return "?";
    if (n < 1024) return `${Math.round(n * 10) / 10} B`;
    let value = n;
    for (const unit of ["KiB", "MiB", "GiB", "TiB"]) {
      value /= 1024;
      if (Math.round(value * 10) / 10 < 1024 || unit === "TiB") return `${value.toFixed(1)} ${unit}`;
    }
    return "?";
  }

  function clockTime(t) {
    return isNumber(t) ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "";
  }

  function ago(t) {
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function duration(seconds) {
    return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(1)} s`;
  }

  const peerName = (peer) => (Number.isInteger(peer) ? `node ${peer}` : String(peer));

  function describe(event) {
    const kind = event.kind;
    if (kind === "leader") {
      const who = event.leader === null || event.leader === undefined ? "no leader" : `node ${event.leader} leads`;
      return `${who}, epoch ${event.epoch}`;
    }
    if (kind === "member-up" || kind === "member-down") {
      const at = event.address ? ` at ${event.address}` : "";
      return `node ${event.member}${at} is ${kind === "member-up" ? "up" : "down"}`;
    }
    if (kind === "transfer-done" || kind === "transfer-failed") {
      const verb = { serve: "served", relay: "relayed", receive: "received" }[event.direction] || "moved";
      const towards = event.direction === "receive" ? "from" : "to";
      let line = `${verb} ${event.name} ${towards} ${peerName(event.peer)}`;
      if (kind === "transfer-failed") return `${line} failed: ${event.reason}`;
      if (isNumber(event.seconds)) line += ` in ${duration(event.seconds)}`;
      return "bytes" in event ? `${line} (${humanSize(event.bytes)})` : line;
    }
    if (kind === "rejected") {
      const peer = event.peer !== null && event.peer !== undefined ? ` ${peerName(event.peer)}` : "";
      return `refused${peer}: ${event.reason}`;
    }
    return Object.entries(event)
      .filter(([key]) => key !== "time" && key !== "kind")
      .map(([key, value]) => `${key}=${typeof value === "object" ? JSON.stringify(value) : value}`)
      .join(" ");
  }

  // When the current leader was last announced, if the events still say.
  function leaderSince() {
    const status = state.status;
    for (let i = state.events.length - 1; i >= 0; i--) {
      const event = state.events[i];
      if (event.kind === "leader") {
        return event.leader === status.leader && event.epoch === status.epoch ? event.time : null;
      }
    }
    return null;
  }

  function renderSince() {
    if (!state.status) return;
    const since = leaderSince();
    setText("leader-since", since === null ? "" : `since ${clockTime(since)} (${ago(since)})`);
  }

  function renderStatus() {
    const status = state.status;
    const members = Array.isArray(status.members) ? status.members : [];
    const leader = status.leader;
    document.title = visible(`p2pfiles · node ${status.id}`);
    setText("node-id", status.id);
    setText("node-address", status.address || "");
    setText("role", status.role || "");
    $("role").setAttribute("data-role", visible(status.role || ""));
    setText("leader", leader === null || leader === undefined ? "none" : leader);
    const leading = members.find((m) => m.id === leader);
    setText("leader-address", leading ? leading.address || "" : "");
    setText("epoch", status.epoch);
    setText("version", status.version || "");
    renderSince();

    const alive = members.filter((m) => m.alive);
    const down = members.filter((m) => !m.alive);
    setText("alive-count", alive.length);
    setText("member-count", members.length);
    setText("down-list", down.length ? `down: ${down.map((m) => m.id).join(", ")}` : "all up");
    $("down-list").setAttribute("data-down", down.length ? "true" : "false");

    const table = $("members");
    table.classList.toggle("no-fp", !members.some((m) => m.fingerprint));
    const rows = members.map((m) => {
      const isLeader = m.id === leader;
      const isSelf = m.id === status.id;
      const stateName = m.alive ? "alive" : "down";
      return el(
        "tr",
        {
          "data-member": m.id,
          "data-alive": m.alive ? "true" : "false",
          class: [isLeader ? "leader" : "", isSelf ? "self" : ""].filter(Boolean).join(" "),
        },
        el("td", { class: "num" }, m.id),
        el("td", {}, el("span", { class: "state", "data-state": stateName }, stateName)),
        el("td", {}, isLeader ? "leader" : "member", isSelf ? el("span", { class: "tag" }, "this node") : null),
        el("td", { class: "mono" }, m.address || ""),
        m.fingerprint
          ? el("td", { class: "fp mono", title: m.fingerprint }, m.fingerprint)
          : el("td", { class: "fp muted" }, "—"),
      );
    });
    if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 5 }, "no members known")));
    $("member-rows").replaceChildren(...rows);
  }

  function renderEvents() {
    const items = state.events
      .slice()
      .reverse()
      .map((event) =>
        el(
          "li",
          { "data-kind": event.kind },
          el("time", { datetime: isNumber(event.time) ? new Date(event.time * 1000).toISOString() : null }, clockTime(event.time)),
          el("span", { class: "kind" }, event.kind),
          el("span", { class: "what" }, describe(event)),
        ),
      );
    if (!items.length) items.push(el("li", { class: "empty" }, "nothing yet"));
    $("events").replaceChildren(...items);
    renderSince();
  }

  function applyFilter() {
    const query = $("file-filter").value.trim().toLowerCase();
    let shown = 0;
    let total = 0;
    for (const row of $("file-rows").querySelectorAll("tr[data-name]")) {
      total++;
      const match = !query || row.getAttribute("data-name").toLowerCase().includes(query);
      row.hidden = !match;
      if (match) shown++;
    }
    setText("file-shown", query ? `(${shown} of ${total})` : total ? `(${total})` : "");
  }

  function renderFiles() {
    const files = state.files;
    const rows = files.map((f) =>
      el(
        "tr",
        { "data-name": f.name },
        el("td", { class: "name" }, f.name),
        el("td", { class: "num" }, humanSize(f.size)),
        el("td", {}, ...(Array.isArray(f.holders) ? f.holders : []).map((h) => el("span", { class: "chip" }, h))),
        el("td", { class: "mono muted", title: f.sha256 || "" }, String(f.sha256 || "").slice(0, 12)),
      ),
    );
    if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 4 }, "no files shared")));
    $("file-rows").replaceChildren(...rows);
    setText("file-count", files.length);
    setText("file-total", `${humanSize(files.reduce((sum, f) => sum + (isNumber(f.size) ? f.size : 0), 0))} in total`);
    applyFilter();
    document.body.dataset.files = "1";
  }

  function transferKey(t) {
    return `${t.name}\u0000${t.direction}\u0000${t.peer}`;
  }

  // Rates from successive samples, smoothed; none until the second sample.
  function sampleRates(transfers) {
    const now = performance.now() / 1000;
    const seen = new Map();
    for (const t of transfers) {
      const key = transferKey(t);
      const last = state.samples.get(key);
      let rate = null;
      if (last && now > last.t && isNumber(t.bytes)) {
        const instant = Math.max(0, (t.bytes - last.bytes) / (now - last.t));
        rate = last.rate === null ? instant : 0.5 * last.rate + 0.5 * instant;
      }
      seen.set(key, { t: now, bytes: t.bytes, rate });
    }
    state.samples = seen;
  }

  function renderTransfers() {
    const transfers = state.transfers;
    sampleRates(transfers);
    let total = 0;
    const rows = transfers.map((t) => {
      const rate = state.samples.get(transferKey(t)).rate;
      if (rate !== null) total += rate;
      const known = isNumber(t.bytes) && isNumber(t.size) && t.size > 0;
      const bar = el("progress", known ? { max: t.size, value: t.bytes } : {});
      const percent = known ? ` · ${Math.round((100 * t.bytes) / t.size)}%` : "";
      return el(
        "tr",
        {},
        el("td", { class: "name" }, t.name),
        el("td", {}, el("span", { class: "dir", "data-dir": t.direction }, t.direction)),
        el("td", { class: "nowrap" }, peerName(t.peer)),
        el("td", { class: "progress-col" }, bar, el("span", { class: "muted small" }, `${humanSize(t.bytes)} of ${humanSize(t.size)}${percent}`)),
        el("td", { class: "num" }, rate === null ? "—" : `${humanSize(rate)}/s`),
      );
    });
    if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 5 }, "none")));
    $("transfer-rows").replaceChildren(...rows);
    setText("transfer-count", transfers.length);
    setText("transfer-rate", transfers.length ? `${humanSize(total)}/s` : "idle");
  }

  async function getJSON(path) {
    const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  function refreshFiles() {
    clearTimeout(state.filesTimer);
    getJSON("api/files")
      .then((files) => {
        if (Array.isArray(files)) {
          state.files = files;
          renderFiles();
        }
      })
      .catch(() => {
        if (state.files === null) setText("file-shown", "(not available)");
      })
      .finally(() => {
        state.filesTimer = setTimeout(refreshFiles, FILES_EVERY);
      });
  }

  function soonRefreshFiles() {
    clearTimeout(state.filesTimer);
    state.filesTimer = setTimeout(refreshFiles, 500);
  }

  function pollTransfers() {
    getJSON("api/transfers")
      .then((transfers) => {
        if (Array.isArray(transfers)) {
          state.transfers = transfers;
          renderTransfers();
        }
      })
      .catch(() => {})
      .finally(() => {
        const every = document.hidden ? 10000 : state.transfers.length ? 1000 : 3000;
        setTimeout(pollTransfers, every);
      });
  }

  function setConnection(name) {
    const node = $("conn");
    node.setAttribute("data-state", name);
    node.title = "";
    node.textContent = { live: "live", connecting: "connecting…", reconnecting: "reconnecting…", offline: "offline" }[name];
  }

  function loadEvents() {
    getJSON("api/events")
      .then((events) => {
        if (!Array.isArray(events)) return;
        // Keep what the stream brought meanwhile.
        const last = events.length ? events[events.length - 1].time : -Infinity;
        state.events = events.concat(state.events.filter((e) => e.time > last)).slice(-KEPT_EVENTS);
        renderEvents();
      })
      .catch(() => {});
  }

  function watch() {
    setConnection("connecting");
    const source = new EventSource("api/watch");
    source.addEventListener("open", () => {
      setConnection("live");
      loadEvents();
      refreshFiles();
    });
    source.addEventListener("status", (message) => {
      state.status = JSON.parse(message.data);
      renderStatus();
      setConnection("live");
      document.body.dataset.live = "1";
    });
    source.addEventListener("event", (message) => {
      const event = JSON.parse(message.data);
      state.events.push(event);
      if (state.events.length > KEPT_EVENTS) state.events.splice(0, state.events.length - KEPT_EVENTS);
      renderEvents();
      if (REFRESH_KINDS.has(event.kind)) soonRefreshFiles();
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (e.g. the node restarted with a token): try again later.
        setConnection("offline");
        setTimeout(watch, 5000);
      } else {
        setConnection("reconnecting");
      }
    });
  }

  function start() {
    const filter = $("file-filter");
    filter.hidden = false;
    filter.addEventListener("input", applyFilter);
    applyFilter();
    watch();
    pollTransfers();
    setInterval(renderSince, 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

// callshield console: live updates over server-sent events (/events) and the call timeline.
// Everything shown is set with textContent or SVG attributes, never as HTML: call ids,
// speaker names and notes come from outside and stay text.
"use strict";

(function () {
  const page = document.body.dataset.page;
  if (page === "login") return;
  const csrf = (document.querySelector("input[name=csrf]") || {}).value || "";
  const analyst = !!document.querySelector("a[href='/audit']");
  const SVGNS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function postForm(action, fields, label, cls) {
    const form = el("form", { method: "post", action: action, class: "inline" });
    form.appendChild(el("input", { type: "hidden", name: "csrf", value: csrf }));
    for (const [k, v] of Object.entries(fields)) {
      form.appendChild(el("input", { type: "hidden", name: k, value: v }));
    }
    form.appendChild(el("button", { type: "submit", class: cls }, label));
    return form;
  }

  // --- the feed's state, and the browser's own connection --------------------------------
  const feedBox = document.getElementById("feed-status");
  const browserStatus = document.getElementById("browser-status");
  const feeds = {};
  function showFeed(msg) {
    feeds[msg.server] = msg;
    let span = feedBox.querySelector(`span[data-server="${CSS.escape(msg.server)}"]`);
    if (!span) {
      span = el("span", { "data-server": msg.server });
      feedBox.insertBefore(span, browserStatus);
    }
    span.textContent = `server ${msg.server}: ` + (msg.connected ? "connected"
      : `disconnected${msg.error ? " (" + msg.error + ")" : ""}, reconnecting`);
    const allUp = Object.values(feeds).every((f) => f.connected);
    feedBox.className = "feed " + (allUp ? "ok" : "down");
  }

  // --- calls list ----------------------------------------------------------------------
  const filter = document.getElementById("state-filter");
  function applyFilter(row) {
    const want = filter ? filter.value : "";
    const show = !want || (want === "open" ? row.dataset.status === "open"
      : row.dataset.state === want);
    row.classList.toggle("hidden", !show);
  }
  if (filter) {
    filter.addEventListener("change", () => {
      document.querySelectorAll("#calls tbody tr").forEach(applyFilter);
    });
  }
  function upsertCall(call) {
    const body = document.querySelector("#calls tbody");
    if (!body) return;
    let row = body.querySelector(`tr[data-call="${CSS.escape(call.id)}"]`);
    if (!row) {
      row = el("tr", { "data-call": call.id });
      for (const cls of ["platform", "call-id", "status", "duration", "state", "speakers"]) {
        row.appendChild(el("td", { class: cls }));
      }
      const link = el("a", { href: "/calls/" + encodeURIComponent(call.id) });
      row.querySelector(".call-id").appendChild(link);
      body.insertBefore(row, body.firstChild);
    }
    row.dataset.state = call.state;
    row.dataset.status = call.status;
    row.className = "state-" + call.state;
    row.querySelector(".platform").textContent = call.platform || "-";
    row.querySelector(".call-id a").textContent = call.call_id || call.stream_id;
    row.querySelector(".status").textContent = call.status;
    const duration = row.querySelector(".duration");
    duration.dataset.opened = call.opened_at;
    duration.textContent = call.duration.toFixed(1) + " s";
    row.querySelector(".state").textContent = call.state;
    const speakers = row.querySelector(".speakers");
    speakers.textContent = "";
    for (const s of call.speakers) {
      speakers.appendChild(el("span", { class: "spk state-" + s.state },
        `${s.name}: ${s.state} ${s.probability.toFixed(2)}`));
      speakers.appendChild(document.createTextNode(" "));
    }
    applyFilter(row);
  }
  setInterval(() => {  // open calls' durations tick
    document.querySelectorAll("#calls tr[data-status=open] .duration").forEach((td) => {
      const opened = parseFloat(td.dataset.opened);
      if (opened) td.textContent = (Date.now() / 1000 - opened).toFixed(1) + " s";
    });
  }, 1000);

  // --- alerts list ---------------------------------------------------------------------
  function upsertAlert(a) {
    const body = document.querySelector("#alerts tbody");
    if (!body) return;
    const none = document.getElementById("no-alerts");
    if (none) none.remove();
    let row = body.querySelector(`tr[data-alert="${a.id}"]`);
    if (!row) {
      row = el("tr", { "data-alert": String(a.id) });
      body.insertBefore(row, body.firstChild);
    }
    row.textContent = "";
    row.appendChild(el("td", {}, new Date(a.raised_at * 1000).toLocaleString()));
    row.appendChild(el("td", {}, a.platform || "-"));
    const callCell = el("td");
    callCell.appendChild(el("a", { href: "/calls/" + encodeURIComponent(a.call) },
      a.call_id || a.call));
    row.appendChild(callCell);
    row.appendChild(el("td", {}, a.speaker));
    row.appendChild(el("td", {}, `${a.start.toFixed(1)}–${a.end.toFixed(1)} s`));
    row.appendChild(el("td", {}, a.probability.toFixed(2)));
    const ack = el("td", { class: "ack" });
    if (a.acknowledged_by) ack.textContent = "by " + a.acknowledged_by;
    else if (analyst) ack.appendChild(postForm(`/alerts/${a.id}/ack`, {}, "Acknowledge", "ack-button"));
    else ack.textContent = "no";
    row.appendChild(ack);
  }

  // --- call page: the timeline -----------------------------------------------------------
  const callBox = document.getElementById("call");
  const callKey = callBox ? callBox.dataset.call : null;
  let drawPending = false;
  let knownSpeakers = null;

  function draw(data) {
    const plot = document.getElementById("timeline");
    plot.textContent = "";
    const W = 900, H = 260, L = 40, R = 10, T = 10, B = 70;
    const w = W - L - R, h = H - T - B;
    const end = Math.max(1, data.audio_seconds,
      ...data.scores.map((s) => s.end), ...data.alerts.map((a) => a.end));
    const x = (t) => L + (t / end) * w;
    const y = (p) => T + (1 - p) * h;
    plot.appendChild(svg("rect", { x: L, y: T, width: w, height: h, fill: "#fff", stroke: "#999" }));
    for (const p of [0, 0.25, 0.5, 0.75, 1]) {
      plot.appendChild(svg("line", { x1: L, x2: L + w, y1: y(p), y2: y(p), stroke: "#eee" }));
      plot.appendChild(svg("text", { x: L - 4, y: y(p) + 4, "text-anchor": "end", "font-size": 10 }, p.toFixed(2)));
    }
    const step = end > 120 ? 30 : end > 40 ? 10 : 5;
    for (let t = 0; t <= end; t += step) {
      plot.appendChild(svg("text", { x: x(t), y: T + h + 12, "text-anchor": "middle", "font-size": 10 }, t + " s"));
    }
    for (const a of data.alerts) {  // alert markers: the alerted audio
      const band = svg("rect", { x: x(a.start), y: T, width: Math.max(2, x(a.end) - x(a.start)),
        height: h, fill: "#d62728", "fill-opacity": 0.15, class: "alert-marker" });
      band.appendChild(svg("title", {}, `alert ${a.speaker} ${a.start.toFixed(1)}–${a.end.toFixed(1)} s p=${a.probability.toFixed(2)}`));
      plot.appendChild(band);
      plot.appendChild(svg("text", { x: x(a.start) + 2, y: T + 12, "font-size": 10, fill: "#b00020" }, "alert " + a.speaker));
    }
    plot.appendChild(svg("line", { x1: L, x2: L + w, y1: y(data.alert_threshold), y2: y(data.alert_threshold),
      stroke: "#b00020", "stroke-dasharray": "4 3", class: "threshold" }));
    const names = data.speakers.map((s) => s.name);
    names.forEach((name, i) => {
      const color = COLORS[i % COLORS.length];
      const scores = data.scores.filter((s) => s.speaker === name);
      const points = scores.filter((s) => s.running !== null)
        .map((s) => `${x(s.end).toFixed(1)},${y(s.running).toFixed(1)}`).join(" ");
      if (points) {
        plot.appendChild(svg("polyline", { points: points, fill: "none", stroke: color,
          "stroke-width": 2, class: "running", "data-speaker": name }));
      }
      for (const s of scores) {
        const dot = svg("circle", { cx: x((s.start + s.end) / 2), cy: y(s.p), r: 2.5, fill: color,
          class: "window-score", "data-speaker": name });
        dot.appendChild(svg("title", {}, `${name} ${s.start.toFixed(1)}–${s.end.toFixed(1)} s: ${s.p.toFixed(3)}`));
        plot.appendChild(dot);
      }
      const rowY = T + h + 22 + i * 12;  // speech ranges
      plot.appendChild(svg("text", { x: L - 4, y: rowY + 8, "text-anchor": "end", "font-size": 10, fill: color }, name));
      const speech = data.speakers[i].speech || [];
      for (const [a, b] of speech) {
        plot.appendChild(svg("rect", { x: x(a), y: rowY, width: Math.max(1, x(b) - x(a)), height: 8,
          fill: color, "fill-opacity": 0.6, class: "speech" }));
      }
    });
  }

  function updateSpeakers(data) {
    for (const s of data.speakers) {
      const row = document.querySelector(`#speakers tr[data-speaker="${CSS.escape(s.name)}"]`);
      if (!row) continue;
      const state = row.querySelector(".state");
      state.textContent = s.state;
      state.className = "state state-" + s.state;
      row.querySelector(".prob").textContent = s.probability.toFixed(3);
    }
    const status = document.getElementById("call-status");
    status.textContent = data.status + (data.close_status && data.close_status !== "OK"
      ? ` (${data.close_status})` : "");
    document.getElementById("call-audio").textContent =
      `${data.audio_seconds} s, ${data.windows_scored} windows scored`;
  }

  async function refresh() {
    drawPending = false;
    const response = await fetch("/api/calls/" + encodeURIComponent(callKey),
      { credentials: "same-origin" });
    if (!response.ok) return;
    const data = await response.json();
    const names = data.speakers.map((s) => s.name).join("\n") + "|" + data.alerts.length
      + "|" + data.clips.length + "|" + data.has_summary;
    if (knownSpeakers !== null && names !== knownSpeakers
        && !(document.activeElement && document.activeElement.name === "note")) {
      location.reload();  // new speakers, alerts, audio or the summary: their rows, forms
      return;             // come from the server
    }
    knownSpeakers = names;
    draw(data);
    updateSpeakers(data);
  }
  function scheduleRefresh() {
    if (drawPending) return;
    drawPending = true;
    setTimeout(refresh, 300);
  }
  if (callKey) refresh();

  // --- the event stream ----------------------------------------------------------------
  const source = new EventSource("/events");
  source.onopen = () => { browserStatus.textContent = ""; };
  source.onerror = () => {
    browserStatus.textContent = "lost the console's live updates; reconnecting...";
    feedBox.className = "feed down";
  };
  // event delay, server -> this page (same-host clocks), kept for benchmarks: the last 1000
  window.callshieldDelays = [];
  source.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    if (msg.server_time) {
      window.callshieldDelays.push(Date.now() / 1000 - msg.server_time);
      if (window.callshieldDelays.length > 1000) window.callshieldDelays.shift();
    }
    if (msg.type === "feed") showFeed(msg);
    else if (msg.type === "call") {
      upsertCall(msg.call);
      if (callKey && msg.call.id === callKey) scheduleRefresh();
    } else if (msg.type === "alert") {
      upsertAlert(msg.alert);
      if (callKey && msg.alert.call === callKey) scheduleRefresh();
    } else if (msg.type === "score" && callKey && msg.call === callKey) scheduleRefresh();
  };
})();
